"""White-box attacks: L-inf PGD, FGSM, WRM (Sinha et al. 2018), APGD-CE (Croce & Hein 2020), AutoAttack.

Conventions (those of torchattacks and AutoAttack):

* inputs ``x [N, ...]`` are in ``[0, 1]``; normalization lives inside the model;
* results are clamped to the L-inf ``eps``-ball around ``x`` and to ``[0, 1]`` (WRM: to ``[0, 1]``);
* attacks never change the model: parameters, their ``.grad`` and ``requires_grad`` flags,
  buffers (BatchNorm running statistics included) and every module's train/eval flag are as
  before the call. By default (``eval_mode=True``) the attack runs the model in eval mode
  (BatchNorm uses running statistics, dropout is off), the usual choice for evaluation;
  ``eval_mode=False`` runs it in the caller's mode (Madry-style training attacks on a model in
  train mode) and puts any buffers a forward pass touched back afterwards.
* ATMC layers materialize ``W = U V + C`` once per attack (:func:`atmc_triton.cached_weights`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atmc_triton.layers import ATMCLayer, cached_weights

__all__ = ["apgd_ce", "attack_context", "autoattack_available", "fgsm", "pgd", "robust_attack", "wrm"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def attack_context(model: nn.Module, eval_mode: bool = True):
    """Run ``model`` for an attack and leave it exactly as found (modes, buffers, grads).

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).train()
        >>> with attack_context(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    saved: list[tuple[Tensor, Tensor]] = []
    if not eval_mode:  # a forward pass in train mode may update buffers (BatchNorm statistics)
        for m in model.modules():
            if isinstance(m, ATMCLayer) or not m.training:
                continue
            saved += [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
    try:
        if eval_mode:
            model.eval()
        with torch.enable_grad(), cached_weights(model):
            yield model
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _check(x: Tensor, y: Tensor, eps: float | None = None) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"attack inputs must be floating point in [0, 1], got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [N] for inputs [N, ...], got {tuple(y.shape)} for {tuple(x.shape)}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("attack inputs must lie in [0, 1] (normalize inside the model)")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


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


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    *,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """L-inf PGD (Madry et al.): ``x' <- Proj(x' + alpha * sign(grad loss))``, ``steps`` times.

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
    _check(x, y, eps)
    if steps < 0 or not alpha >= 0:
        raise ValueError(f"pgd needs steps >= 0 and alpha >= 0, got steps={steps}, alpha={alpha}")
    if noise is not None and (not random_start or noise.shape != x.shape):
        raise ValueError(
            f"pgd: noise must have x's shape {tuple(x.shape)} and needs random_start=True, got "
            f"shape {tuple(noise.shape)}, random_start={random_start}"
        )
    loss_fn = loss_fn or F.cross_entropy
    x = x.detach()
    with attack_context(model, eval_mode):
        adv = x.clone()
        if random_start:
            if noise is None:
                noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            adv = (x + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
        for _ in range(steps):
            g = _input_grad(model, adv, y, loss_fn)
            adv = _project(adv.detach() + alpha * g.sign(), x, eps).detach()
    return adv


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, eval_mode: bool = True) -> Tensor:
    """FGSM (Goodfellow et al.): one step ``x + eps * sign(grad CE)``, clamped to ``[0, 1]``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> fgsm(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1).shape
        torch.Size([2, 1, 2, 2])
    """
    return pgd(model, x, y, eps, eps, 1, random_start=False, eval_mode=eval_mode)


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
    _check(x, y)
    if not (gamma > 0 and steps >= 0 and lr >= 0):
        raise ValueError(f"wrm needs gamma > 0, steps >= 0, lr >= 0, got {gamma}, {steps}, {lr}")
    x = x.detach()
    with attack_context(model, eval_mode):
        adv = x.clone()
        for t in range(steps):
            a = adv.detach().requires_grad_(True)
            objective = F.cross_entropy(model(a), y, reduction="sum") - gamma * (a - x).pow(2).sum()
            (g,) = torch.autograd.grad(objective, a)
            adv = (a.detach() + lr / math.sqrt(t + 1) * g).clamp(0.0, 1.0)
    return adv.detach()


def _apgd_run(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, rho: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """One APGD-CE run; returns ``(x_adv, fooled [N] bool)`` (``x_adv``: a fooling point if any, else max loss)."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    ce = nn.CrossEntropyLoss(reduction="none")

    def loss_grad(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = a.detach().requires_grad_(True)
        logits = model(a)
        loss = ce(logits, y)
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
    loss_prev = torch.zeros_like(loss)  # as the reference: the first step always counts as an increase
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
    return torch.where(fooled.view(view), x_fool, x_best), fooled


def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
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
    With the same seed it reproduces ``torchattacks.APGD(loss="ce")`` (a port of the authors' code).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> bool(((apgd_ce(m, x, torch.zeros(5, dtype=torch.long), 0.1, steps=10) - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    _check(x, y, eps)
    if steps < 1 or n_restarts < 1:
        raise ValueError(f"apgd_ce needs steps >= 1 and n_restarts >= 1, got {steps}, {n_restarts}")
    x = x.detach()
    with attack_context(model, eval_mode):
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        adv = x.clone()
        for _ in range(n_restarts):
            idx = robust.nonzero().view(-1)
            if idx.numel() == 0:
                break
            a, fooled = _apgd_run(model, x[idx], y[idx], eps, steps, rho, generator)
            adv[idx] = a
            robust[idx[fooled]] = False
    return _project(adv, x, eps).detach()


def autoattack_available() -> bool:
    """Whether the ``autoattack`` package (github.com/fra31/auto-attack) can be imported."""
    try:
        import autoattack  # noqa: F401
    except ImportError:
        return False
    return True


def robust_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 100,
    version: str = "standard",
    use_autoattack: bool | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, str]:
    """The strongest available check: AutoAttack when installed (unless ``use_autoattack=False``), else APGD-CE.

    Runs in eval mode. Returns ``(x_adv, method)``, ``method`` being ``"autoattack-<version>"``
    or ``"apgd-ce-<steps>"``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> _, how = robust_attack(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1, steps=5, use_autoattack=False)
        >>> how
        'apgd-ce-5'
    """
    _check(x, y, eps)
    have = autoattack_available()
    if use_autoattack and not have:
        raise ValueError("AutoAttack is not installed: pip install git+https://github.com/fra31/auto-attack")
    if have and use_autoattack is not False:
        from autoattack import AutoAttack

        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, verbose=False, device=str(x.device))
        with attack_context(model, eval_mode=True):
            adv = adversary.run_standard_evaluation(x.detach(), y, bs=max(1, x.shape[0]))
        return _project(adv.detach(), x.detach(), eps), f"autoattack-{version}"
    return apgd_ce(model, x, y, eps, steps, generator=generator), f"apgd-ce-{steps}"
