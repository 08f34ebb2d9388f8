"""Fused ADMM step with the global hard-threshold projection: the PyTorch reference.

All factors of all layers live in one flat buffer, so one call updates the whole model:

    g = grad + weight_decay * w + rho * (w - z + u)        # loss + rho/2 ||w - z + u||^2
    m = momentum * m + g                                    # torch.optim.SGD semantics
    w = w - lr * (g + momentum * m if nesterov else m)
    tau = k-th largest |w|;  keep |w| > tau, and of the ties |w| == tau the lowest indices
    w[~keep] = 0;  m[~keep] = 0;  mask = keep & (w != 0)

Exactly ``min(k, n)`` entries are kept, chosen deterministically (ties by flat index), so
the nonzero count is exactly k whenever more than k entries are nonzero. Zeroing the
momentum of pruned weights is a deliberate choice: a pruned weight restarts from rest if it
re-enters the top k, instead of being pushed by stale velocity.

Non-finite updates: if any updated weight or momentum is NaN/Inf (a NaN/Inf grad always
gives one), the step writes nothing (``w``, ``mom``, ``mask`` keep their values) and returns
``tau = NaN``. No exception and no host sync: the caller decides (``ADMM`` raises
``FloatingPointError`` by default).

The dual update ``u += w - z`` after a quantizer step is :func:`admm_dual_update_ref`.

Both are ``torch.library`` ops (``admm_step``, ``admm_dual_update``): with Triton they run the
kernels of ``admm_triton.py`` on CUDA tensors, the references here on CPU.
"""

import numbers

import numpy as np
import torch
from torch import Tensor

from ._registry import HAS_TRITON, metadata_only, no_data, register_op

if HAS_TRITON:
    from .admm_triton import interpreted, launch_admm_step, launch_dual_update

__all__ = [
    "admm_dual_update",
    "admm_dual_update_ref",
    "admm_dual_update_triton",
    "admm_step",
    "admm_step_ref",
    "admm_step_triton",
    "kth_largest",
    "project_topk_",
]


def kth_largest(a: Tensor, k: int) -> Tensor:
    """The k-th largest value of ``a`` (1 <= k <= a.numel()) as a 0-dim tensor (reference)."""
    n = a.numel()
    if a.device.type == "cpu":  # numpy's introselect is O(n); torch.kthvalue is much slower
        an = a.detach().reshape(-1).numpy()
        return torch.tensor(np.partition(an, n - k)[n - k], dtype=a.dtype)
    return torch.topk(a.reshape(-1), k, sorted=False).values.min()


def project_topk_(w: Tensor, k: int, mom: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep the k largest ``|w|`` (ties by lowest index), zero the rest in place.

    Returns ``(keep [n] bool, tau)``; ``mom`` (if given) is zeroed where not kept.

    Example:
        >>> w = torch.tensor([0.5, -2.0, 0.5, 1.0])
        >>> keep, tau = project_topk_(w, 3)
        >>> w.tolist(), float(tau)
        ([0.5, -2.0, 0.0, 1.0], 0.5)
    """
    n = w.numel()
    if k < 0:
        raise ValueError(f"project_topk_: k must be >= 0, got {k}")
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device), w.new_zeros(())
    if k == 0:
        w.zero_()
        if mom is not None:
            mom.zero_()
        return torch.zeros(n, dtype=torch.bool, device=w.device), w.new_full((), float("inf"))
    keep, tau = _topk_keep(w, k)
    w.mul_(keep)
    if mom is not None:
        mom.mul_(keep)
    return keep, tau


def _topk_keep(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(keep [n] bool, tau)`` of :func:`project_topk_` for ``1 <= k < n``, ``w`` untouched."""
    a = w.abs()
    tau = kth_largest(a, k).to(w.device)
    keep = a > tau
    need = k - int(keep.sum())  # >= 1: tau itself is one of the k largest
    keep[torch.nonzero(a == tau).view(-1)[:need]] = True  # ties: the lowest flat indices
    return keep, tau


def _check(
    w: Tensor, grad: Tensor, mom: Tensor, z: Tensor, u: Tensor, mask: Tensor, k: int, tau_hint: Tensor | None
) -> None:
    n = w.numel()
    for name, t in (("w", w), ("grad", grad), ("mom", mom), ("z", z), ("u", u), ("mask", mask)):
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"admm_step: {name} must be 1-D with {n} elements, got {tuple(t.shape)}")
        if t.device != w.device:
            raise ValueError(f"admm_step: {name} is on {t.device}, w is on {w.device}")
        if not t.is_contiguous():
            raise ValueError(f"admm_step: {name} must be contiguous")
    for name, t in (("w", w), ("mom", mom), ("z", z), ("u", u)):
        if t.dtype != torch.float32:
            raise ValueError(f"admm_step: {name} must be float32 (master weights), got {t.dtype}")
    if grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"admm_step: grad must be float32/float16/bfloat16, got {grad.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"admm_step: mask must be bool, got {mask.dtype}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:  # (the launcher truncated 2.5 to 2)
        raise ValueError(f"admm_step: k must be an int >= 0, got {k!r}")
    if tau_hint is not None:
        if tau_hint.dim() != 0 or tau_hint.dtype != torch.float32:
            raise ValueError(
                f"admm_step: tau_hint must be a 0-dim float32 tensor, got {tuple(tau_hint.shape)} {tau_hint.dtype}"
            )
        if tau_hint.device != w.device:
            raise ValueError(f"admm_step: tau_hint is on {tau_hint.device}, w is on {w.device}")


def admm_step_ref(
    w: Tensor,
    grad: Tensor,
    mom: Tensor,
    z: Tensor,
    u: Tensor,
    mask: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    k: int,
    nesterov: bool,
    tau_hint: Tensor | None = None,
) -> Tensor:
    """One ADMM step over flat ``[n]`` buffers (reference). Mutates ``w``, ``mom``, ``mask``.

    Returns the threshold ``tau`` (0-dim float32): the k-th largest ``|w|`` after the
    gradient step (0 when nothing is cut, +inf when k = 0, NaN when the update was not
    finite and nothing was written). ``tau_hint`` (0-dim float32, e.g. the previous tau) is
    a speed hint for the Triton kernels; the result never depends on it.

    Example:
        >>> w, mask = torch.tensor([0.5, -2.0, 0.5, 1.0]), torch.zeros(4, dtype=torch.bool)
        >>> g = torch.zeros(4)
        >>> float(admm_step_ref(w, g, g.clone(), g.clone(), g.clone(), mask, 0.1, 0.9, 0.0, 0.0, 3, False))
        0.5
        >>> w.tolist(), mask.tolist()
        ([0.5, -2.0, 0.0, 1.0], [True, True, False, True])
    """
    _check(w, grad, mom, z, u, mask, k, tau_hint)
    # two scratch buffers and in-place ops (each fresh n-float temporary costs a page-faulted allocation),
    # evaluated in exactly the order of the formula above (the Triton kernel matches it bit for bit)
    t = torch.sub(w, z).add_(u).mul_(rho)  # [n] rho (w - z + u)
    g = torch.mul(w, weight_decay).add_(grad).add_(t)  # [n] grad + wd w + rho (w - z + u)
    m = torch.mul(mom, momentum, out=t).add_(g)  # [n]
    if nesterov:
        g.add_(torch.mul(m, momentum))
        wn = torch.sub(w, g.mul_(lr), out=g)
    else:
        wn = torch.sub(w, torch.mul(m, lr, out=g), out=g)
    if w.device.type == "cpu":  # a branch costs no sync here; a finite sum means finite entries
        if not (torch.isfinite(wn.sum() + m.sum()) or (torch.isfinite(wn).all() & torch.isfinite(m).all())):
            return torch.tensor(float("nan"), dtype=torch.float32)
        n = w.numel()
        if 1 <= k < n:
            keep, tau = _topk_keep(wn, k)
            torch.mul(wn, keep, out=w)
            torch.mul(m, keep, out=mom)
        else:
            keep, tau = project_topk_(wn, k, m)
            w.copy_(wn)
            mom.copy_(m)
        torch.logical_and(keep, w != 0, out=mask)
        return tau.float()
    ok = torch.isfinite(wn).all() & torch.isfinite(m).all()
    keep, tau = project_topk_(wn, k, m)  # no host sync: select, don't branch
    w.copy_(torch.where(ok, wn, w))
    mom.copy_(torch.where(ok, m, mom))
    mask.copy_(torch.where(ok, keep & (wn != 0), mask))
    return torch.where(ok, tau.float(), float("nan"))


def _check_dual(u: Tensor, w: Tensor, z: Tensor) -> None:
    for name, t in (("u", u), ("w", w), ("z", z)):
        if t.dtype != torch.float32:
            raise ValueError(f"admm_dual_update: {name} must be float32, got {t.dtype}")
        if t.shape != u.shape:
            raise ValueError(f"admm_dual_update: {name} has shape {tuple(t.shape)}, u has {tuple(u.shape)}")
        if t.device != u.device:
            raise ValueError(f"admm_dual_update: {name} is on {t.device}, u is on {u.device}")
        if not t.is_contiguous():
            raise ValueError(f"admm_dual_update: {name} must be contiguous")


def admm_dual_update_ref(u: Tensor, w: Tensor, z: Tensor) -> None:
    """``u += w - z`` in place (reference for the dual step after a quantizer step).

    Example:
        >>> u = torch.zeros(2); admm_dual_update_ref(u, torch.tensor([1.0, 2.0]), torch.ones(2)); u.tolist()
        [0.0, 1.0]
    """
    _check_dual(u, w, z)
    u.add_(w - z)


def _check_triton_device(t: Tensor, name: str) -> None:
    if no_data(t) or t.device.type == "cuda" or (t.device.type == "cpu" and interpreted()):
        return
    raise ValueError(f"{name}: the Triton kernels need CUDA tensors (or CPU with TRITON_INTERPRET=1), got {t.device}")


def admm_step_triton(
    w: Tensor,
    grad: Tensor,
    mom: Tensor,
    z: Tensor,
    u: Tensor,
    mask: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    k: int,
    nesterov: bool,
    tau_hint: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``atmc::admm_step``: same contract as :func:`admm_step_ref`.

    A fixed sequence of five launches (update, three select levels, write; two when ``k = 0`` or
    ``k >= n``; see ``admm_triton.py``), no host sync, grids set by ``n`` alone. ``grad`` may be
    float16/bfloat16 (upcast in the kernel).
    ``tau_hint`` (0-dim float32, e.g. the previous step's tau) makes the select read only a band
    of elements around it when the new tau is near; it never changes the result.

    Example (CUDA tensors ``w, grad, mom, z, u`` float32 ``[n]``, ``mask`` bool ``[n]``; not run as a doctest)::

        tau = admm_step_triton(w, grad, mom, z, u, mask, 0.1, 0.9, 1e-4, 0.1, k, False)
        tau = admm_step_triton(w, grad, mom, z, u, mask, 0.1, 0.9, 1e-4, 0.1, k, False, tau)  # next step
    """
    _check(w, grad, mom, z, u, mask, k, tau_hint)
    n = w.numel()
    if n >= 2**31:
        raise ValueError(f"admm_step: at most 2**31 - 1 elements per call, got {n}")
    _check_triton_device(w, "admm_step")
    if n == 0 or metadata_only(w, interpreted(), "admm_step: the Triton kernels"):
        return w.new_zeros(())
    s, tau = torch.empty_like(w), w.new_empty(())
    launch_admm_step(w, grad, mom, z, u, mask, s, tau, lr, momentum, weight_decay, rho, int(k), nesterov, tau_hint)
    return tau


def admm_dual_update_triton(u: Tensor, w: Tensor, z: Tensor) -> None:
    """Triton launcher of ``atmc::admm_dual_update`` (``u += w - z``, one launch)."""
    _check_dual(u, w, z)
    if u.numel() >= 2**31:
        raise ValueError(f"admm_dual_update: at most 2**31 - 1 elements per call, got {u.numel()}")
    _check_triton_device(u, "admm_dual_update")
    if not metadata_only(u, interpreted(), "admm_dual_update: the Triton kernels"):
        launch_dual_update(u, w, z)


def _admm_step_fake(w, grad, mom, z, u, mask, lr, momentum, weight_decay, rho, k, nesterov, tau_hint=None):
    return w.new_empty(())


def _dual_update_fake(u, w, z):
    return None


if not HAS_TRITON:  # the package works without Triton: the references serve every device
    admm_step_triton = admm_dual_update_triton = None

admm_step = register_op(
    "admm_step",
    reference=admm_step_ref,
    fake=_admm_step_fake,
    launcher=admm_step_triton,
    mutates_args=("w", "mom", "mask"),
    cpu_opaque=True,
)
admm_dual_update = register_op(
    "admm_dual_update",
    reference=admm_dual_update_ref,
    fake=_dual_update_fake,
    launcher=admm_dual_update_triton,
    mutates_args=("u",),
    cpu_opaque=True,
)
