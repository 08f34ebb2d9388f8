"""The robust compression pipeline as functions: dense adversarial pretraining (DA), ATMC under PGD
training, :func:`atmc_triton.finalize_`, and evaluation (TA, PGD, FGSM, WRM, an AutoAttack-grade suite,
the per-example worst case over all of them, masking and collapse flags, size).

Training loss per batch: ``clean_weight * CE(f(x), y) + (1 - clean_weight) * CE(f(x_pgd), y)``
(the paper: 0.5 for MNIST and CIFAR-10, 0 = adversarial CE only for CIFAR-100 and SVHN).
Training attacks use a random start and, by default, the model's train mode
(``Protocol.train_attack_mode``); evaluation attacks run in eval mode.

Every epoch appends a JSON line to ``<out>/metrics.jsonl`` and writes ``<out>/<stage>.pt``
atomically (model, optimizer, epoch, step, RNG). Data order, augmentation and attack starts
come from generators seeded by ``(seed, stage, epoch)``, so a run stopped after any epoch and
resumed (``resume=True``) ends with bit-identical weights to an uninterrupted one on CPU.

Under ``torchrun`` (:mod:`atmc_triton.distributed`) each stage trains a DDP-wrapped model: every
rank draws the same global batch of ``Schedule.batch_size`` examples and the same attack starts
as one process would, and trains on its strided share; metrics are summed over ranks, only rank 0
writes checkpoints and logs, and every rank resumes from rank 0's checkpoint.

A step whose loss or gradient is NaN/Inf is skipped with a :class:`NonFiniteWarning` (weights,
optimizer state, ADMM's Z, u, masks and codebooks and BatchNorm statistics untouched) and
counted in the epoch's ``nonfinite_steps``; ``max_nonfinite`` such steps in a row raise
:class:`NonFiniteError`, leaving the last complete checkpoint in place.

Example:
    >>> import atmc_triton as at
    >>> from atmc_triton.data import load_dataset
    >>> exp = Experiment("digits_cnn", load_dataset("digits", subset=64, test_subset=32),
    ...                  Protocol(eps=0.1, pgd_steps=2, apgd_steps=5))
    >>> dense, _ = exp.pretrain(Schedule(epochs=1, lr=0.05, batch_size=32))
    >>> model, _ = exp.compress(dense, at.ATMCConfig(ratio=0.05, bits=4), Schedule(epochs=1, lr=0.01))
    >>> exp.evaluate(model).ratio <= 0.05
    True
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from atmc_triton.api import compress_, finalize_
from atmc_triton.attacks import (
    _logits_of,
    _predict,
    attack_context,
    fgsm,
    fgsm_rs,
    n_fgsm,
    pgd,
    resolve_suite,
    robust_suite,
    wrm,
)
from atmc_triton.budget import atmc_layers, dense_bits, size_report
from atmc_triton.checkpoint import (
    CheckpointError,
    atomic_write,
    check_meta,
    config_to_dict,
    get_rng_state,
    load_checkpoint,
    payload_digest,
    remove_partial_writes,
    save_checkpoint,
    set_rng_state,
)
from atmc_triton.config import ATMCConfig, _check_fields, _is_int, _plain_fields
from atmc_triton.data import DataBundle, Split, iterate_batches
from atmc_triton.distributed import (
    agree,
    all_reduce_,
    barrier,
    broadcast_,
    is_distributed,
    is_main,
    rank,
    rank_rng_states,
    set_rank_rng_state,
    shard,
    sync_buffers_,
    world_size,
    wrap_ddp,
)
from atmc_triton.layers import ATMCLayer
from atmc_triton.models import MODELS, build_model, is_model_name
from atmc_triton.optim import ADMM, all_finite

__all__ = [
    "ATTACKS",
    "LOSSES",
    "PROTOCOLS",
    "EvalResult",
    "Experiment",
    "NonFiniteError",
    "NonFiniteWarning",
    "Protocol",
    "Schedule",
    "TRAIN_ATTACKS",
    "collapse_reason",
    "evaluate",
    "fit",
    "model_size",
    "resolve_device",
]

ATTACKS = ("pgd", "fgsm", "wrm", "apgd")
TRAIN_ATTACKS = ("pgd", "fgsm_rs", "n_fgsm")
LR_SCHEDULES = ("cosine", "constant", "step", "onecycle")
LOSSES = ("ce", "trades")
_logger = logging.getLogger("atmc_triton")


class NonFiniteWarning(RuntimeWarning):
    """A training step had a NaN/Inf loss or gradient and was skipped (see :func:`fit`)."""


class NonFiniteError(FloatingPointError):
    """``max_nonfinite`` training steps in a row had a NaN/Inf loss or gradient (see :func:`fit`)."""


@dataclass(frozen=True)
class Protocol:
    """Threat model and attack settings for training and evaluation.

    Args:
        eps: L-inf radius in pixel units (inputs in [0, 1]).
        pgd_steps: PGD steps for training (and evaluation unless ``eval_pgd_steps``).
        pgd_alpha: PGD step; ``None`` = ``2.5 * eps / steps`` (Madry et al.'s rule:
            enough to cross the ball from any start), for training and evaluation each.
        clean_weight: loss = ``clean_weight * CE(clean) + (1 - clean_weight) * CE(adv)``.
        apgd_steps: iterations of APGD-CE, APGD-T and FAB-T in the robustness suite (AutoAttack: 100).
        wrm_gamma, wrm_steps, wrm_lr: WRM evaluation (see :func:`atmc_triton.attacks.wrm`).
        train_attack_mode: ``"train"`` (attack the model in train mode, BatchNorm statistics
            restored afterwards) or ``"eval"``.
        train_attack: the training attack: ``"pgd"`` (``pgd_steps`` steps, the paper's), ``"fgsm_rs"``
            (:func:`atmc_triton.attacks.fgsm_rs`) or ``"n_fgsm"`` (:func:`atmc_triton.attacks.n_fgsm`).
        fgsm_step: the single-step attacks' step in units of the (ramped) eps; ``None`` = the
            authors' (FGSM-RS 1.25, N-FGSM 1).
        fgsm_noise: N-FGSM's start-noise radius ``k`` in units of eps (``None`` = 2); FGSM-RS always
            starts uniformly in the eps-ball.
        eps_warmup_epochs: the training eps ramps linearly from ``eps / steps`` to ``eps`` over the
            steps of this many epochs (evaluation always uses ``eps``).
        loss: ``"ce"`` (the ``clean_weight`` mix above) or ``"trades"`` (Zhang et al. 2019:
            ``CE(f(x), y) + trades_beta * KL(f(x) || f(x'))``, the training attack maximizing that KL;
            ``clean_weight`` is then unused).
        guard_drop: catastrophic-overfitting guard (``None`` = off): after every epoch, PGD accuracy
            (``guard_steps`` steps, eval mode) on a fixed seeded batch of ``guard_size`` training
            examples; when it falls more than ``guard_drop`` below its best, the epoch is rolled
            back to the last good checkpoint and the stage goes on with PGD training of
            ``fallback_steps`` steps (``None`` = ``pgd_steps``; when the training attack is already PGD it
            must be above ``pgd_steps``, a ``ValueError`` otherwise: the same PGD would re-run the epoch to
            the same weights).
    """

    eps: float
    pgd_steps: int
    pgd_alpha: float | None = None
    clean_weight: float = 0.5
    eval_pgd_steps: int | None = None
    apgd_steps: int = 100
    wrm_gamma: float = 0.4
    wrm_steps: int = 15
    wrm_lr: float = 1.0
    train_attack_mode: str = "train"
    train_attack: str = "pgd"
    fgsm_step: float | None = None
    fgsm_noise: float | None = None
    eps_warmup_epochs: float = 0.0
    loss: str = "ce"
    trades_beta: float = 6.0
    guard_drop: float | None = None
    guard_size: int = 512
    guard_steps: int = 10
    fallback_steps: int | None = None

    def __post_init__(self):
        _plain_fields(self)
        _check_fields(
            self,
            ints=(
                "pgd_steps",
                "eval_pgd_steps",
                "apgd_steps",
                "wrm_steps",
                "guard_size",
                "guard_steps",
                "fallback_steps",
            ),
            reals=(
                *("eps", "pgd_alpha", "clean_weight", "wrm_gamma", "wrm_lr", "fgsm_step", "fgsm_noise"),
                *("eps_warmup_epochs", "trades_beta", "guard_drop"),
            ),
        )
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1] (pixel units), got {self.eps}")
        if self.pgd_steps < 0 or (self.eval_pgd_steps is not None and self.eval_pgd_steps < 0):
            raise ValueError("PGD steps must be >= 0")
        if self.pgd_alpha is not None and not self.pgd_alpha > 0:
            raise ValueError(f"pgd_alpha must be > 0, got {self.pgd_alpha}")
        if not 0 <= self.clean_weight <= 1:
            raise ValueError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
        if self.apgd_steps < 1:
            raise ValueError(f"apgd_steps must be >= 1, got {self.apgd_steps}")
        if not self.wrm_gamma > 0:  # checked here, not after training
            raise ValueError(f"wrm_gamma must be a finite number > 0, got {self.wrm_gamma}")
        if self.wrm_steps < 0 or not self.wrm_lr >= 0:
            raise ValueError(f"wrm_steps must be >= 0 and wrm_lr finite and >= 0, got {self.wrm_steps}, {self.wrm_lr}")
        if self.train_attack_mode not in ("train", "eval"):
            raise ValueError(f"train_attack_mode must be 'train' or 'eval', got {self.train_attack_mode!r}")
        if self.train_attack not in TRAIN_ATTACKS:
            raise ValueError(f"train_attack must be one of {', '.join(TRAIN_ATTACKS)}, got {self.train_attack!r}")
        for name in ("fgsm_step", "fgsm_noise"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be a finite number >= 0 (in units of eps), got {v}")
        if not self.eps_warmup_epochs >= 0:
            raise ValueError(f"eps_warmup_epochs must be >= 0, got {self.eps_warmup_epochs}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.trades_beta >= 0:
            raise ValueError(f"trades_beta must be >= 0, got {self.trades_beta}")
        if self.guard_drop is not None and not 0 < self.guard_drop < 1:
            raise ValueError(f"guard_drop must be in (0, 1) (an accuracy drop) or None, got {self.guard_drop}")
        if self.fallback_steps is not None and self.fallback_steps < 1:
            raise ValueError(f"fallback_steps must be >= 1 or None, got {self.fallback_steps}")
        if self.guard_size < 1 or self.guard_steps < 1:
            raise ValueError(f"guard_size and guard_steps must be >= 1, got {self.guard_size}, {self.guard_steps}")
        fallback = self.fallback_steps if self.fallback_steps is not None else self.pgd_steps
        if self.guard_drop is not None and self.train_attack == "pgd" and fallback <= self.pgd_steps:
            # the fallback would be the same (or a weaker) PGD: the rolled-back epoch re-runs with the same seeds to
            # the same weights, so the guard would accept the collapse after paying for the epoch twice
            raise ValueError(
                f"guard_drop with train_attack='pgd' needs fallback_steps > pgd_steps (the PGD to fall back to), got "
                f"fallback_steps={self.fallback_steps} and pgd_steps={self.pgd_steps}"
            )

    @property
    def alpha(self) -> float:
        return self.alpha_for(self.pgd_steps)

    def alpha_for(self, steps: int) -> float:
        """The PGD step for ``steps`` steps: ``pgd_alpha``, else ``2.5 * eps / steps``."""
        return self.pgd_alpha if self.pgd_alpha is not None else 2.5 * self.eps / max(steps, 1)

    def train_eps(self, step: int, steps_per_epoch: int) -> float:
        """The training eps at optimizer step ``step`` (0-based): ``eps`` after the warm-up."""
        ramp = self.eps_warmup_epochs * steps_per_epoch
        return self.eps if ramp <= 0 or step + 1 >= ramp else self.eps * (step + 1) / ramp

    def training_attack(self, fallback: bool = False) -> str:
        """What :func:`fit` runs: ``train_attack``, or ``"fallback"`` (PGD-``fallback_steps``) after the
        guard rolled a stage back."""
        return "fallback" if fallback else self.train_attack

    @property
    def eval_steps(self) -> int:
        return self.pgd_steps if self.eval_pgd_steps is None else self.eval_pgd_steps

    @property
    def eval_alpha(self) -> float:
        return self.alpha_for(self.eval_steps)


PROTOCOLS: dict[str, Protocol] = {
    # 8x8 digits have 17 grey levels: eps 0.2 is about 3 levels; PGD-10 to train, PGD-20 to evaluate
    "digits": Protocol(eps=0.2, pgd_steps=10, eval_pgd_steps=20, clean_weight=0.5),
    # the paper: MNIST eps 0.3 with PGD-16, CIFAR / SVHN eps 4/255 with PGD-7; 0.5 clean + 0.5 adversarial CE
    # for MNIST and CIFAR-10, adversarial CE only for CIFAR-100 and SVHN. Step 2.5 eps / steps (0.047 on MNIST)
    "mnist": Protocol(eps=0.3, pgd_steps=16, clean_weight=0.5),
    # --protocol fast (README "Fast adversarial training"). MNIST: PGD-3 (step 2.5 eps / 3) on the adversarial
    # CE only, eps ramped over 2 epochs, the guard (PGD-10 on 512 training images) falling back to PGD-7; FGSM-RS
    # and N-FGSM were measured and fail at eps 0.3 on LeNet (README). Digits: PGD-3 (FGSM-RS lost 14 points there)
    "mnist_fast": Protocol(
        eps=0.3,
        pgd_steps=3,
        eval_pgd_steps=50,
        clean_weight=0.0,
        eps_warmup_epochs=2,
        guard_drop=0.2,
        fallback_steps=7,
    ),
    "digits_fast": Protocol(
        eps=0.2,
        pgd_steps=3,
        eval_pgd_steps=20,
        clean_weight=0.5,
        eps_warmup_epochs=5,
        guard_drop=0.2,
        guard_size=256,
        fallback_steps=10,
    ),
    "cifar10": Protocol(eps=4 / 255, pgd_steps=7, clean_weight=0.5),
    "cifar100": Protocol(eps=4 / 255, pgd_steps=7, clean_weight=0.0),
    "svhn": Protocol(eps=4 / 255, pgd_steps=7, clean_weight=0.0),
}


@dataclass(frozen=True)
class Schedule:
    """SGD schedule of one stage: ``lr`` decays by ``lr_schedule`` per step: ``"cosine"``, ``"constant"``,
    ``"step"`` (multiplied by ``gamma`` at each of the epochs in ``milestones``, as the public ATMC
    code's ``--decreasing_lr 80,120,150``; a repeated epoch multiplies again, as in ``MultiStepLR``), or
    ``"onecycle"`` (linear from 0 up to ``lr`` over the first 40 % of the steps, then linear down to 0: the cyclic
    schedule of Wong et al. 2020, whose code also gives the last step a rate of 0)."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    lr_schedule: str = "cosine"
    nesterov: bool = False
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        _plain_fields(self)
        _check_fields(
            self, ints=("epochs", "batch_size"), reals=("lr", "momentum", "weight_decay", "gamma"), flags=("nesterov",)
        )
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {self}")
        if not (self.momentum >= 0 and self.weight_decay >= 0):
            raise ValueError(
                f"Schedule: momentum and weight_decay must be >= 0, got {self.momentum}, {self.weight_decay}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        ms = self.milestones
        if not isinstance(ms, Sequence) or isinstance(ms, (str, bytes)) or not all(_is_int(m) for m in ms):
            raise ValueError(f"Schedule.milestones must be a sequence of int epochs, got {ms!r}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be ascending epochs >= 1, got {self.milestones}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "constant" or total <= 0:
            return self.lr
        if self.lr_schedule == "step":  # epoch of this step (0-based), from the uniform steps per epoch
            epoch = step * self.epochs // total if self.epochs else 0
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.lr_schedule == "onecycle":  # step + 1: the first step already trains
            t = (step + 1) / total
            return self.lr * (t / 0.4 if t < 0.4 else max(0.0, (1.0 - t) / 0.6))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _check_int(name: str, v: Any, low: int) -> None:
    if not (_is_int(v) and v >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` (the current GPU) matches ``cuda:N``; otherwise type and index must agree."""
    if a.type == b.type == "cuda" and (a.index is None or b.index is None):
        return torch.cuda.current_device() == (a.index if a.index is not None else b.index)
    return a.type == b.type and a.index == b.index


def _model_device(model: nn.Module, device: str | torch.device | None = None, who: str = "fit") -> torch.device:
    """The device ``who`` runs ``model`` on: ``None``, the model's own (its parameters' and buffers'); else
    :func:`resolve_device` of ``device`` (``"auto"``: CUDA when present), which must be where the model is.

    Raises:
        ValueError: the model's tensors are on several devices, or not on ``device`` (move it: ``model.to(d)``).
    """
    held = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(held) > 1:
        raise ValueError(f"{who}: the model's parameters and buffers are on several devices {sorted(map(str, held))}")
    if device is None:
        return held.pop() if held else resolve_device(None)
    want = resolve_device(device)
    if held and not _same_device(want, (have := held.pop())):
        raise ValueError(f"{who}: the model is on {have} but device={str(device)!r} is {want}; move it (model.to(...))")
    return want


def _seed(seed: int, stage: str, epoch: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{epoch}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _nnz(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    if isinstance(optimizer, ADMM):
        return int(torch.count_nonzero(optimizer.store.w))
    layers = atmc_layers(model)
    if layers:
        return sum(int(torch.count_nonzero(p)) for _, layer in layers for _, p in layer.factors())
    return sum(int(torch.count_nonzero(m.weight)) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def model_size(model: nn.Module) -> dict[str, int]:
    """``size_bits`` (paper convention), ``dense_bits``, ``packed_bytes`` and ``nnz`` of ``model``.

    A model without ATMC layers counts as dense 32-bit weights.
    """
    if atmc_layers(model):
        rep = size_report(model)
        return {
            "size_bits": rep.total_bits,
            "dense_bits": rep.dense_bits,
            "packed_bytes": rep.packed_bytes,
            "nnz": rep.nnz,
        }
    d = dense_bits(model)
    return {"size_bits": d, "dense_bits": d, "packed_bytes": d // 8, "nnz": _nnz(model)}


@dataclass
class EvalResult:
    """Accuracies (fractions in [0, 1]; ``None`` = not run), flags, size and time of one evaluation.

    ``robust_acc`` is the headline: per example, correct on the clean input and under every
    eps-ball attack that ran (PGD, FGSM, each stage of ``suite``), i.e. the minimum over attacks per
    example. WRM is not an eps-ball attack and stays out of it. ``cascade`` holds the points each
    attack broke first, in order (the suite's stages only ran on the points still robust).
    ``label_hist`` / ``clean_hist`` / ``adv_hist`` count the test labels, the clean predictions and
    the predictions on the worst-case inputs per class (:attr:`collapse`).
    """

    n: int
    clean_acc: float
    pgd_acc: float | None = None
    fgsm_acc: float | None = None
    wrm_acc: float | None = None
    robust_acc: float | None = None
    suite: str | None = None
    pgd_label: str | None = None
    cascade: dict[str, int] = field(default_factory=dict)
    gradient_free_broken: int | None = None
    label_hist: list[int] = field(default_factory=list)
    clean_hist: list[int] = field(default_factory=list)
    adv_hist: list[int] = field(default_factory=list)
    size_bits: int = 0
    dense_bits: int = 0
    packed_bytes: int = 0
    nnz: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of this process during the evaluation (all threads)

    @property
    def ratio(self) -> float:
        """Compressed size over the dense 32-bit size (the paper's x-axis)."""
        return self.size_bits / self.dense_bits if self.dense_bits else 1.0

    @property
    def headline(self) -> str:
        """What ``robust_acc`` is the worst case of, e.g. ``"worst of PGD-20, aa-torchattacks"``."""
        parts = [self.pgd_label] if self.pgd_acc is not None and self.pgd_label else []
        parts += ["FGSM"] if self.fgsm_acc is not None else []
        parts += [self.suite] if self.suite else []
        return "worst of " + ", ".join(parts) if parts else "clean"

    @property
    def gradient_masking(self) -> bool:
        """PGD accuracy more than 3 points above the worst case: PGD was likely fooled (by masking or saturation)."""
        return self.pgd_acc is not None and self.robust_acc is not None and self.pgd_acc - self.robust_acc > 0.03

    @property
    def gradient_free_flag(self) -> bool:
        """A gradient-free attack (Square) broke points every gradient attack before it missed: the sign of
        obfuscated gradients."""
        return bool(self.gradient_free_broken)

    @property
    def collapse(self) -> str | None:
        """``None``, or why the model counts as collapsed: on clean or worst-case inputs its most frequent
        predicted class takes more than 2x that class's share of the test labels, or more than 50 %."""
        return collapse_reason(self.label_hist, self.clean_hist, self.adv_hist)

    @property
    def collapsed(self) -> bool:
        return self.collapse is not None

    @property
    def flags(self) -> list[str]:
        """Short warnings for tables: ``masking?``, ``square+k``, ``collapsed (...)``."""
        out = ["masking?"] if self.gradient_masking else []
        out += [f"square+{self.gradient_free_broken}"] if self.gradient_free_flag else []
        out += [f"collapsed ({self.collapse})"] if self.collapsed else []
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": self.ratio,
            "headline": self.headline,
            "gradient_masking": self.gradient_masking,
            "gradient_free_flag": self.gradient_free_flag,
            "collapse": self.collapse,
        }


def collapse_reason(label_hist: Sequence[int], *pred_hists: Sequence[int]) -> str | None:
    """Why a model counts as collapsed, or ``None``.

    For each histogram of predictions (clean, attacked), the most frequent class ``c`` taking
    more than 50 % of the predictions, or more than 2x ``c``'s share of ``label_hist``, flags it.

    Example:
        >>> collapse_reason([5, 5, 5, 5], [3, 5, 6, 6])
        >>> collapse_reason([5, 5, 5, 5], [2, 2, 2, 14])
        'clean: 70% class 3'
    """
    n = sum(label_hist)
    for what, hist in zip(("clean", "attacked"), pred_hists):
        if not hist or not n or len(hist) != len(label_hist):
            continue
        top = max(range(len(hist)), key=lambda i: hist[i])
        share = hist[top] / max(sum(hist), 1)
        if share > 0.5 or share > 2 * label_hist[top] / n:
            return f"{what}: {100 * share:.0f}% class {top}"
    return None


def _bincount(v: Tensor, c: int) -> Tensor:
    """``[c]`` counts of each class in ``v`` (values outside ``[0, c)`` dropped), with no host sync
    (``torch.bincount`` reads ``v.max()`` back on a GPU)."""
    v = v.reshape(-1).to(torch.int64)
    v = torch.where((v < 0) | (v > c), c, v)  # out of range: counted in the dropped last bin
    return torch.zeros(c + 1, dtype=torch.int64, device=v.device).scatter_add_(0, v, torch.ones_like(v))[:c]


def _check_kinds(where: str, **named: tuple[object, type, str]) -> None:
    """Each ``name=(value, kind, hint)``: ``value`` is a ``kind``, else a ``ValueError`` naming it and the hint."""
    for name, (value, kind, hint) in named.items():
        if not isinstance(value, kind):
            a = "an" if kind.__name__[0] in "AEIOU" else "a"
            raise ValueError(f"{where}: {name} must be {a} {kind.__name__} ({hint}), got {type(value).__name__}")


def _check_attack_names(where: str, attacks: object) -> None:
    if isinstance(attacks, str):  # tuple("pgd") is ('p', 'g', 'd'): "unknown attack(s) ['d', 'g', 'p']"
        raise ValueError(
            f"{where}: attacks must be a sequence of names, e.g. ({attacks!r},), got the string {attacks!r}"
        )


def evaluate(
    model: nn.Module,
    split: Split,
    protocol: Protocol,
    *,
    attacks: Sequence[str] = ("pgd", "apgd"),
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    use_autoattack: bool | None = None,
    suite: str = "auto",
    square_queries: int = 5000,
    n_target_classes: int = 9,
    progress: bool = False,
    distributed: bool = False,
) -> EvalResult:
    """Clean accuracy, each of ``attacks`` and the per-example worst case on ``split``, in eval mode.

    ``attacks``: ``pgd`` (PGD-``eval_steps``), ``fgsm``, ``wrm``, ``apgd`` (the robustness suite of
    :func:`atmc_triton.attacks.robust_suite`: ``suite`` / ``use_autoattack`` choose it, AutoAttack-grade
    by default). The suite runs as a cascade on the points PGD and FGSM did not break;
    ``robust_acc`` is the worst case over every eps-ball attack (see :class:`EvalResult`, which also
    carries the masking and collapse flags). The model's train/eval mode is restored.
    ``distributed``: every rank of the running process group calls this together; each
    evaluates its strided share of ``split`` (attack starts seeded per rank) and the counts are
    summed, so all ranks return the result for the whole split. ``device``: ``None`` runs where the model
    is; any other must be the model's device (``ValueError`` otherwise, before any work).
    """
    _check_kinds(
        "evaluate",
        split=(split, Split, "a DataBundle's .test or .train"),
        protocol=(protocol, Protocol, "e.g. atmc_triton.PROTOCOLS['digits']"),
    )
    _check_attack_names("evaluate", attacks)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attack(s) {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    _check_int("evaluate: batch_size", batch_size, 1)
    device = _model_device(model, device, "evaluate")
    if "apgd" in attacks:  # a suite that cannot run fails before any attack does
        resolve_suite(suite, use_autoattack, split.x[:1].float())
    t0, c0 = time.perf_counter(), time.process_time()
    n_all = len(split)
    world = world_size() if distributed else 1
    me = rank() if world > 1 else 0
    modes = [(m, m.training) for m in model.modules()]  # each module's own (a frozen BatchNorm stays in eval)
    model.eval()
    whole = split
    if world > 1:
        split = Split(shard(split.x, me, world), shard(split.y, me, world))
    gen = torch.Generator(device).manual_seed(_seed(seed, "eval", me, "attack"))
    keys = ("clean", "robust", *(a for a in ATTACKS if a in attacks and a != "apgd"))
    counts = dict.fromkeys(keys, 0)
    # pass 1 counts on the model's device, read back once after it (no host sync per batch)
    tally = {k: torch.zeros((), dtype=torch.int64, device=device) for k in (*keys, "PGD", "FGSM")}
    p = protocol
    pgd_label = f"PGD-{p.eval_steps}"
    broken: dict[str, int] = {}
    label = None
    gf: int | None = None
    hists: Tensor | None = None  # [3, C]: labels, clean predictions, worst-case predictions
    bar = tqdm(
        total=math.ceil(len(split) / batch_size),
        desc="eval",
        leave=False,
        disable=None if progress else True,
    )
    oks, worsts = [], []
    try:
        if n_all:  # the class count from one row of the whole split: a rank with an empty share still sums [2, C]
            with torch.no_grad():
                classes = _logits_of(model(whole.take(torch.arange(1), device)[0])).shape[1]
            hists = torch.zeros(2, classes, dtype=torch.int64, device=device)
        # pass 1, per batch: clean, PGD, FGSM (they also start the cascade), WRM; the histograms
        for x, y in iterate_batches(split, batch_size, device=device):
            bar.set_postfix_str("clean", refresh=False)
            clean = _predict(model, x)
            worst = clean.clone()
            ok = clean == y
            tally["clean"] += ok.sum()
            for name in ("pgd", "fgsm"):
                if name not in attacks:
                    continue
                bar.set_postfix_str(name)
                if name == "pgd":
                    adv = pgd(model, x, y, p.eps, p.eval_alpha, p.eval_steps, generator=gen)
                else:
                    adv = fgsm(model, x, y, p.eps)
                a = _predict(model, adv)
                tally[name] += (a == y).sum()
                hit = ok & (a != y)
                worst = torch.where(hit, a, worst)
                ok &= ~hit
                tally["PGD" if name == "pgd" else "FGSM"] += hit.sum()
            if "wrm" in attacks:
                bar.set_postfix_str("wrm")
                tally["wrm"] += (_predict(model, wrm(model, x, y, p.wrm_gamma, p.wrm_steps, p.wrm_lr)) == y).sum()
            hists += torch.stack([_bincount(y, classes), _bincount(clean, classes)])
            oks.append(ok)
            worsts.append(worst)
            bar.update(1)
        # the one host read of pass 1: its counts, and each example's outcome (pass 2 indexes them on the host)
        ok = torch.cat(oks).cpu() if oks else torch.zeros(0, dtype=torch.bool)
        worst = torch.cat(worsts).cpu() if worsts else torch.zeros(0, dtype=torch.int64)
        hists = None if hists is None else hists.cpu()
        got = dict(zip(tally, torch.stack(list(tally.values())).tolist()))
        for k in counts:
            counts[k] = got[k]
        if "pgd" in attacks:
            broken[pgd_label] = got["PGD"]
        if "fgsm" in attacks:
            broken["FGSM"] = got["FGSM"]
        # pass 2: the suite as a cascade on the points still robust, re-batched (fewer, fuller batches)
        if "apgd" in attacks:
            todo = ok.nonzero().view(-1)
            bar.reset(total=max(math.ceil(todo.numel() / batch_size), 1))
            bar.set_description("eval: suite")
            for i in range(0, max(todo.numel(), 1), batch_size):
                sel = todo[i : i + batch_size]
                x, y = split.take(sel, device)
                r = robust_suite(
                    model,
                    x,
                    y,
                    p.eps,
                    suite=suite,
                    steps=p.apgd_steps,
                    n_target_classes=n_target_classes,
                    square_queries=square_queries,
                    use_autoattack=use_autoattack,
                    generator=gen,
                    on_stage=lambda s, k: bar.set_postfix_str(f"{s} on {k}"),
                )
                label = r.suite
                ok[sel] = r.robust.cpu()
                worst[sel] = r.pred.cpu()
                for k, v in r.broken.items():
                    broken[k] = broken.get(k, 0) + v
                if r.gradient_free_broken is not None:
                    gf = (gf or 0) + r.gradient_free_broken
                bar.update(1)
        counts["robust"] = int(ok.sum())
        if hists is not None:
            hists = torch.cat([hists, _bincount(worst, hists.shape[1])[None]])
    finally:
        bar.close()
        for m, mode in modes:
            m.training = mode
    if world > 1:
        flat = [*counts.values(), *broken.values(), gf or 0]
        total = all_reduce_(torch.tensor(flat, dtype=torch.int64, device=device)).tolist()
        counts = dict(zip(counts, total[: len(counts)]))
        broken = dict(zip(broken, total[len(counts) : len(counts) + len(broken)]))
        gf = None if gf is None else total[-1]
        if hists is not None:
            hists = all_reduce_(hists.to(device)).cpu()
    n = max(n_all, 1)
    acc = {k: v / n for k, v in counts.items()}
    attacked = any(a in attacks for a in ("pgd", "fgsm", "apgd"))
    hl = hists.tolist() if hists is not None else [[], [], []]
    return EvalResult(
        n_all,
        acc["clean"],
        acc.get("pgd"),
        acc.get("fgsm"),
        acc.get("wrm"),
        robust_acc=acc["robust"] if attacked else None,
        suite=label,
        pgd_label=pgd_label if "pgd" in attacks else None,
        cascade=broken,
        gradient_free_broken=gf,
        label_hist=hl[0],
        clean_hist=hl[1],
        adv_hist=hl[2] if attacked else [],
        **model_size(model),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
    )


def _log(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _drop_log(path: Path | None, stage: str, from_epoch: int) -> None:
    """Remove ``stage`` records of epochs > ``from_epoch`` (a fresh or resumed stage rewrites them),
    and any line a killed run left half-written; the file is replaced atomically."""
    if path is None or not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and not (rec.get("stage") == stage and rec.get("epoch", 0) > from_epoch):
            keep.append(ln + "\n")
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load_state_dict errors span several)."""
    text = " ".join(str(e).split())
    return (text[:limit] + " ...") if len(text) > limit else (text or type(e).__name__)


def _state_digest(model: nn.Module) -> str:
    """``"sha256:<16 hex>"`` of ``model``'s state dict (names, dtypes, shapes and bytes)."""
    return "sha256:" + payload_digest({"state": model.state_dict()})[:16]


def _nonfinite(loss: Tensor, params: list[Tensor]) -> bool:
    """Whether the loss or any gradient is NaN/Inf on any rank (one host sync)."""
    bad = ~torch.isfinite(loss.detach()).all()
    ok = all_finite(q.grad for q in params)
    if ok is not None:
        bad = bad | ~ok.to(bad.device)
    if is_distributed():
        flag = all_reduce_(bad.reshape(1).to(torch.int32), "max")
        return bool(flag[0])
    return bool(bad)


def _step(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()``; False when ADMM refused a non-finite update (it then wrote nothing)."""
    try:
        optimizer.step()
    except FloatingPointError:
        if not isinstance(optimizer, ADMM):
            raise
        return False
    return True


class _BufferGuard:
    """Copies of the buffers a training forward pass may change (BatchNorm statistics; ATMC layers'
    buffers change only in ``optimizer.step``), to undo the forward pass of a skipped step."""

    def __init__(self, model: nn.Module):
        self.bufs = [b for m in model.modules() if not isinstance(m, ATMCLayer) for b in m.buffers(recurse=False)]
        self.saved = [b.detach().clone() for b in self.bufs]

    @torch.no_grad()
    def save(self) -> None:
        if self.bufs:
            torch._foreach_copy_(self.saved, self.bufs)

    @torch.no_grad()
    def restore(self) -> None:
        if self.bufs:
            torch._foreach_copy_(self.bufs, self.saved)


def _train_attack(
    model: nn.Module, x: Tensor, y: Tensor, p: Protocol, attack: str, eps: float, noise: Tensor, loss_fn
) -> Tensor:
    """The training attack ``attack`` at radius ``eps`` (the ramped eps) from the start ``noise``."""
    kw = {"loss_fn": loss_fn, "eval_mode": p.train_attack_mode == "eval", "noise": noise}
    if attack in ("pgd", "fallback"):
        steps = p.pgd_steps if attack == "pgd" or p.fallback_steps is None else p.fallback_steps
        alpha = p.alpha_for(steps)
        alpha = alpha if eps == p.eps else alpha * eps / p.eps
        return pgd(model, x, y, eps, alpha, steps, random_start=True, **kw)
    if attack == "fgsm_rs":
        step = 1.25 if p.fgsm_step is None else p.fgsm_step
        return fgsm_rs(model, x, y, eps, step * eps, **kw)
    step = 1.0 if p.fgsm_step is None else p.fgsm_step
    k = 2.0 if p.fgsm_noise is None else p.fgsm_noise
    return n_fgsm(model, x, y, eps, step * eps, k, **kw)


def _trades_kl(logits_adv: Tensor, probs_clean: Tensor) -> Tensor:
    """TRADES' robust term ``KL(p_clean || p_adv)``, summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, 1), probs_clean, reduction="batchmean")


def _guard_accuracy(model: nn.Module, x: Tensor, y: Tensor, p: Protocol, seed: int, tag: str) -> tuple[float, float]:
    """Clean and PGD-``guard_steps`` accuracy (eval mode, seeded start) on the guard batch ``x [N, ...]``, ``y [N]``.
    Under a process group every rank gets rank 0's figures: the rollback decision is one for all ranks, even if
    their arithmetic differed in the last bit (a rank rolling back alone would leave the others in a collective)."""
    gen = torch.Generator(x.device).manual_seed(_seed(seed, tag, 0, "guard"))
    adv = pgd(model, x, y, p.eps, 2.5 * p.eps / p.guard_steps, p.guard_steps, generator=gen)
    with torch.no_grad(), attack_context(model, True):
        acc = torch.stack([(_predict(model, x) == y).float().mean(), (_predict(model, adv) == y).float().mean()])
    broadcast_([acc])
    clean, robust = acc.tolist()
    return clean, robust


EVAL_ONLY = ("eval_pgd_steps", "apgd_steps", "wrm_gamma", "wrm_steps", "wrm_lr")
"""The :class:`Protocol` fields that no training step reads: a resumed stage may change them."""


# meta keys a checkpoint records since a later version: a resume from an earlier checkpoint, which lacks them,
# skips their check (and logs so) rather than refusing the run
LATER_META = ("dense_model",)


def _drop(d: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _training_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without the protocol's :data:`EVAL_ONLY` fields: what a resumed stage must agree with."""
    p = meta.get("protocol")
    if not isinstance(p, dict):
        return meta
    return {**meta, "protocol": {k: v for k, v in p.items() if k not in EVAL_ONLY}}


def _changed_eval_settings(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"apgd_steps 3 -> 5, ..."`` for the :data:`EVAL_ONLY` fields that differ between two metas ('' if none)."""
    a, b = old.get("protocol"), new.get("protocol")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in EVAL_ONLY if a.get(k) != b.get(k))


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, run: int) -> dict[str, Any]:
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "step": step,
        "run": run,
        "rng": get_rng_state(),
    }


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataBundle,
    protocol: Protocol,
    schedule: Schedule,
    *,
    stage: str,
    adversarial: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint: Path | None = None,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    log: Path | None = None,
    progress: bool = False,
    eval_size: int = 1000,
    on_epoch_end: Callable[[int], None] | None = None,
    max_nonfinite: int = 5,
) -> dict[str, Any]:
    """Train ``model`` in place for ``schedule.epochs`` epochs; returns the last epoch's metrics.

    With ``checkpoint``, saves it after every epoch; with ``resume`` and an existing checkpoint
    whose ``meta`` equals ``meta``, continues after its last epoch (a finished stage is a no-op). The
    protocol's evaluation-only settings (:data:`EVAL_ONLY`) may differ: they change what is logged, not a weight.
    ``on_epoch_end(epoch)`` runs after each saved epoch (epochs count from 1). ``device``: ``None`` trains where
    the model is; any other must be the model's device (``ValueError`` otherwise, before any work).

    Under a process group of N ranks (torchrun), every rank calls ``fit`` with the same
    arguments: ``model`` is wrapped in DDP (:func:`atmc_triton.distributed.wrap_ddp`) for the
    stage, ``schedule.batch_size`` is the global batch (divisible by N), and only rank 0 writes
    ``checkpoint`` and ``log`` (every rank reads ``checkpoint`` on resume: with several nodes it
    must be on a shared filesystem).

    A NaN/Inf loss or gradient skips the step (:class:`NonFiniteWarning`; nothing is updated, the
    batch is consumed); ``max_nonfinite`` such steps in a row raise :class:`NonFiniteError`.

    With ``protocol.guard_drop`` (adversarial stages), each epoch ends with the guard's clean and PGD
    accuracy on a fixed batch of training examples (logged as ``guard_acc`` / ``guard_pgd_acc``). An
    epoch whose PGD accuracy falls more than ``guard_drop`` below the best so far (catastrophic
    overfitting of a single-step attack) is discarded: model, optimizer, step and RNG go back to the
    end of the last accepted epoch, a ``{"event": "rollback"}`` record is logged, and the stage
    re-runs that epoch and finishes with PGD-``fallback_steps`` training. Checkpoints hold accepted
    epochs only, so a resumed run continues exactly as an uninterrupted one.
    """
    _check_kinds(
        "fit",
        optimizer=(optimizer, torch.optim.Optimizer, "e.g. atmc_triton.ADMM(model, cfg) or torch.optim.SGD"),
        data=(data, DataBundle, "atmc_triton.load_dataset(...)"),
        protocol=(protocol, Protocol, "e.g. atmc_triton.PROTOCOLS['digits']"),
        schedule=(schedule, Schedule, "e.g. Schedule(epochs=10, lr=0.05)"),
    )
    device = _model_device(model, device, "fit")
    if not (isinstance(max_nonfinite, int) and max_nonfinite >= 1):
        raise ValueError(f"max_nonfinite must be an int >= 1, got {max_nonfinite!r}")
    world, main = world_size(), is_main()
    if schedule.batch_size % world:
        raise ValueError(
            f"the batch size {schedule.batch_size} is global: it must be divisible by the {world} processes"
        )
    n_train = len(data.train)
    if world > 1 and n_train < schedule.batch_size and n_train % world:  # the one short batch an epoch trains on
        raise ValueError(
            f"the training split has {n_train} rows, fewer than the batch size {schedule.batch_size}: each epoch "
            f"is one batch of {n_train} rows, which the {world} processes cannot share equally (DDP's average of "
            f"unequal shares is not the one-process step); use a row count divisible by {world}, or >= the batch size"
        )
    meta = {
        **(meta or {}),
        "stage": stage,
        "adversarial": adversarial,
        "protocol": asdict(protocol),
        "schedule": asdict(schedule),
        "seed": seed,
    }
    start, step, run = 0, 0, 0  # run: non-finite steps in a row
    fallback, best = False, None  # the guard: rolled back to PGD training, best guard PGD accuracy
    if checkpoint is not None and main:
        remove_partial_writes(checkpoint)  # what a run killed while writing left behind
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        ck = load_checkpoint(checkpoint)
        want = _training_settings(meta)
        unverified = [k for k in LATER_META if k in want and k not in ck["meta"]]  # recorded since that run
        try:
            check_meta({**ck, "meta": _training_settings(ck["meta"])}, checkpoint, **_drop(want, unverified))
        except CheckpointError as e:
            raise CheckpointError(f"{e}; resume with that run's settings, or start over without resuming") from None
        try:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} does not fit this model or optimizer: {_one_line(e)}"
            ) from None
        start, step = ck["epoch"], ck["step"]
        run = int(ck["extra"].get("nonfinite_run", 0))
        fallback, best = bool(ck["extra"].get("fallback", False)), ck["extra"].get("guard_best")
        set_rng_state(ck["rng"])
        set_rank_rng_state(ck["extra"].get("rng_ranks"))  # each rank's own generators (rank 0's just above)
        if main and start:
            _logger.info("resuming %s from %s after epoch %d", stage, checkpoint, start)
        if main and unverified:
            _logger.warning(
                "resuming %s from %s, written before checkpoints recorded %s: not verified",
                stage,
                checkpoint,
                ", ".join(unverified),
            )
        changed = _changed_eval_settings(ck["meta"], meta)
        if main and changed:
            _logger.info(
                "resuming %s with evaluation settings changed (logged epochs before differ): %s", stage, changed
            )
    agree(start, f"completed epochs of stage {stage!r} to resume from")
    if main:
        _drop_log(log, stage, start)
    train = data.train.to(device) if device.type == "cuda" else data.train
    test = data.test.subset(eval_size, seed) if eval_size else None
    spe = len(train) // schedule.batch_size if len(train) >= schedule.batch_size else 1
    total = spe * schedule.epochs
    p, cw = protocol, protocol.clean_weight
    net = wrap_ddp(model, device) if world > 1 else model  # the attacks run on the bare model
    params = [q for q in model.parameters() if q.requires_grad]
    guard = _BufferGuard(model)
    trades = protocol.loss == "trades"
    watch = None  # the guard batch (x, y), taken once
    if adversarial and protocol.guard_drop is not None:
        held = data.train.subset(protocol.guard_size, seed)
        watch = held.take(torch.arange(len(held)), device)
    good = _snapshot(model, optimizer, step, run) if watch is not None else None
    last: dict[str, Any] = {}
    epoch = start
    while epoch < schedule.epochs:
        t0, c0 = time.perf_counter(), time.process_time()
        attack = protocol.training_attack(fallback)
        gen = torch.Generator().manual_seed(_seed(seed, stage, epoch, "data"))
        atk_gen = torch.Generator(device).manual_seed(_seed(seed, stage, epoch, "attack"))
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, clean correct, adv correct
        seen = skipped = 0
        bar = tqdm(
            iterate_batches(train, schedule.batch_size, generator=gen, spec=data.spec, device=device, drop_last=True),
            total=spe,
            desc=f"{stage} {epoch + 1}/{schedule.epochs}",
            leave=False,
            disable=None if progress and main else True,
        )  # None: bars only on a terminal
        for i, (x, y) in enumerate(bar):
            lr = schedule.lr_at(step, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            rows = y.shape[0]
            x, y = shard(x), shard(y)  # this rank's share of the global batch (all of it for one process)
            x_adv = probs = loss_fn = None
            if adversarial and (cw < 1 or trades):  # clean_weight 1 is natural training: no attack needed
                # the random start is drawn for the whole global batch (the generator advances as in one
                # process) and sharded like it, so N ranks attack their shares as one process attacks the batch
                noise = shard(torch.rand((rows, *x.shape[1:]), generator=atk_gen, device=x.device, dtype=x.dtype))
                if trades:  # the attack maximizes KL(p_clean || p_adv), TRADES' inner problem
                    # no_grad inside attack_context, which enables grad: the target needs no graph
                    with attack_context(model, p.train_attack_mode == "eval"), torch.no_grad():
                        probs = F.softmax(model(x), 1)
                    loss_fn = lambda logits, _y, q=probs: _trades_kl(logits, q)  # noqa: E731
                x_adv = _train_attack(model, x, y, p, attack, p.train_eps(step, spe), noise, loss_fn)
            optimizer.zero_grad(set_to_none=True)
            guard.save()
            loss = torch.zeros((), device=device)
            logits_c = logits_a = None
            if not adversarial or cw > 0 or trades:
                logits_c = _logits_of(net(x))
                w = 1.0 if trades or not adversarial else cw
                loss = loss + w * F.cross_entropy(logits_c, y)
            if x_adv is not None:
                logits_a = _logits_of(net(x_adv))
                if trades:
                    loss = loss + p.trades_beta * _trades_kl(logits_a, F.softmax(logits_c, 1))
                else:
                    loss = loss + (1.0 - cw) * F.cross_entropy(logits_a, y)
            loss.backward()
            step += 1
            if _nonfinite(loss, params) or not _step(optimizer):
                guard.restore()
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                run += 1
                if run >= max_nonfinite:
                    where = f"; the last complete checkpoint is {checkpoint}" if checkpoint is not None else ""
                    raise NonFiniteError(
                        f"{run} training steps in a row had a NaN/Inf loss or gradient ({stage} "
                        f"epoch {epoch + 1}, step {step}); stopped, nothing updated since the "
                        f"last finite step{where}. Lower the learning rate or check the data."
                    )
                if main:
                    warnings.warn(
                        f"{stage} epoch {epoch + 1} step {step}: NaN/Inf loss or gradient, step skipped "
                        f"({run} in a row; {max_nonfinite} stop the run)",
                        NonFiniteWarning,
                        stacklevel=2,
                    )
                continue
            run = 0
            seen += y.numel()
            with torch.no_grad():
                sums[0] += loss.detach() * y.numel()
                if logits_c is not None:
                    sums[1] += (logits_c.argmax(1) == y).sum()
                if logits_a is not None:
                    sums[2] += (logits_a.argmax(1) == y).sum()
            if progress and main and (i % 10 == 0 or i == spe - 1):  # one device sync every 10 steps
                avg = (sums / max(seen, 1)).tolist()
                post = {"loss": f"{avg[0]:.3f}"}
                if logits_c is not None:
                    post["acc"] = f"{avg[1]:.3f}"
                if logits_a is not None:
                    post["adv_acc"] = f"{avg[2]:.3f}"
                post["nnz"] = _nnz(model, optimizer)
                bar.set_postfix(post, refresh=False)
        bar.close()
        if world > 1:
            sync_buffers_(model)  # rank 0's BatchNorm statistics everywhere (each rank's last forward updated its own)
            # sum the shares: loss * n and correct counts, and the examples seen
            both = all_reduce_(torch.cat([sums, sums.new_tensor([seen])]))
            sums, seen = both[:3], int(both[3])
        avg = (sums / max(seen, 1)).tolist()
        last = {
            "stage": stage,
            "epoch": epoch + 1,
            "step": step,
            "lr": schedule.lr_at(max(step - 1, 0), total),  # the epoch's last step's (not the next one's)
            "loss": avg[0],
            "train_acc": avg[1] if not adversarial or cw > 0 or trades else None,
            "train_adv_acc": avg[2] if adversarial and (cw < 1 or trades) else None,
            "nnz": _nnz(model, optimizer),
            "nonfinite_steps": skipped,
            "train_seconds": time.perf_counter() - t0,
            "train_cpu_seconds": time.process_time() - c0,  # this process, all its threads
        }
        if adversarial and (cw < 1 or trades):
            last.update(train_attack=attack, train_eps=protocol.train_eps(step - 1, spe))
        if watch is not None:
            g_acc, g_pgd = _guard_accuracy(model, *watch, protocol, seed, f"{stage}/{epoch}")
            last.update(guard_acc=g_acc, guard_pgd_acc=g_pgd)  # the guard is part of training: timed with it
            last.update(train_seconds=time.perf_counter() - t0, train_cpu_seconds=time.process_time() - c0)
            if not fallback and best is not None and g_pgd < best - protocol.guard_drop:
                if main:  # catastrophic overfitting: back to the last accepted epoch, then PGD training
                    _log(log, {**last, "event": "rollback", "guard_best": best})
                    warnings.warn(
                        f"{stage} epoch {epoch + 1}: guard PGD accuracy fell from {best:.3f} to {g_pgd:.3f} "
                        f"(catastrophic overfitting of {attack}); rolled back to epoch {epoch}, training "
                        f"on with PGD-{protocol.fallback_steps or protocol.pgd_steps}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                model.load_state_dict(good["model"])
                optimizer.load_state_dict(good["optimizer"])
                step, run, fallback = good["step"], good["run"], True
                set_rng_state(good["rng"])
                continue
            best = g_pgd if best is None else max(best, g_pgd)
        if test is not None and len(test):
            ev = evaluate(model, test, protocol, attacks=("pgd",), device=device, seed=seed, distributed=world > 1)
            last.update(test_acc=ev.clean_acc, test_pgd_acc=ev.pgd_acc, test_n=ev.n)
        rng_ranks = rank_rng_states() if checkpoint is not None and world > 1 else None  # (every rank takes part)
        if main:
            _log(log, last)
            if checkpoint is not None:
                extra = {"nonfinite_run": run, "fallback": fallback, "guard_best": best}
                save_checkpoint(
                    checkpoint,
                    model=model,
                    optimizer=optimizer,
                    meta=meta,
                    epoch=epoch + 1,
                    step=step,
                    extra=extra if rng_ranks is None else {**extra, "rng_ranks": rng_ranks},
                )
        barrier()  # the checkpoint is complete before any rank goes on (or fails)
        if progress and main:
            shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in last.items() if v is not None}
            tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()), file=sys.stderr)
        if watch is not None:
            good = _snapshot(model, optimizer, step, run)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
        epoch += 1
    model.eval()
    return last


@dataclass
class Experiment:
    """One model on one dataset under one protocol: pretrain, compress, evaluate, with checkpoints in ``out``.

    Args:
        model_name: a key of :data:`atmc_triton.models.MODELS`, or ``tv:NAME`` / ``timm:NAME``.
        data: the dataset (:func:`atmc_triton.data.load_dataset`).
        out: directory for ``<stage>.pt`` checkpoints and ``metrics.jsonl`` (``None``: keep nothing).
        eval_size: test examples for the per-epoch check (0 = none).
        attacks: what :meth:`evaluate` runs besides clean accuracy.
        suite, square_queries, n_target_classes, use_autoattack: the robustness suite (:func:`evaluate`).
        max_nonfinite: NaN/Inf training steps in a row that stop a stage (see :func:`fit`).
        channels_last: build models in ``torch.channels_last`` memory format (Caffe-LeNet trains
            1.7-2x faster on one CPU thread so; the values and checkpoints are the same).

    Under torchrun every rank builds the same ``Experiment``; stages train with DDP, evaluations
    are sharded over the ranks, and only rank 0 writes files.
    """

    model_name: str
    data: DataBundle
    protocol: Protocol
    out: Path | None = None
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = False
    resume: bool = False
    eval_size: int = 1000
    eval_batch_size: int = 256
    attacks: tuple[str, ...] = ("pgd", "apgd")
    use_autoattack: bool | None = None
    suite: str = "auto"
    square_queries: int = 5000
    n_target_classes: int = 9
    channels_last: bool = False
    on_epoch_end: Callable[[str, int], None] | None = field(default=None, repr=False)
    max_nonfinite: int = 5

    def __post_init__(self):
        if not is_model_name(self.model_name):
            raise ValueError(
                f"Experiment: unknown model {self.model_name!r}; choose from {', '.join(MODELS)}, tv:NAME or timm:NAME"
            )
        if not isinstance(self.protocol, Protocol):
            raise ValueError(f"Experiment: protocol must be a Protocol, got {type(self.protocol).__name__}")
        _check_kinds("Experiment", data=(self.data, DataBundle, "atmc_triton.load_dataset(...)"))
        _check_attack_names("Experiment", self.attacks)
        self.attacks = tuple(self.attacks)
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"Experiment: unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
        _plain_fields(self)
        _check_fields(self, ints=("seed",), flags=("progress", "resume", "channels_last"))
        for name, low in (("eval_size", 0), ("eval_batch_size", 1), ("square_queries", 1)):
            _check_int(f"Experiment.{name}", getattr(self, name), low)
        _check_int("Experiment.n_target_classes", self.n_target_classes, 1)
        _check_int("Experiment.max_nonfinite", self.max_nonfinite, 1)
        self.device = resolve_device(self.device)
        self.out = Path(self.out) if self.out is not None else None
        if "apgd" in self.attacks:  # the suite is checked now, not at the first evaluation after hours of training
            resolve_suite(self.suite, self.use_autoattack, torch.empty(1, *self.data.spec.in_shape))

    @property
    def identity(self) -> dict[str, Any]:
        s = self.data.spec
        return {
            "model": self.model_name,
            "dataset": self.data.name,
            "num_classes": s.num_classes,
            "in_shape": list(s.in_shape),
        }

    def new_model(self) -> nn.Module:
        """A freshly initialized model (seeded by ``seed``), on the experiment's device."""
        torch.manual_seed(self.seed)
        s = self.data.spec
        model = build_model(self.model_name, s.num_classes, s.in_shape, s.mean, s.std).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def path(self, stage: str) -> Path | None:
        return self.out / f"{stage}.pt" if self.out is not None else None

    def _fit(self, model, opt, schedule, stage, adversarial, meta) -> None:
        hook = (lambda e: self.on_epoch_end(stage, e)) if self.on_epoch_end else None
        fit(
            model,
            opt,
            self.data,
            self.protocol,
            schedule,
            stage=stage,
            adversarial=adversarial,
            seed=self.seed,
            device=self.device,
            checkpoint=self.path(stage),
            meta=meta,
            resume=self.resume,
            log=self.out / "metrics.jsonl" if self.out else None,
            progress=self.progress,
            eval_size=self.eval_size,
            on_epoch_end=hook,
            max_nonfinite=self.max_nonfinite,
        )

    def pretrain(
        self, schedule: Schedule, *, adversarial: bool = True, stage: str | None = None
    ) -> tuple[nn.Module, float]:
        """Dense training (PGD adversarial, or natural with ``adversarial=False``); returns (model, seconds)."""
        t0 = time.perf_counter()
        stage = stage or ("dense" if adversarial else "natural")
        model = self.new_model()
        opt = torch.optim.SGD(
            model.parameters(),
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            nesterov=schedule.nesterov,
        )
        self._fit(model, opt, schedule, stage, adversarial, {**self.identity, "atmc": None})
        return model, time.perf_counter() - t0

    def load(self, path: str | Path, *, stages: Sequence[str] | None = None) -> nn.Module:
        """Rebuild a model from a checkpoint of this model/dataset (ATMC layers included), on the device."""
        ck = load_checkpoint(path)
        check_meta(ck, path, **self.identity)
        if stages is not None and ck["meta"].get("stage") not in stages:
            raise ValueError(
                f"checkpoint {str(path)!r} is a {ck['meta'].get('stage')!r} checkpoint, "
                f"expected one of {', '.join(stages)}"
            )
        model = self.new_model()
        if ck["meta"].get("atmc") is not None:
            compress_(model, ATMCConfig(**ck["meta"]["atmc"]), progress=self.progress)
        try:
            model.load_state_dict(ck["model"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint {str(path)!r} does not fit {self.model_name}: {_one_line(e)}") from None
        return model.eval()

    def compress(
        self, dense: nn.Module, cfg: ATMCConfig, schedule: Schedule, *, stage: str = "atmc"
    ) -> tuple[nn.Module, float]:
        """ATMC from a dense model (left untouched): compress_, ADMM + PGD training, finalize_.

        Returns the finalized model and the seconds taken; writes ``<stage>.pt`` every epoch
        and ``<stage>_final.pt`` at the end.
        """
        t0 = time.perf_counter()
        model = copy.deepcopy(dense).to(self.device)
        compress_(model, cfg, progress=self.progress)
        opt = ADMM(
            model,
            cfg,
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            nesterov=schedule.nesterov,
        )
        # which dense model the stage started from: resuming it from another one (a changed --dense-checkpoint) is
        # refused, as any other changed training setting is
        meta = {**self.identity, "atmc": config_to_dict(cfg), "dense_model": _state_digest(dense)}
        self._fit(model, opt, schedule, stage, True, meta)
        finalize_(model, progress=self.progress)
        if self.out is not None and is_main():
            save_checkpoint(
                self.out / f"{stage}_final.pt",
                model=model,
                epoch=schedule.epochs,
                meta={**meta, "stage": "final", "protocol": asdict(self.protocol), "seed": self.seed},
            )
        barrier()
        return model.eval(), time.perf_counter() - t0

    def evaluate(self, model: nn.Module, attacks: Sequence[str] | None = None) -> EvalResult:
        """:func:`evaluate` on the full test split."""
        return evaluate(
            model,
            self.data.test,
            self.protocol,
            attacks=self.attacks if attacks is None else attacks,
            batch_size=self.eval_batch_size,
            device=self.device,
            seed=self.seed,
            use_autoattack=self.use_autoattack,
            suite=self.suite,
            square_queries=self.square_queries,
            n_target_classes=self.n_target_classes,
            progress=self.progress and is_main(),
            distributed=is_distributed(),
        )
