"""White-box attacks: L-inf PGD, FGSM, the cheap training attacks FGSM-RS (Wong et al. 2020) and N-FGSM
(de Jorge et al. 2022), WRM (Sinha et al. 2018), APGD-CE / APGD-DLR / APGD-T (Croce & Hein
2020), and an AutoAttack-grade suite run as a cascade (:func:`robust_suite`).

Conventions (those of torchattacks and AutoAttack):

* inputs ``x [N, ...]`` are in ``[0, 1]``; normalization lives inside the model;
* results are clamped to the L-inf ``eps``-ball around ``x`` and to ``[0, 1]`` (WRM and N-FGSM: to
  ``[0, 1]`` only; N-FGSM's perturbation reaches ``(k + 1) eps``, as its docstring says);
* attacks never change the model: parameters, their ``.grad`` and ``requires_grad`` flags,
  buffers (BatchNorm running statistics included) and every module's train/eval flag are as
  before the call. By default (``eval_mode=True``) the attack runs the model in eval mode
  (BatchNorm uses running statistics, dropout is off), the usual choice for evaluation;
  ``eval_mode=False`` runs it in the caller's mode (Madry-style training attacks on a model in
  train mode). In either mode any buffer a forward pass touched is put back afterwards.
* ATMC layers materialize ``W = U V + C`` once per attack (:func:`atmc_triton.cached_weights`).
* defaults follow torchattacks: ``eps=8/255`` everywhere; PGD ``alpha=2/255, steps=10,
  random_start=True``; APGD-CE / APGD-DLR ``steps=100`` (AutoAttack's standard setting;
  torchattacks' APGD defaults to 10), ``n_restarts=1``, ``rho=0.75``.

Example (labels are int64 class indices; the result stays in the eps-ball and in ``[0, 1]``):
    >>> import torch, atmc_triton as at
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    >>> adv = at.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5)
    >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6), bool(adv.min() >= 0 and adv.max() <= 1)
    (torch.Size([4, 1, 4, 4]), True, True)
    >>> res = at.robust_suite(model, x, y, suite="apgd", steps=5)  # worst case over the suite's stages
    >>> res.robust.shape, res.robust.dtype
    (torch.Size([4]), torch.bool)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atmc_triton.config import _is_int, _is_real
from atmc_triton.layers import ATMCLayer, cached_weights

__all__ = [
    "SUITES",
    "SuiteResult",
    "apgd_ce",
    "apgd_dlr",
    "attack_context",
    "autoattack_available",
    "cascade",
    "fgsm",
    "fgsm_rs",
    "n_fgsm",
    "pgd",
    "resolve_suite",
    "robust_attack",
    "robust_suite",
    "torchattacks_available",
    "wrm",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def attack_context(model: nn.Module, eval_mode: bool = True, labels: Tensor | None = None, *, top: int | None = None):
    """Run ``model`` for an attack and leave it exactly as found (modes, buffers, grads). With ``labels``, every
    ``[N, C]`` output is checked to have a class for each label: a ``ValueError`` instead of cross-entropy's
    ``IndexError`` on CPU or, on CUDA, a device-side assert that ends the process's CUDA context. ``top``: the
    largest label when the caller has already read it (no host read here); every output must also be one tensor.

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).train()
        >>> with attack_context(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]  # an attack that calls backward (torchattacks' FAB) adds
    # to .grad: each parameter gets no grad while the attack runs and its own one back afterwards
    # a forward pass may update buffers: BatchNorm statistics in train mode, or a module's own state (a counter, a
    # cache) in either mode; every module's buffers are put back (an ATMC layer's ADMM state is not touched by a
    # forward pass and is as large as its weight: not copied)
    saved = [
        (b, b.detach().clone())
        for m in model.modules()
        if not isinstance(m, ATMCLayer)
        for b in m.buffers(recurse=False)
    ]
    if top is None:  # (the attacks pass the largest label their input check read)
        top = int(labels.max()) if labels is not None and labels.numel() else -1
    hook = model.register_forward_hook(lambda m, a, out: _check_classes(out, top)) if top >= 0 else None
    try:
        for p, _ in grads:
            p.grad = None
        if eval_mode:
            model.eval()
        with torch.enable_grad(), cached_weights(model):
            yield model
    finally:
        if hook is not None:
            hook.remove()
        for m, t in modes:
            m.training = t
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _logits_of(out: object) -> Tensor:
    """``out`` if it is one logits tensor, else a ``ValueError`` saying what to do (a model with auxiliary
    outputs, e.g. torchvision's GoogLeNet in train mode, returns a tuple)."""
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the model returned a {type(out).__name__}, not a logits tensor: build it without auxiliary outputs "
            "(torchvision's GoogLeNet / Inception v3: aux_logits=False)"
        )
    return out


def _check_classes(out: object, top: int) -> None:
    _logits_of(out)
    if out.dim() == 2 and top >= out.shape[1]:
        raise ValueError(f"labels must be class indices < the model's {out.shape[1]} outputs, got {top}")


def _count(v: object, low: int) -> bool:
    """``v`` is an int (not a bool) ``>= low``."""
    return _is_int(v) and v >= low


def _real(v: object, low: float, strict: bool = False) -> bool:
    """``v`` is a finite real number (not a bool) ``>= low`` (``> low`` if ``strict``)."""
    return _is_real(v) and (v > low if strict else v >= low)


def _check(x: Tensor, y: Tensor, eps: object = ..., noise: Tensor | None = None) -> int:
    """Inputs in [0, 1] (no NaN), labels ``[N]``, ``eps`` (unless omitted, as WRM does) a finite number >= 0 and
    ``noise`` (when given) in [0, 1], in one host read; returns the largest label (-1 for none) for
    :func:`attack_context`."""
    if torch.is_inference_mode_enabled():  # torch.enable_grad() cannot lift it: the input gradient would not exist
        raise RuntimeError("attacks need input gradients: call them outside torch.inference_mode() (no_grad is fine)")
    for what, v in (("inputs x", x), ("labels y", y)):  # a numpy array, a list, or (model, x, y) out of order
        if not isinstance(v, Tensor):
            raise ValueError(
                f"attack {what} must be a torch.Tensor, got {type(v).__name__} "
                "(torch.as_tensor(...); the arguments are model, x, y in that order)"
            )
    if not x.dtype.is_floating_point:
        raise ValueError(f"attack inputs must be floating point in [0, 1], got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [N] for inputs [N, ...], got {tuple(y.shape)} for {tuple(x.shape)}")
    if y.dtype != torch.long:
        raise ValueError(f"labels must be int64 (torch.long) class indices, got {y.dtype}; pass y.long()")
    # the labels' and x's ranges (and the noise's) in one host read (each read is a device sync on a GPU)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)

    def span(t: Tensor | None) -> list[Tensor]:
        if not isinstance(t, Tensor) or not t.numel():
            return [zero, zero]
        t = t.detach()
        return [t.min().double().to(x.device), t.max().double().to(x.device)]

    y_min, y_max, x_lo, x_hi, n_lo, n_hi = torch.stack([*span(y), *span(x), *span(noise)]).tolist()
    if y_min < 0:  # cross-entropy would skip -100 (its ignore_index): x back, unattacked
        raise ValueError(f"labels must be class indices >= 0, got {int(y_min)}")
    if not (x_lo >= 0.0 and x_hi <= 1.0):  # NaN fails both
        raise ValueError("attack inputs must lie in [0, 1] and be finite, no NaN (normalize inside the model)")
    if not (n_lo >= 0.0 and n_hi <= 1.0):
        raise ValueError("noise must be uniform draws in [0, 1] (the start is x + (2 noise - 1) radius)")
    if eps is not ... and not _real(eps, 0.0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps is not ... and eps > 1:  # torchattacks' habit is eps=8/255; eps=8 attacks the whole [0, 1] box
        msg = f"eps={eps} is above 1: inputs lie in [0, 1], so the ball is the whole box (meant {eps}/255?)"
        warnings.warn(msg, stacklevel=_caller_level())
    return int(y_max) if y.numel() else -1


def _seeded_gpus(x: Tensor) -> list[int]:
    """The GPUs whose generators a suite run may reseed: ``x``'s and the current one (torchattacks seeds the
    current device, which need not be ``x``'s); none for CPU inputs."""
    if x.device.type != "cuda":
        return []
    return sorted({x.get_device(), torch.cuda.current_device()})


def _caller_level() -> int:
    """``stacklevel`` (for a ``warnings.warn`` in the function calling this) of the first frame outside this package,
    however many of the package's functions lie between (``fgsm`` calls ``pgd``, the suite calls each attack)."""
    frame, level, pkg = sys._getframe(1), 1, os.path.dirname(os.path.abspath(__file__))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _project(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clamp to the L-inf ball of radius ``eps`` around ``x``, then to ``[0, 1]``."""
    return (x + (adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


def _clip_ball(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """The same projection as :func:`_project`, written as AutoAttack writes it (min/max, then [0, 1])."""
    return torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)


def _input_grad(model: nn.Module, adv: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    adv = adv.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model(adv), y), adv)
    return g


def _start(x: Tensor, radius: float, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """``x + (2 noise - 1) radius`` clamped to ``[0, 1]``, ``noise`` uniform ``[0, 1)`` shaped like ``x`` (its range
    checked by :func:`_check`)."""
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape or noise.dtype != x.dtype or noise.device != x.device:
        raise ValueError(
            f"noise must have x's shape, dtype and device ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(noise.shape)}, {noise.dtype}, {noise.device}"
        )
    return (x + (2.0 * noise - 1.0) * radius).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    *,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """L-inf PGD (Madry et al.): ``x' <- Proj(x' + alpha * sign(grad loss))``, ``steps`` times.

    Defaults are torchattacks.PGD's: ``eps=8/255, alpha=2/255, steps=10, random_start=True``.

    ``random_start`` draws the start uniformly from the eps-ball (then clamps to ``[0, 1]``),
    from ``generator`` when given (on ``x``'s device), or takes ``noise`` (uniform ``[0, 1)``
    draws shaped like ``x``: ``x + (2 noise - 1) eps``), e.g. a data-parallel rank's rows of
    the draws for the global batch. ``loss_fn(logits, y)`` defaults to mean cross-entropy, so
    the step rule equals ``torchattacks.PGD``.

    Args:
        x: ``[N, ...]`` inputs in ``[0, 1]``; y: ``[N]`` labels.
    Returns:
        ``x_adv`` like ``x`` (detached), with ``|x_adv - x| <= eps`` and ``0 <= x_adv <= 1``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2); adv = pgd(m, x, torch.tensor([0, 1]), 0.1, 0.05, 3)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    top = _check(x, y, eps, noise)
    if not (_count(steps, 0) and _real(alpha, 0.0)):
        raise ValueError(f"pgd needs steps >= 0 and alpha >= 0, got steps={steps}, alpha={alpha}")
    if noise is not None and (not random_start or noise.shape != x.shape):
        raise ValueError(
            f"pgd: noise must have x's shape {tuple(x.shape)} and needs random_start=True, got "
            f"shape {tuple(noise.shape)}, random_start={random_start}"
        )
    loss_fn = loss_fn or F.cross_entropy
    x = x.detach()
    with attack_context(model, eval_mode, top=top):
        adv = _start(x, eps, noise, generator) if random_start else x.clone()
        for _ in range(steps):
            g = _input_grad(model, adv, y, loss_fn)
            adv = _project(adv.detach() + alpha * g.sign(), x, eps).detach()
    return adv


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, *, eval_mode: bool = True) -> Tensor:
    """FGSM (Goodfellow et al.): one step ``x + eps * sign(grad CE)``, clamped to ``[0, 1]`` (torchattacks'
    default ``eps=8/255``).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> fgsm(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1).shape
        torch.Size([2, 1, 2, 2])
    """
    return pgd(model, x, y, eps, eps, 1, random_start=False, eval_mode=eval_mode)


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    alpha: float = 10 / 255,
    loss_fn: LossFn | None = None,
    *,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """FGSM with a random start (Wong et al. 2020, "Fast is better than free"; torchattacks' ``FFGSM``, whose
    defaults ``eps=8/255, alpha=10/255`` it keeps, but not its random draws: from one seed the examples differ,
    unlike :func:`pgd` and :func:`fgsm`): start uniform in the eps-ball, one step
    ``alpha * sign(grad loss)``, then back into the eps-ball and ``[0, 1]``. A training attack
    (Wong et al. use ``alpha = 1.25 eps``); too large an ``alpha`` invites catastrophic overfitting.

    ``noise``: uniform ``[0, 1)`` draws shaped like ``x`` (the start is ``x + (2 noise - 1) eps``),
    else drawn from ``generator``. ``loss_fn(logits, y)`` defaults to mean cross-entropy.

    Args:
        x: ``[N, ...]`` inputs in ``[0, 1]``; y: ``[N]`` labels.
    Returns:
        ``x_adv`` like ``x`` (detached), ``|x_adv - x| <= eps``, in ``[0, 1]``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2); adv = fgsm_rs(m, x, torch.tensor([0, 1]), 0.1, 0.125)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    top = _check(x, y, eps, noise)
    if not _real(alpha, 0.0):
        raise ValueError(f"fgsm_rs needs alpha >= 0, got {alpha}")
    x = x.detach()
    with attack_context(model, eval_mode, top=top):
        adv = _start(x, eps, noise, generator)
        g = _input_grad(model, adv, y, loss_fn or F.cross_entropy)
        return _project(adv + alpha * g.sign(), x, eps).detach()


def n_fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    alpha: float | None = None,
    k: float = 2.0,
    loss_fn: LossFn | None = None,
    *,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """N-FGSM (de Jorge et al. 2022, "Make some noise"): start uniform in the ``k * eps``-ball (default
    ``k = 2``), one step ``alpha * sign(grad loss)`` (default ``alpha = eps``), **no** projection back to
    the eps-ball, only to ``[0, 1]``: the perturbation reaches ``(k + 1) eps``. A training attack that
    avoids catastrophic overfitting without a larger cost; not an evaluation attack.

    ``noise``: uniform ``[0, 1)`` draws shaped like ``x`` (start ``x + (2 noise - 1) k eps``).

    Args:
        x: ``[N, ...]`` inputs in ``[0, 1]``; y: ``[N]`` labels.
    Returns:
        ``x_adv`` like ``x`` (detached), ``|x_adv - x| <= (k eps + alpha)``, in ``[0, 1]``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2); adv = n_fgsm(m, x, torch.tensor([0, 1]), 0.1)
        >>> bool((adv - x).abs().max() <= 0.3 + 1e-6)
        True
    """
    top = _check(x, y, eps, noise)
    alpha = eps if alpha is None else alpha
    if not (_real(alpha, 0.0) and _real(k, 0.0)):
        raise ValueError(f"n_fgsm needs alpha >= 0 and k >= 0, got alpha={alpha}, k={k}")
    x = x.detach()
    with attack_context(model, eval_mode, top=top):
        adv = _start(x, k * eps, noise, generator)
        g = _input_grad(model, adv, y, loss_fn or F.cross_entropy)
        return (adv + alpha * g.sign()).clamp(0.0, 1.0).detach()


def wrm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float = 0.4,
    steps: int = 15,
    lr: float = 1.0,
    *,
    eval_mode: bool = True,
) -> Tensor:
    """WRM (Sinha, Namkoong & Duchi 2018): gradient ascent on ``CE(f(x'), y) - gamma ||x' - x||_2^2`` per sample.

    Step ``t`` (from 0) moves by ``lr / sqrt(t + 1)`` times the gradient of the summed
    per-sample objective, then clamps to ``[0, 1]`` (no eps-ball: the penalty sets the size).
    The defaults match the public ATMC reference (``1.3 CE - 0.5 ||d||^2``, unit steps) up to
    the scale of the objective: ``gamma = 0.5 / 1.3 ~ 0.4``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> adv = wrm(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), gamma=1.0, steps=2, lr=0.1)
        >>> bool(adv.min() >= 0 and adv.max() <= 1)
        True
    """
    top = _check(x, y)
    if not (_real(gamma, 0.0, strict=True) and _count(steps, 0) and _real(lr, 0.0)):
        raise ValueError(f"wrm needs gamma > 0, steps >= 0, lr >= 0, got {gamma}, {steps}, {lr}")
    x = x.detach()
    with attack_context(model, eval_mode, top=top):
        adv = x.clone()
        for t in range(steps):
            a = adv.detach().requires_grad_(True)
            objective = F.cross_entropy(model(a), y, reduction="sum") - gamma * (a - x).pow(2).sum()
            (g,) = torch.autograd.grad(objective, a)
            adv = (a.detach() + lr / math.sqrt(t + 1) * g).clamp(0.0, 1.0)
    return adv.detach()


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR loss per sample (Croce & Hein 2020): ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, ``[N]``.

    Scale-invariant in the logits, so it does not saturate like cross-entropy. Needs >= 3 classes.
    """
    s, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    return -(logits[rows, y] - s[:, -2] * top_is_y - s[:, -1] * (1.0 - top_is_y)) / (s[:, -1] - s[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR loss per sample: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, ``[N]``. Needs >= 4 classes."""
    s, _ = logits.sort(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return -(logits[rows, y] - logits[rows, target]) / (s[:, -1] - 0.5 * s[:, -3] - 0.5 * s[:, -4] + 1e-12)


PerSampleLoss = Callable[[Tensor, Tensor], Tensor]  # (logits [N, C], y [N]) -> loss [N]


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    rho: float,
    generator: torch.Generator | None,
    loss_fn: PerSampleLoss,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run maximizing ``loss_fn``; returns ``(x_adv, fooled [N] bool, best loss [N])`` (``x_adv``: a fooling
    point if any, else the highest-loss one, whose loss is the third)."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)

    def loss_grad(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = a.detach().requires_grad_(True)
        logits = model(a)
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), a)
        return loss.detach(), g.detach(), logits.detach().argmax(1) != y

    t = 2.0 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1.0
    tmax = t.reshape(n, -1).abs().amax(1).clamp_min(1e-12).view(view)
    x_adv = (x + eps * t / tmax).clamp(0.0, 1.0)  # a random point on the ball's surface
    loss, grad, wrong = loss_grad(x_adv)
    fooled = wrong.clone()
    x_fool = torch.where(wrong.view(view), x_adv, x)  # the latest misclassified point
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full(view, 2.0 * eps, device=x.device, dtype=x.dtype)
    # checkpoints: first after 22% of the steps, then shrinking by 3% down to 6% (Croce & Hein, Sec. 3.2)
    period, p_min, p_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    since, increases = 0, torch.zeros(n, device=x.device)
    loss_prev = torch.zeros_like(loss)  # as the reference: the first step counts as an increase when loss > 0
    best_at_check = loss_best.clone()
    reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
    x_prev = x_adv.clone()
    for i in range(steps):
        a = 0.75 if i > 0 else 1.0  # momentum from the second step on
        z = _clip_ball(x_adv + step * grad.sign(), x, eps)
        nxt = _clip_ball(x_adv + (z - x_adv) * a + (x_adv - x_prev) * (1.0 - a), x, eps)
        x_prev, x_adv = x_adv, nxt
        loss, grad, wrong = loss_grad(x_adv)
        x_fool = torch.where(wrong.view(view), x_adv, x_fool)
        fooled |= wrong
        increases += (loss > loss_prev).float()
        loss_prev = loss
        better = loss > loss_best
        x_best = torch.where(better.view(view), x_adv, x_best)
        grad_best = torch.where(better.view(view), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        since += 1
        if since == period:
            osc = increases <= period * rho  # condition 1: too few successful steps
            stall = ~reduced_last & (best_at_check >= loss_best)  # condition 2: no progress since last check
            reduce = osc | stall
            step = torch.where(reduce.view(view), step / 2.0, step)
            x_adv = torch.where(reduce.view(view), x_best, x_adv)
            grad = torch.where(reduce.view(view), grad_best, grad)
            reduced_last, best_at_check = reduce, loss_best.clone()
            since, increases = 0, torch.zeros_like(increases)
            period = max(period - p_decr, p_min)
    return torch.where(fooled.view(view), x_fool, x_best), fooled, loss_best


def _apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    n_restarts: int,
    rho: float,
    eval_mode: bool,
    generator: torch.Generator | None,
    losses: Callable[[Tensor, Tensor], Sequence[PerSampleLoss]],
    name: str,
) -> Tensor:
    """APGD restarts over the points still classified correctly; ``losses(x_sub, y_sub)`` gives the losses of one
    round (one per target class for APGD-T), each run ``n_restarts`` times. A point never fooled keeps the
    highest-loss point of its round's restarts (a later restart with a lower loss does not overwrite it); the
    rounds' losses differ (APGD-T: one target each), so the best is taken per round and the last round's is kept."""
    top = _check(x, y, eps)
    if not (_count(steps, 1) and _count(n_restarts, 1)):
        raise ValueError(f"{name} needs steps >= 1 and n_restarts >= 1, got {steps}, {n_restarts}")
    if not (_real(rho, 0.0, strict=True) and rho <= 1):
        raise ValueError(f"{name}: rho must be a number in (0, 1] (AutoAttack: 0.75), got {rho!r}")
    x = x.detach()
    with attack_context(model, eval_mode, top=top):
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        adv = x.clone()
        n_rounds = len(losses(x[:0], y[:0]))
        for r in range(n_rounds):
            best = torch.full(y.shape, -math.inf, device=x.device)  # this round's best loss per point
            for _ in range(n_restarts):
                idx = robust.nonzero().view(-1)
                if idx.numel() == 0:
                    break
                fn = losses(x[idx], y[idx])[r]
                a, fooled, loss = _apgd_run(model, x[idx], y[idx], eps, steps, rho, generator, fn)
                keep = fooled | (loss.to(best.dtype) > best[idx]) | (best[idx] == -math.inf)
                adv[idx[keep]] = a[keep]
                best[idx] = torch.maximum(best[idx], loss.to(best.dtype))
                robust[idx[fooled]] = False
    return _clip_ball(adv, x, eps).detach()  # idempotent on APGD's clipped points (no rounding)


def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    steps: int = 100,
    *,
    n_restarts: int = 1,
    rho: float = 0.75,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD-CE (Croce & Hein 2020): L-inf PGD with momentum 0.75 and the step-size schedule of the paper.

    The step starts at ``2 eps`` and halves at a checkpoint (after 22% of the steps, then ever
    shorter periods, at least 6%) when fewer than ``rho`` of the steps since the last one
    raised the loss, or when it was not halved last time and the best loss did not improve;
    it then restarts from the best point. Restarts attack only the points still classified
    correctly. Returns, per sample, the last point found misclassified, else the highest-loss one.
    With the same seed it reproduces ``torchattacks.APGD(loss="ce")`` (a port of the authors' code) on the
    points it fools; on the others torchattacks returns ``x`` itself, this the highest-loss point.
    Defaults: ``eps=8/255``, ``steps=100`` (AutoAttack's; torchattacks' APGD defaults to 10).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> bool(((apgd_ce(m, x, torch.zeros(5, dtype=torch.long), 0.1, steps=10) - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    ce = nn.CrossEntropyLoss(reduction="none")
    return _apgd(model, x, y, eps, steps, n_restarts, rho, eval_mode, generator, lambda xs, ys: [ce], "apgd_ce")


def apgd_dlr(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    steps: int = 100,
    *,
    n_target_classes: int | None = 9,
    n_restarts: int = 1,
    rho: float = 0.75,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD on the DLR loss: targeted (APGD-T, the default) or untargeted (``n_target_classes=None``).

    DLR is invariant to the scale of the logits, so it breaks points where cross-entropy
    saturates. Targeted: for each of the ``n_target_classes`` most likely wrong classes of the
    clean input in turn (AutoAttack: 9), APGD maximizes :func:`dlr_loss_targeted` towards it on
    the points still classified correctly (needs >= 4 classes; more targets than wrong classes
    are capped). Untargeted: :func:`dlr_loss` (>= 3 classes). With the same seed it reproduces
    ``torchattacks.APGDT(n_classes=n_target_classes + 1)`` and ``torchattacks.APGD(loss="dlr")`` on the
    points it fools (on the others torchattacks returns ``x``, this the highest-loss point).

    Args:
        x: ``[N, ...]`` inputs in ``[0, 1]``; y: ``[N]`` labels.
    Returns:
        ``x_adv`` like ``x``: the last point found misclassified, else the highest-loss one of the restarts
        (targeted: of the last target class's restarts).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
        >>> bool(((apgd_dlr(m, x, y, 0.1, steps=5, n_target_classes=2) - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    if n_target_classes is not None and not _count(n_target_classes, 1):
        raise ValueError(
            f"apgd_dlr: n_target_classes must be an int >= 1 or None (untargeted), got {n_target_classes!r}"
        )
    need = 3 if n_target_classes is None else 4
    top = _check(x, y, eps)
    c = _n_classes(model, x, eval_mode, top)
    if c < need:
        kind = "untargeted" if n_target_classes is None else "targeted"
        raise ValueError(f"apgd_dlr: the {kind} DLR loss needs >= {need} classes, the model has {c}")
    if n_target_classes is None:
        return _apgd(
            model, x, y, eps, steps, n_restarts, rho, eval_mode, generator, lambda xs, ys: [dlr_loss], "apgd_dlr"
        )
    k = min(n_target_classes, c - 1)

    def losses(xs: Tensor, ys: Tensor) -> list[PerSampleLoss]:
        if xs.shape[0] == 0:
            return [dlr_loss] * k  # only the count is used
        with torch.no_grad():
            order = model(xs).sort(dim=1)[1]  # the clean logits of the points still robust, ascending

        def targeted(t: int) -> PerSampleLoss:
            target = order[:, -t]  # the t-th most likely class (t = 2: the runner-up)
            return lambda logits, yy: dlr_loss_targeted(logits, yy, target)

        return [targeted(t) for t in range(2, k + 2)]

    return _apgd(model, x, y, eps, steps, n_restarts, rho, eval_mode, generator, losses, "apgd_dlr")


def autoattack_available() -> bool:
    """Whether the ``autoattack`` package (github.com/fra31/auto-attack) can be imported."""
    try:
        import autoattack  # noqa: F401
    except ImportError:
        return False
    return True


def torchattacks_available() -> bool:
    """Whether ``torchattacks`` (PyPI, a dependency of atmc-triton) can be imported."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


AttackFn = Callable[[Tensor, Tensor], Tensor]  # (x [n, ...], y [n]) -> x_adv, on the points still robust

SUITES = ("auto", "autoattack", "torchattacks", "apgd")
GRADIENT_FREE = ("square",)  # name prefixes of the gradient-free stages (the masking check of SuiteResult)


@dataclass
class SuiteResult:
    """A cascade of attacks on one batch: each stage ran only on the points every earlier stage missed.

    Attributes:
        suite: the label (``"aa-torchattacks"``, ``"autoattack-standard"``, ``"apgd-ce-100+apgd-t-100"``,
            ``"autoattack-standard(steps-5,3targets,square-20)"``, ...).
        x_adv: ``[N, ...]`` the worst case per example: the first point that fooled the model, else ``x``.
        robust: ``[N]`` bool, correct on ``x`` and on every stage's output.
        pred: ``[N]`` the model's predictions on ``x_adv``.
        broken: points each stage broke first, in cascade order (0 for a stage that had nothing to attack).
        gradient_free: the stages that use no gradient (Square): a point they break was missed by every
            gradient stage before them.
    """

    suite: str
    x_adv: Tensor
    robust: Tensor
    pred: Tensor
    broken: dict[str, int] = field(default_factory=dict)
    gradient_free: tuple[str, ...] = ()

    @property
    def gradient_free_broken(self) -> int | None:
        """Points only a gradient-free stage broke (``None``: no such stage ran)."""
        return sum(self.broken[s] for s in self.gradient_free) if self.gradient_free else None


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    stages: Sequence[tuple[str, AttackFn]],
    *,
    suite: str = "cascade",
    robust: Tensor | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> SuiteResult:
    """Run ``stages`` in order, each only on the points still classified correctly; the per-example worst case.

    ``robust`` (``[N]`` bool) starts the cascade from a mask computed elsewhere (e.g. after PGD);
    it is ANDed with clean correctness. Each stage's output is projected to the eps-ball and
    ``[0, 1]`` before it is judged. ``on_stage(name, n_attacked)`` is called before each stage
    (a progress hook). Runs in eval mode; the model is left as found.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> r = cascade(m, x, y, 0.1, [("fgsm", lambda a, b: fgsm(m, a, b, 0.1))])
        >>> list(r.broken), r.robust.shape
        (['fgsm'], torch.Size([4]))
    """
    top = _check(x, y, eps)
    if robust is not None and not (
        isinstance(robust, Tensor) and robust.dtype == torch.bool and robust.shape == y.shape
    ):
        what = f"{robust.dtype} {tuple(robust.shape)}" if isinstance(robust, Tensor) else type(robust).__name__
        raise ValueError(f"robust must be a bool mask [N] like the labels {tuple(y.shape)}, got {what}")
    x = x.detach()
    with attack_context(model, eval_mode=True, top=top):
        pred = _predict(model, x)
        ok = pred == y if robust is None else (pred == y) & robust.to(pred.device)
        x_adv = x.clone()
        broken: dict[str, int] = {}
        for name, attack in stages:
            idx = ok.nonzero().view(-1)
            broken[name] = 0
            if idx.numel() == 0:
                continue
            if on_stage is not None:
                on_stage(name, idx.numel())
            a = _project(attack(x[idx], y[idx]).detach().to(x.dtype), x[idx], eps)
            p = _predict(model, a)
            hit = p != y[idx]
            x_adv[idx[hit]] = a[hit]
            pred[idx[hit]] = p[hit]
            ok[idx[hit]] = False
            broken[name] = int(hit.sum())
    gf = tuple(n for n, _ in stages if n.startswith(GRADIENT_FREE))
    return SuiteResult(suite, x_adv, ok, pred, broken, gf)


def resolve_suite(suite: str, use_autoattack: bool | None, x: Tensor) -> str:
    """The suite ``robust_suite`` runs for these arguments and inputs like ``x`` (``ValueError`` if it cannot).

    fra31's and torchattacks' attacks make float32 tensors: for other dtypes ``"auto"`` picks ``"apgd"`` and an
    explicit ``"autoattack"`` / ``"torchattacks"`` is a ``ValueError``."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if use_autoattack is not None:  # the older switch: True = fra31's AutoAttack, False = the built-in APGD suite
        if suite != "auto":
            raise ValueError("give suite= or use_autoattack=, not both")
        suite = "autoattack" if use_autoattack else "apgd"
    if suite == "autoattack" and not autoattack_available():
        raise ValueError("AutoAttack is not installed: pip install git+https://github.com/fra31/auto-attack")
    if suite == "torchattacks":
        if not torchattacks_available():
            raise ValueError(
                "torchattacks is not installed: pip install 'torchattacks>=3.5' (a dependency of atmc-triton)"
            )
        if x.dim() != 4:
            raise ValueError(f"the torchattacks suite needs image batches [N, C, H, W], got {tuple(x.shape)}")
    if suite in ("autoattack", "torchattacks") and x.dtype != torch.float32:
        raise ValueError(
            f"the {suite} suite needs float32 inputs (its attacks make float32 tensors), got {x.dtype}: "
            "pass x.float() with a float32 model, or suite='apgd' (any floating dtype)"
        )
    if suite == "auto":
        if x.dtype != torch.float32:  # fra31's and torchattacks' attacks draw float32 noise: they fail or cast
            return "apgd"
        if autoattack_available():
            return "autoattack"
        return "torchattacks" if torchattacks_available() and x.dim() == 4 else "apgd"
    return suite


def _n_classes(model: nn.Module, x: Tensor, eval_mode: bool = True, top: int | None = None) -> int:
    """The model's number of outputs for inputs like ``x``, read on its first row, or on a row of zeros for an empty
    batch (so an empty batch gets the same stages and label as any other)."""
    row = x[:1].detach() if x.shape[0] else x.new_zeros((1, *x.shape[1:]))
    with torch.no_grad(), attack_context(model, eval_mode, top=top):
        return _logits_of(model(row)).shape[1]


def _seed_from(generator: torch.Generator | None) -> int:
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, (1,)))
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def suite_stages(
    model: nn.Module,
    x: Tensor,
    suite: str,
    eps: float,
    *,
    steps: int = 100,
    n_target_classes: int = 9,
    square_queries: int = 5000,
    generator: torch.Generator | None = None,
    version: str = "standard",
) -> tuple[str, list[tuple[str, AttackFn]]]:
    """The label and the stages of a resolved suite (``"autoattack"``, ``"torchattacks"`` or ``"apgd"``).

    The class count is read on ``x``'s first row (a row of zeros for an empty batch: the same label either way). Every
    suite runs ``steps`` iterations per gradient attack, ``min(n_target_classes, classes - 1)`` target classes and
    ``square_queries`` Square queries, seeded from ``generator``; a suite short of AutoAttack's standard settings
    (100 / 9 / 5000), or without APGD-T (a model with fewer than 4 classes), says so in its label, e.g.
    ``autoattack-standard(steps-5,3targets,square-20)``,
    ``autoattack-standard(steps-100,2targets,square-5000,no-apgd-t)`` or
    ``aa-torchattacks(apgd-ce-5,apgd-t-5,fab-t-5,square-20)``. Square follows AutoAttack: at 5000 queries its
    schedule of square sizes is the unrescaled one (``resc_schedule=False``, as fra31's AutoAttack runs it); at any
    other count the schedule is rescaled to the queries it has (``resc_schedule=True``), so a short run still shrinks
    its squares."""
    c = _n_classes(model, x)
    k = min(n_target_classes, c - 1)
    std = steps == 100 and square_queries == 5000 and k == min(9, c - 1)
    tk = "" if k == min(9, c - 1) else f"-{k}targets"  # a non-standard target count is in the stage names
    rescale = square_queries != 5000  # AutoAttack's standard Square: 5000 queries, resc_schedule=False
    if suite == "autoattack":
        from autoattack import AutoAttack

        seed = _seed_from(generator)
        dev = str(x.device)
        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, verbose=False, device=dev)
        # the sub-attacks run the suite's settings (AutoAttack's constructor set its standard ones)
        for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
            attack.n_iter = steps
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = k
        adversary.square.n_queries, adversary.square.rescale_schedule = square_queries, rescale
        dropped = [a for a, low in (("apgd-t", 4), ("apgd-dlr", 3)) if c < low and a in adversary.attacks_to_run]
        adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a not in dropped]  # DLR needs the classes
        name = f"autoattack-{version}"
        if not std or dropped:
            name += f"(steps-{steps},{k}targets,square-{square_queries}" + "".join(f",no-{a}" for a in dropped) + ")"
        return name, [(name, lambda a, b: adversary.run_standard_evaluation(a, b, bs=max(1, a.shape[0])))]
    if suite == "torchattacks":
        import torchattacks as ta

        seed = _seed_from(generator)
        stages = [
            (f"apgd-ce-{steps}", ta.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")),
            (
                f"apgd-t-{steps}{tk}",
                ta.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=k + 1),
            ),
            (
                f"fab-t-{steps}{tk}",
                ta.FAB(
                    model,
                    norm="Linf",
                    eps=eps,
                    steps=steps,
                    n_restarts=1,
                    seed=seed,
                    multi_targeted=True,
                    n_classes=k + 1,
                ),
            ),
            (
                f"square-{square_queries}",
                ta.Square(
                    model,
                    norm="Linf",
                    eps=eps,
                    n_queries=square_queries,
                    n_restarts=1,
                    seed=seed,
                    resc_schedule=rescale,
                ),
            ),
        ]
        if c < 4:  # targeted DLR needs 4 classes
            stages = [s for s in stages if not s[0].startswith("apgd-t")]
        full = std and c >= 4  # else the label names the stages that run
        label = "aa-torchattacks" if full else "aa-torchattacks(" + ",".join(n for n, _ in stages) + ")"
        return label, [(n, a) for n, a in stages]
    stages = [(f"apgd-ce-{steps}", lambda a, b: apgd_ce(model, a, b, eps, steps, generator=generator))]
    if c >= 4:
        stages.append(
            (
                f"apgd-t-{steps}{tk}",
                lambda a, b: apgd_dlr(model, a, b, eps, steps, n_target_classes=k, generator=generator),
            )
        )
    return "+".join(n for n, _ in stages), stages


def robust_suite(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    *,
    suite: str = "auto",
    steps: int = 100,
    n_target_classes: int = 9,
    square_queries: int = 5000,
    version: str = "standard",
    use_autoattack: bool | None = None,
    robust: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> SuiteResult:
    """The strongest available robustness check, as a cascade on the points still robust.

    ``suite="auto"`` picks, in order: fra31's ``autoattack`` when installed (one stage,
    ``version``); else torchattacks (PyPI, a dependency of this package) with AutoAttack's standard
    settings: APGD-CE-``steps``, APGD-T-``steps`` over ``n_target_classes`` targets,
    FAB-T-``steps``, Square-``square_queries`` (defaults 100 / 9 / 100 / 5000; images
    ``[N, C, H, W]`` only); else the built-in APGD-CE + APGD-T (:func:`apgd_dlr`); for inputs that are not
    float32, always the built-in one. ``"autoattack"``, ``"torchattacks"`` and ``"apgd"`` force one (a missing
    package or a non-float32 ``x`` for the first two is a ``ValueError``); ``use_autoattack`` (older switch)
    True/False means ``"autoattack"`` / ``"apgd"``. fra31's AutoAttack runs its sub-attacks with these
    ``steps``, ``n_target_classes`` and ``square_queries``. The result names the suite that ran and, when short of
    AutoAttack's standard settings, with what (``SuiteResult.suite``, see :func:`suite_stages`); an empty batch
    gets the same label. The global RNG is left as found (fra31's AutoAttack and torchattacks reseed it; their
    seed here comes from ``generator``, so a seeded ``generator`` repeats the run).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
        >>> r = robust_suite(m, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2]), 0.1, suite="apgd", steps=3)
        >>> r.suite, r.robust.dtype
        ('apgd-ce-3+apgd-t-3', torch.bool)
    """
    _check(x, y, eps)
    if not (_count(steps, 1) and _count(n_target_classes, 1) and _count(square_queries, 1)):
        raise ValueError(
            f"robust_suite needs steps, n_target_classes, square_queries >= 1, got {steps}, {n_target_classes}, "
            f"{square_queries}"
        )
    which = resolve_suite(suite, use_autoattack, x)
    with torch.random.fork_rng(devices=_seeded_gpus(x)):
        label, stages = suite_stages(
            model,
            x,
            which,
            eps,
            steps=steps,
            n_target_classes=n_target_classes,
            square_queries=square_queries,
            generator=generator,
            version=version,
        )
        return cascade(model, x, y, eps, stages, suite=label, robust=robust, on_stage=on_stage)


def robust_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    *,
    steps: int = 100,
    version: str = "standard",
    use_autoattack: bool | None = None,
    generator: torch.Generator | None = None,
    suite: str = "auto",
    **kwargs,
) -> tuple[Tensor, str]:
    """:func:`robust_suite` returning ``(x_adv, suite label)``: the worst case per example (else ``x``).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
        >>> _, how = robust_attack(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1, steps=5, suite="apgd")
        >>> how
        'apgd-ce-5+apgd-t-5'
    """
    r = robust_suite(
        model,
        x,
        y,
        eps,
        suite=suite,
        steps=steps,
        version=version,
        use_autoattack=use_autoattack,
        generator=generator,
        **kwargs,
    )
    return r.x_adv, r.suite
