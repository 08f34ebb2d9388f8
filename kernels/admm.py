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

The dual update ``u += w - z`` after a quantizer step is :func:`admm_dual_update_ref`.
"""

import numpy as np
import torch
from torch import Tensor

from ._registry import register_op

__all__ = [
    "admm_step",
    "admm_step_ref",
    "admm_dual_update_ref",
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
    a = w.abs()
    tau = kth_largest(a, k).to(w.device)
    keep = a > tau
    ties = a == tau
    need = k - keep.sum()
    keep |= ties & (torch.cumsum(ties, 0) <= need)
    w.mul_(keep)
    if mom is not None:
        mom.mul_(keep)
    return keep, tau


def _check(w: Tensor, grad: Tensor, mom: Tensor, z: Tensor, u: Tensor, mask: Tensor, k: int) -> None:
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
    if k < 0:
        raise ValueError(f"admm_step: k must be >= 0, got {k}")


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
) -> Tensor:
    """One ADMM step over flat ``[n]`` buffers (reference). Mutates ``w``, ``mom``, ``mask``.

    Returns the threshold ``tau`` (0-dim float32): the k-th largest ``|w|`` after the
    gradient step (0 when nothing is cut, +inf when k = 0).
    """
    _check(w, grad, mom, z, u, mask, k)
    g = grad.float() + weight_decay * w + rho * (w - z + u)
    mom.mul_(momentum).add_(g)
    w.sub_(lr * (g + momentum * mom if nesterov else mom))
    keep, tau = project_topk_(w, k, mom)
    mask.copy_(keep & (w != 0))
    return tau.float()


def admm_dual_update_ref(u: Tensor, w: Tensor, z: Tensor) -> None:
    """``u += w - z`` in place (reference for the dual step after a quantizer step)."""
    u.add_(w - z)


def _admm_step_fake(w, grad, mom, z, u, mask, lr, momentum, weight_decay, rho, k, nesterov):
    return w.new_empty(())


admm_step = register_op(
    "admm_step", reference=admm_step_ref, fake=_admm_step_fake, mutates_args=("w", "mom", "mask")
)
