"""The ``atmc`` command: ``atmc train`` (the whole pipeline), ``atmc eval CHECKPOINT``, ``atmc sweep``.

``atmc train`` with no arguments adversarially trains, compresses and evaluates a small CNN on
scikit-learn's embedded 8x8 digits (no download) and prints a table. Bad arguments end with a
one-line ``atmc <subcommand>: error: ...`` on stderr (``atmc: error: ...`` for errors the run itself
raises, ``atmc [rank r/N]: error: ...`` under torchrun) and exit code 2; a run stopped by NaN/Inf
steps (``--max-nonfinite``) exits with code 3.

Multi-GPU / multi-node: run the same command under ``torchrun`` (DistributedDataParallel, one
process per GPU; gloo on CPU). ``--batch-size`` stays the global batch, only rank 0 writes to
``--out`` (a directory every node shares), and a group restarted by ``torchrun --max-restarts``
resumes from the last complete checkpoints by itself::

    torchrun --standalone --nproc-per-node 8 -m atmc_triton train --dataset cifar10 --data-root data
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --rdzv-id run1 --max-restarts 3 -m atmc_triton train --dataset cifar10 --out /shared/run1
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmc_triton import distributed
from atmc_triton.attacks import SUITES
from atmc_triton.checkpoint import CheckpointError, atomic_write, load_checkpoint
from atmc_triton.config import INITS, ATMCConfig, _is_int
from atmc_triton.data import DATASETS, load_dataset
from atmc_triton.models import MODELS, is_model_name
from atmc_triton.train import (
    ATTACKS,
    LOSSES,
    LR_SCHEDULES,
    PROTOCOLS,
    TRAIN_ATTACKS,
    EvalResult,
    Experiment,
    NonFiniteError,
    Protocol,
    Schedule,
)

__all__ = ["FAST_RECIPES", "RECIPES", "Recipe", "main", "recipe_for"]


@dataclass(frozen=True)
class Recipe:
    """Per-dataset defaults of ``atmc train`` besides the protocol (``atmc_triton.train.PROTOCOLS``);
    every one can be overridden by a flag."""

    model: str
    epochs: int
    lr: float
    atmc_epochs: int
    atmc_lr: float
    batch_size: int
    weight_decay: float
    ratio: float
    bits: int
    natural_baseline: bool = False
    threads: int | None = None  # CPU threads (None: torch's default)
    lr_schedule: str = "cosine"
    channels_last: bool = False  # models in channels_last memory format (faster convolutions on CPU)
    square_queries: int = 5000  # Square queries of the torchattacks suite (AutoAttack's standard: 5000)


RECIPES: dict[str, Recipe] = {
    # the embedded default, tuned to finish well under 5 minutes on 2 busy CPU cores (see README)
    # Square-1000 (not AutoAttack's 5000) keeps the evaluation of its three models under a minute of CPU;
    # the command prints how to run the full suite (--square-queries 5000)
    "digits": Recipe(
        "digits_cnn", 40, 0.05, 15, 0.02, 64, 5e-4, 0.02, 4, natural_baseline=True, threads=1, square_queries=1000
    ),
    # the paper's datasets: reasonable starting points (not tuned here: no GPU, no CIFAR/SVHN files)
    "mnist": Recipe("lenet", 20, 0.01, 10, 0.005, 128, 1e-4, 0.01, 4),
    "cifar10": Recipe("resnet34", 100, 0.05, 50, 0.01, 128, 5e-4, 0.01, 8),
    "cifar100": Recipe("resnet34", 100, 0.05, 50, 0.01, 128, 5e-4, 0.01, 8),
    "svhn": Recipe("wrn16_8", 40, 0.01, 20, 0.005, 128, 5e-4, 0.01, 8),
}


# ``--protocol fast``: PGD-3 training with an eps warm-up and the guard (atmc_triton.train.PROTOCOLS["<dataset>_fast"])
# and a one-cycle learning rate, for the datasets that have such a preset (README: "Fast adversarial training")
FAST_RECIPES: dict[str, Recipe] = {
    "digits": Recipe(
        "digits_cnn",
        40,
        0.05,
        15,
        0.02,
        64,
        5e-4,
        0.02,
        4,
        natural_baseline=True,
        threads=1,
        square_queries=1000,
        lr_schedule="onecycle",
    ),
    "mnist": Recipe("lenet", 40, 0.05, 8, 0.01, 128, 5e-4, 0.01, 8, lr_schedule="onecycle", channels_last=True),
}


def recipe_for(dataset: str, protocol: str = "paper") -> Recipe:
    """The ``atmc train`` defaults of ``dataset`` under ``--protocol paper`` or ``fast``."""
    if protocol == "paper":
        return RECIPES[dataset]
    if protocol != "fast":
        raise ValueError(f"protocol must be 'paper' or 'fast', got {protocol!r}")
    if dataset not in FAST_RECIPES:
        raise ValueError(f"--protocol fast has presets for {', '.join(FAST_RECIPES)} only, not {dataset!r}")
    return FAST_RECIPES[dataset]


def _base_protocol(dataset: str, protocol: str = "paper") -> Protocol:
    recipe_for(dataset, protocol)  # the same checks
    return PROTOCOLS[dataset if protocol == "paper" else f"{dataset}_fast"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bits(s: str) -> int:
    if s.lower() in ("none", "32"):
        return 0  # no quantizer (32-bit factors)
    b = int(s)
    if not 1 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be 1..8 or 'none', got {s}")
    return b


def _layer_bits(s: str) -> tuple[str, int]:
    name, sep, b = s.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=BITS, got {s!r}")
    return name, int(b)


def _rank(s: str) -> int | float:
    return int(s) if s.isdigit() else float(s)


def _ratios(s: str) -> list[float]:
    return [float(r) for r in s.split(",") if r.strip()]


def _milestones(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in s.split(",") if m.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated epochs, e.g. 80,120,150; got {s!r}") from None


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _nonnegative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _add_data(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    g = p.add_argument_group("data")
    if dataset:
        g.add_argument(
            "--dataset",
            default="digits",
            choices=list(DATASETS),
            help="dataset (default: digits, scikit-learn's embedded 8x8 digits; no files needed)",
        )
        g.add_argument(
            "--model",
            type=_model_name,
            help=f"model: {', '.join(MODELS)}, or any torchvision / timm classifier as tv:NAME / timm:NAME "
            "(e.g. tv:resnet18, timm:convnext_atto; built for the dataset's classes and channels) "
            "(default: lenet for mnist, resnet34 for cifar10/100, wrn16_8 for svhn, digits_cnn for digits)",
        )
        g.add_argument("--subset", type=_positive_int, help="train on a seeded random subset of N examples")
    g.add_argument("--data-root", type=Path, help="torchvision data directory (offline: must hold the dataset)")
    g.add_argument("--download", action="store_true", help="download the torchvision dataset (needs internet)")
    g.add_argument("--test-subset", type=_positive_int, help="evaluate on a seeded random subset of N test examples")


def _add_protocol(p: argparse.ArgumentParser, evaluating: bool = False) -> None:
    """The threat-model flags; ``evaluating`` (``atmc eval``): their defaults are the checkpoint's protocol."""
    g = p.add_argument_group("threat model and attacks (defaults per dataset)")
    flags = {  # flag: (type, default, help, the default as train and sweep see it)
        "--eps": (float, None, "L-inf radius in [0, 1] pixel units", "mnist 0.3, cifar/svhn 4/255, digits 0.2"),
        "--pgd-steps": (int, None, "PGD steps in training", "mnist 16, cifar/svhn 7, digits 10; fast: 3"),
        "--pgd-alpha": (float, None, "PGD step size", "default 2.5 * eps / steps"),
        "--eval-pgd-steps": (int, None, "PGD steps in evaluation", "as in training; digits 20, mnist fast 50"),
        "--apgd-steps": (int, 100, "APGD-CE / APGD-T / FAB-T iterations of the suite", "default 100"),
        "--wrm-gamma": (float, 0.4, "WRM penalty gamma", "default 0.4"),
        "--wrm-steps": (int, 15, "WRM ascent steps", "default 15"),
        "--wrm-lr": (float, 1.0, "WRM step size, decays as lr/sqrt(t+1)", "default 1"),
    }
    for flag, (kind, default, text, default_text) in flags.items():
        if evaluating and flag != "--pgd-alpha":  # atmc eval: the checkpoint's protocol unless given
            text = "PGD steps of the evaluation, as --eval-pgd-steps" if flag == "--pgd-steps" else text
            default, default_text = None, "default: the checkpoint's protocol"
        g.add_argument(flag, type=kind, default=default, help=f"{text} ({default_text})")
    g.add_argument(
        "--suite",
        choices=list(SUITES),
        default="auto",
        help="robustness suite, run as a cascade on the points PGD missed: auto = fra31's autoattack if "
        "installed, else torchattacks' APGD-CE, APGD-T, FAB-T, Square (pip install 'torchattacks>=3.5', a dependency), "
        "else the built-in APGD-CE + APGD-T (apgd)",
    )
    g.add_argument(
        "--square-queries",
        type=_positive_int,
        help="Square queries of the torchattacks suite (default 5000, AutoAttack's; digits: 1000, which keeps "
        "the evaluation of its three models under a minute of CPU)",
    )
    g.add_argument(
        "--target-classes",
        type=_positive_int,
        default=9,
        help="target classes of APGD-T and FAB-T (default 9, AutoAttack's; fewer is cheaper, and labelled)",
    )
    g.add_argument(
        "--autoattack",
        choices=["auto", "yes", "no"],
        default="auto",
        help="older switch: yes = --suite autoattack, no = --suite apgd",
    )
    g.add_argument("--batch-size-eval", type=_positive_int, default=256, help="evaluation batch size")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    g.add_argument(
        "--seed",
        type=int,
        default=None if evaluating else 0,
        help="seed of the test subset and attack starts (default: the checkpoint's, so --test-subset is training's)"
        if evaluating
        else "seed of init, data order and attack starts",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: 1 for the tiny digits "
        "model, whose ops are too small to gain from more and slow down on a busy machine; else torch's)",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    _add_data(p)
    _add_protocol(p)
    g = p.add_argument_group("training protocol")
    g.add_argument(
        "--protocol",
        choices=["paper", "fast"],
        default="paper",
        help="paper: the paper's PGD training (default); fast: PGD-3 training with an eps warm-up, a one-cycle "
        "LR and the catastrophic-overfitting guard (digits and mnist; see the README)",
    )
    g.add_argument("--train-attack", choices=list(TRAIN_ATTACKS), help="training attack (paper: pgd)")
    g.add_argument("--fgsm-step", type=float, help="single-step attacks' step in units of eps (1.25 / N-FGSM 1)")
    g.add_argument("--fgsm-noise", type=float, help="N-FGSM's start-noise radius in units of eps (2)")
    g.add_argument("--eps-warmup-epochs", type=float, help="ramp the training eps over this many epochs")
    g.add_argument("--loss", choices=list(LOSSES), help="ce: clean/adversarial CE mix (paper); trades: TRADES")
    g.add_argument("--beta", type=float, help="TRADES beta (default 6)")
    g.add_argument(
        "--guard-drop",
        type=float,
        help="catastrophic-overfitting guard: roll an epoch back when the guard batch's PGD accuracy falls "
        "more than this below its best (fast: 0.2; 0 turns the guard off)",
    )
    g.add_argument(
        "--fallback-steps",
        type=_positive_int,
        help="PGD steps the guard falls back to after a rollback (fast: 7 mnist, 10 digits; with PGD training it "
        "must exceed --pgd-steps)",
    )
    g.add_argument(
        "--clean-weight",
        type=float,
        help="loss = w CE(clean) + (1 - w) CE(adv) (0.5 mnist/cifar10/digits, 0 cifar100/svhn and "
        "mnist --protocol fast)",
    )
    g.add_argument(
        "--train-attack-mode",
        choices=["train", "eval"],
        default="train",
        help="model mode while crafting training attacks (BatchNorm statistics are restored)",
    )
    g.add_argument("--attacks", default="pgd,apgd", help=f"evaluation attacks, comma list of {','.join(ATTACKS)}")
    g.add_argument("--epochs", type=int, help="dense adversarial pretraining epochs")
    g.add_argument("--lr", type=float, help="dense pretraining learning rate")
    g.add_argument("--atmc-epochs", type=int, help="ATMC (compression) epochs")
    g.add_argument("--atmc-lr", type=float, help="ATMC learning rate")
    g.add_argument("--batch-size", type=_positive_int, help="training batch size")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD / ADMM momentum (default 0.9)")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="models in channels_last memory format: faster CPU convolutions (default: on for mnist --protocol fast)",
    )
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument(
        "--lr-schedule", choices=list(LR_SCHEDULES), help="per-step LR schedule (paper: cosine, fast: onecycle)"
    )
    g.add_argument(
        "--milestones",
        type=_milestones,
        default=(),
        help="step schedule: dense epochs where the LR is multiplied by "
        "--gamma, e.g. 80,120,150 (required with --lr-schedule step)",
    )
    g.add_argument(
        "--atmc-milestones",
        type=_milestones,
        default=(),
        help="step schedule: the same for the ATMC stage, e.g. 40,70,90",
    )
    g.add_argument("--gamma", type=float, help="step schedule: LR factor at each milestone (default 0.1)")
    g.add_argument(
        "--eval-size", type=_nonnegative_int, default=1000, help="test examples for the per-epoch check (0: none)"
    )
    b = p.add_argument_group("ATMC budget and ADMM (atmc_triton.ATMCConfig)")
    b.add_argument("--ratio", type=float, help="size budget: compressed bits / dense 32-bit bits, in (0, 1)")
    b.add_argument("--nnz", type=int, help="explicit global nonzero budget k (instead of --ratio)")
    b.add_argument("--bits", type=_bits, help="codebook bits 1..8, or 'none' for 32-bit factors")
    b.add_argument(
        "--layer-bits",
        type=_layer_bits,
        action="append",
        metavar="NAME=BITS",
        help="per-layer bits (module name or fnmatch pattern), repeatable; tv:/timm: models sit behind the input "
        "normalization, so their names start with 1. (e.g. '1.layer4.*=8')",
    )
    b.add_argument("--rho", type=float, default=0.1, help="ADMM penalty rho (default 0.1)")
    b.add_argument("--rho-factor", type=float, default=1.0, help="multiply rho by this every --rho-every quantizations")
    b.add_argument("--rho-every", type=int, default=1, help="quantizer steps between rho updates")
    b.add_argument("--quant-interval", type=int, default=10, help="steps between quantizer + dual updates")
    b.add_argument("--lloyd-max-iter", type=int, default=20, help="Lloyd iterations per quantization")
    b.add_argument("--lloyd-tol", type=float, default=1e-5, help="Lloyd relative-SSE tolerance")
    b.add_argument(
        "--quant-method", choices=("fast", "optimal", "lloyd"), default="fast", help="codebook method (ATMCConfig)"
    )
    b.add_argument(
        "--init",
        choices=list(INITS),
        default=ATMCConfig.init,
        help="factor init: identity (W = U (V + I) + C, or (U + I) V + C when in > out), svd or sparse "
        f"(W = C only) (default {ATMCConfig.init})",
    )
    b.add_argument("--rank", type=_rank, help="SVD rank (int) or fraction (init=svd only)")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, help="output directory (default atmc_runs/<dataset>_<model>)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --out (automatic when torchrun restarts the group)",
    )
    r.add_argument(
        "--max-nonfinite",
        type=_positive_int,
        default=5,
        help="NaN/Inf loss or gradient: skip the step "
        "(warning, counted in metrics.jsonl); stop after this many in a row (default 5)",
    )
    r.add_argument("--dense-checkpoint", type=Path, help="start from this dense checkpoint (skip pretraining)")
    r.add_argument(
        "--natural-baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train and evaluate an undefended model (default: on for digits only)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class _Setup:
    exp: Experiment
    recipe: Recipe
    dense: Schedule
    atmc: Schedule
    natural: bool


def _config(a: argparse.Namespace, recipe: Recipe, ratio: float | None = None) -> ATMCConfig:
    if a.nnz is not None and (a.ratio is not None or ratio is not None):
        raise ValueError("give --ratio or --nnz, not both")
    budget = {"nnz": a.nnz} if a.nnz is not None else {"ratio": _pick(ratio, _pick(a.ratio, recipe.ratio))}
    bits = recipe.bits if a.bits is None else (a.bits or None)
    return ATMCConfig(
        **budget,
        bits=bits,
        layer_bits=dict(a.layer_bits or []) or None,
        rho=a.rho,
        rho_factor=a.rho_factor,
        rho_every=a.rho_every,
        quant_interval=a.quant_interval,
        max_iter=a.lloyd_max_iter,
        tol=a.lloyd_tol,
        quant_method=a.quant_method,
        init=a.init,
        rank=a.rank,
    )


def _model_name(name: str) -> str:
    """argparse type of ``--model``: a built-in name or ``tv:NAME`` / ``timm:NAME`` (checked when built)."""
    if not is_model_name(name):
        raise argparse.ArgumentTypeError(
            f"unknown model {name!r}; choose from {', '.join(MODELS)}, tv:NAME or timm:NAME"
        )
    return name


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _as_flags(message: str, fields: tuple[str, ...]) -> str:
    """``message`` with each Protocol field name in ``fields`` written as its flag (``trades_beta`` is ``--beta``)."""
    flag = {f: "--beta" if f == "trades_beta" else "--" + f.replace("_", "-") for f in fields}
    return re.sub(r"\b(" + "|".join(map(re.escape, flag)) + r")\b", lambda m: flag[m.group(1)], message)


def _setup(a: argparse.Namespace) -> _Setup:
    recipe = recipe_for(a.dataset, a.protocol)
    model = a.model or recipe.model
    attacks = tuple(s.strip() for s in a.attacks.split(",") if s.strip())
    bad = set(attacks) - set(ATTACKS)
    if bad:
        raise ValueError(f"unknown attack(s) {', '.join(sorted(bad))}; choose from {', '.join(ATTACKS)}")
    base = _base_protocol(a.dataset, a.protocol)
    given = {**vars(a), "trades_beta": a.beta}  # --beta sets Protocol.trades_beta
    names = ("eps", "pgd_steps", "pgd_alpha", "clean_weight", "eval_pgd_steps", "train_attack", "fgsm_step")
    names += ("fgsm_noise", "eps_warmup_epochs", "loss", "trades_beta", "fallback_steps")
    over = {k: given[k] for k in names if given[k] is not None}
    if a.guard_drop is not None:
        over["guard_drop"] = a.guard_drop or None
    try:
        protocol = dataclasses.replace(
            base,
            **over,
            apgd_steps=a.apgd_steps,
            wrm_gamma=a.wrm_gamma,
            wrm_steps=a.wrm_steps,
            wrm_lr=a.wrm_lr,
            train_attack_mode=a.train_attack_mode,
        )
    except ValueError as e:  # Protocol names its fields: say the flags that set them
        raise ValueError(_as_flags(str(e), (*names, "guard_drop"))) from None
    if a.fallback_steps is not None and protocol.guard_drop is None:
        raise ValueError("--fallback-steps sets the guard's fallback, but the guard is off here (see --guard-drop)")
    common = {
        "momentum": a.momentum,
        "weight_decay": _pick(a.weight_decay, recipe.weight_decay),
        "batch_size": _pick(a.batch_size, recipe.batch_size),
        "lr_schedule": _pick(a.lr_schedule, recipe.lr_schedule),
        "nesterov": a.nesterov,
    }
    dense_epochs, atmc_epochs = _pick(a.epochs, recipe.epochs), _pick(a.atmc_epochs, recipe.atmc_epochs)
    natural = recipe.natural_baseline if a.natural_baseline is None else a.natural_baseline
    # the dense schedule trains the dense model, and train's natural baseline even beside --dense-checkpoint
    trains_dense = a.dense_checkpoint is None or (a.cmd == "train" and natural)
    if common["lr_schedule"] == "step":  # without milestones "step" is a constant LR, which nobody asks for
        for flag, ms, epochs, used in (
            ("--milestones", a.milestones, dense_epochs, trains_dense),
            ("--atmc-milestones", a.atmc_milestones, atmc_epochs, True),
        ):
            if used and epochs and not ms:
                raise ValueError(f"--lr-schedule step needs {flag} (epochs where the LR is multiplied by --gamma)")
            if ms and ms[-1] >= epochs:
                raise ValueError(
                    f"{flag} {','.join(map(str, ms))}: every milestone must be below the stage's {epochs} epochs"
                )
    elif a.milestones or a.atmc_milestones or a.gamma is not None:
        raise ValueError(
            f"--milestones, --atmc-milestones and --gamma need --lr-schedule step (not {common['lr_schedule']})"
        )
    step = {} if a.gamma is None else {"gamma": a.gamma}
    dense = Schedule(epochs=dense_epochs, lr=_pick(a.lr, recipe.lr), milestones=a.milestones, **step, **common)
    atmc = Schedule(
        epochs=atmc_epochs, lr=_pick(a.atmc_lr, recipe.atmc_lr), milestones=a.atmc_milestones, **step, **common
    )
    out = a.out or Path("atmc_runs") / f"{a.dataset}_{model.replace(':', '_')}"
    device = distributed.init_from_env(a.device)
    data = _load(a.dataset, a.data_root, download=a.download, subset=a.subset, test_subset=a.test_subset, seed=a.seed)
    resume = a.resume or distributed.restart_count() > 0  # a torchrun restart picks up where the group died
    exp = Experiment(
        model,
        data,
        protocol,
        out=out,
        seed=a.seed,
        device=device,
        progress=not a.no_progress,
        resume=resume,
        eval_size=a.eval_size,
        eval_batch_size=a.batch_size_eval,
        attacks=attacks,
        use_autoattack={"auto": None, "yes": True, "no": False}[a.autoattack],
        suite=a.suite,
        square_queries=_pick(a.square_queries, recipe.square_queries),
        n_target_classes=a.target_classes,
        max_nonfinite=a.max_nonfinite,
        channels_last=recipe.channels_last if a.channels_last is None else a.channels_last,
    )
    _threads(a.threads or recipe.threads)
    return _Setup(exp, recipe, dense, atmc, natural)


def _load(name: str, root: Path | None, *, download: bool, **kw: Any):
    """``load_dataset``; under torchrun with ``--download``, local rank 0 fetches the files first."""
    if download and distributed.is_distributed():
        if distributed.local_rank() == 0:
            load_dataset(name, root, download=True, **kw)
        distributed.barrier()
    return load_dataset(name, root, download=download, **kw)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


DENSE_STAGES = ("dense", "natural")


def _dense_model(s: _Setup) -> tuple[Any, float]:
    _say(f"[atmc] dense adversarial pretraining: {s.exp.model_name} on {s.exp.data.name}, {s.dense.epochs} epochs")
    return s.exp.pretrain(s.dense)


def _check_budget(s: _Setup, cfg: ATMCConfig) -> None:
    """Fail before training when the model cannot take the dataset's inputs, a --layer-bits name matches no
    layer, or the ratio cannot hold one nonzero."""
    import torch
    from torch import nn

    from atmc_triton.api import unmatched_layer_bits
    from atmc_triton.budget import dense_bits

    model = s.exp.new_model()
    shape = (1, *s.exp.data.spec.in_shape)
    try:  # a model that cannot take the dataset's images fails here, not in the first training step
        with torch.no_grad():
            model.eval()(torch.zeros(shape, device=s.exp.device))
    except (RuntimeError, AssertionError, ValueError) as e:
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(
            f"--model {s.exp.model_name} cannot run on {s.exp.data.name} inputs {list(shape)}: {msg}"
        ) from None
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))]
    unmatched = unmatched_layer_bits(cfg, names)
    if unmatched:
        raise ValueError(
            f"--layer-bits {', '.join(unmatched)} matches no layer of {s.exp.model_name} "
            f"(layers: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
        )
    if cfg.ratio is not None:
        need = (cfg.bits or 32) + (32 if cfg.bits else 0)
        have = cfg.ratio * dense_bits(model)
        if have < need:
            raise ValueError(
                f"--ratio {cfg.ratio} leaves {have:.0f} bits for {s.exp.model_name}: not even one "
                f"{cfg.bits or 32}-bit nonzero with its codebook entry ({need} bits) fits"
            )


def _check_fresh(s: _Setup, stages: list[str], outputs: tuple[str, ...] = ()) -> None:
    """Before any work: make ``--out``, and without ``--resume`` move an earlier run's checkpoints of these
    stages and the command's ``outputs`` (``results.json``, ``sweep.*``) into ``<out>/earlier_<UTC time>/``, and
    copy ``metrics.jsonl`` there (the new run drops these stages' records from it): the new run starts over, as
    asked, and overwrites nothing."""
    if s.exp.out is None or not distributed.is_main():
        return
    try:  # a file in the way would otherwise surface as a traceback at the first checkpoint, after an epoch
        s.exp.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {s.exp.out}: cannot create the output directory ({e.strerror})") from None
    names = [f"{st}.pt" for st in stages] + [f"{st}_final.pt" for st in stages if st.startswith("atmc")]
    found = [n for n in names if (s.exp.out / n).exists()]
    if s.exp.resume:
        if not found:  # e.g. a mistyped --out: say so before hours of training start over
            _say(f"--resume: no checkpoint in {s.exp.out} ({', '.join(names)}): starting from scratch")
        return
    if found:
        aside = s.exp.out / time.strftime("earlier_%Y%m%d-%H%M%S", time.gmtime())
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        aside.mkdir()
        moved = found + [n for n in outputs if (s.exp.out / n).exists()]
        for n in moved:
            os.replace(s.exp.out / n, aside / n)
        log = s.exp.out / "metrics.jsonl"  # copied: the records of other stages (another command's) stay in place
        copied = " (metrics.jsonl copied)" if log.exists() else ""
        if copied:
            shutil.copy2(log, aside / log.name)
        _say(
            f"{s.exp.out} held an earlier run ({', '.join(moved)}): moved to {aside}{copied} "
            "(--resume would have continued that run)"
        )


def _say(msg: str) -> None:
    if distributed.is_main():
        print(msg, file=sys.stderr, flush=True)


def _row(label: str, r: EvalResult, train_s: float) -> dict[str, Any]:
    return {
        "model": label,
        **r.as_dict(),
        "train_seconds": train_s,
        "eval_seconds": r.seconds,
        "wall_seconds": train_s + r.seconds,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _worst(r: dict[str, Any]) -> str:
    """The worst-case cell: marked when the model collapsed (its robust accuracy is not comparable)."""
    return _pct(r.get("robust_acc")) + (" (collapsed)" if r.get("collapse") else "")


def _flags(r: dict[str, Any]) -> str:
    out = ["masking?"] if r.get("gradient_masking") else []
    out += [f"square+{r['gradient_free_broken']}"] if r.get("gradient_free_flag") else []
    out += [f"collapsed ({r['collapse']})"] if r.get("collapse") else []
    return ", ".join(out) or "-"


def format_table(rows: list[dict[str, Any]], protocol: Protocol) -> str:
    """The final table (markdown) of ``atmc train``: the worst case is the headline, PGD a named column."""
    suite = next((r["suite"] for r in rows if r.get("suite")), None)
    head = [
        "model",
        "TA %",
        f"PGD-{protocol.eval_steps} %",
        f"robust % (worst case, {suite or 'PGD only'})",
        "flags",
        "size bits",
        "size/dense",
        "smaller",
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["model"],
            _pct(r["clean_acc"]),
            _pct(r["pgd_acc"]),
            _worst(r),
            _flags(r),
            f"{r['size_bits']:,}",
            f"{r['ratio']:.4f}",
            f"{1 / r['ratio']:.1f}x" if r["ratio"] else "-",
            f"{r['wall_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], reference: str = "dense-adversarial") -> list[str]:
    """The lines under the table: what the headline is, the flags, and each model against ``reference``.

    A collapsed model is never called better than the reference: its comparison is withheld.
    """
    out = []
    ref = next((r for r in rows if r["model"] == reference), None)
    first = next((r for r in rows if r.get("robust_acc") is not None), None)
    if first is not None:
        stages = ", ".join(f"{k} {v}" for k, v in first.get("cascade", {}).items())
        out.append(f"robust % = per-example {first['headline']} (points broken first, {first['model']}: {stages})")
    masked = [r["model"] for r in rows if r.get("gradient_masking")]
    if masked:
        out.append("masking?: PGD more than 3 points above the worst case: " + ", ".join(masked))
    square = [f"{r['model']} ({r['gradient_free_broken']})" for r in rows if r.get("gradient_free_flag")]
    if square:
        out.append("square+k: a gradient-free attack broke k points every gradient attack missed: " + ", ".join(square))
    for r in rows:
        if r.get("collapse"):
            out.append(
                f"collapsed: {r['model']} predicts one class too often ({r['collapse']}); its robust accuracy "
                "is not comparable and is not counted as better than any other model's"
            )
    if ref is not None and ref.get("robust_acc") is not None:
        for r in rows:
            if r is ref or r.get("robust_acc") is None or r["model"].startswith("dense-natural"):
                continue
            d = 100 * (r["robust_acc"] - ref["robust_acc"])
            if r.get("collapse") or ref.get("collapse"):
                out.append(f"{r['model']} vs {reference}: not compared (a model collapsed)")
            else:
                out.append(
                    f"{r['model']} vs {reference}: worst-case robust {_pct(r['robust_acc'])} vs "
                    f"{_pct(ref['robust_acc'])} % ({d:+.1f} points)"
                )
    return out


def _suite_hint(rows: list[dict[str, Any]]) -> str | None:
    """How to get the full AutoAttack-grade suite when a lighter one ran."""
    suite = next((r["suite"] for r in rows if r.get("suite")), None)
    if suite is None or suite == "aa-torchattacks" or (suite.startswith("autoattack") and "(" not in suite):
        return None
    if suite.startswith(("aa-torchattacks(", "autoattack")):  # a shortened one: "...(steps-5,3targets,square-20)"
        return (
            f"suite {suite} is lighter than AutoAttack's standard; for the full one: "
            "--apgd-steps 100 --square-queries 5000"
        )
    return (
        f"suite {suite} has no FAB-T and no Square (no gradient-free check); for the AutoAttack-grade suite: "
        "pip install 'torchattacks>=3.5' (a dependency of atmc-triton) and --suite torchattacks"
    )


def _finish(rows: list[dict[str, Any]], s: _Setup, t0: float, name: str) -> None:
    if not distributed.is_main():
        return
    s.exp.out.mkdir(parents=True, exist_ok=True)
    atomic_write(s.exp.out / name, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    p = s.exp.protocol
    print(
        f"\n{s.exp.model_name} on {s.exp.data.name} ({len(s.exp.data.test)} test examples), eps={p.eps:.4g}, "
        f"device {s.exp.device}"
    )
    print(format_table(rows, p))
    for line in summary(rows):
        print(line)
    hint = _suite_hint(rows)
    if hint:
        print(hint)
    ev, cpu = sum(r.get("eval_seconds", 0.0) for r in rows), sum(r.get("cpu_seconds", 0.0) for r in rows)
    print(
        f"total wall time {time.perf_counter() - t0:.1f} s (evaluation {ev:.1f} s wall, {cpu:.1f} s CPU); "
        f"results in {s.exp.out}"
    )


def cmd_train(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = _config(a, recipe_for(a.dataset, a.protocol))  # bad budgets fail before any data is read
    s = _setup(a)
    _check_budget(s, cfg)
    _check_fresh(s, ["natural"] * s.natural + ["dense"] * (a.dense_checkpoint is None) + ["atmc"], ("results.json",))
    given = s.exp.load(a.dense_checkpoint, stages=DENSE_STAGES) if a.dense_checkpoint else None  # checked first
    rows = []
    if s.natural:
        _say(f"[atmc] natural (undefended) baseline, {s.dense.epochs} epochs")
        nat, t = s.exp.pretrain(s.dense, adversarial=False)
        rows.append(_row("dense-natural (undefended)", s.exp.evaluate(nat), t))
    dense, t = (given, 0.0) if given is not None else _dense_model(s)
    rows.append(_row("dense-adversarial", s.exp.evaluate(dense), t))
    _say(f"[atmc] ATMC compression: {cfg}, {s.atmc.epochs} epochs")
    model, t = s.exp.compress(dense, cfg, s.atmc)
    rows.append(_row("ATMC-compressed", s.exp.evaluate(model), t))
    _finish(rows, s, t0, "results.json")
    return 0


SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")


def cmd_sweep(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ratios = a.ratios
    if not ratios:
        raise ValueError("--ratios needs at least one ratio")
    if a.ratio is not None or a.nnz is not None:  # each stage's budget is one of --ratios
        given = "--ratio" if a.ratio is not None else "--nnz"
        raise ValueError(f"atmc sweep takes its budgets from --ratios (a comma list), not {given}")
    stages = [f"{r:g}" for r in ratios]  # each ratio's stage and checkpoint name
    if len(set(stages)) < len(stages):
        raise ValueError(f"--ratios repeats a ratio ({', '.join(stages)}): each one names its stage's checkpoints")
    recipe = recipe_for(a.dataset, a.protocol)
    cfgs = [_config(a, recipe, ratio=r) for r in ratios]  # every ratio is checked before any work
    s = _setup(a)
    for cfg in cfgs:
        _check_budget(s, cfg)
    _check_fresh(s, ["dense"] * (a.dense_checkpoint is None) + [f"atmc_r{r:g}" for r in ratios], SWEEP_FILES)
    given = s.exp.load(a.dense_checkpoint, stages=DENSE_STAGES) if a.dense_checkpoint else None
    dense, t = (given, 0.0) if given is not None else _dense_model(s)
    rows = [_row("dense-adversarial", s.exp.evaluate(dense), t)]
    for r, cfg in zip(ratios, cfgs):
        _say(f"[atmc] sweep: ratio {r:g}")
        model, t = s.exp.compress(dense, cfg, s.atmc, stage=f"atmc_r{r:g}")
        rows.append({**_row(f"ATMC r={r:g}", s.exp.evaluate(model), t), "target_ratio": r})
    _write_sweep(rows, s)
    _finish(rows, s, t0, "sweep.json")
    return 0


def _write_sweep(rows: list[dict[str, Any]], s: _Setup) -> None:
    if not distributed.is_main():
        return
    out = s.exp.out
    out.mkdir(parents=True, exist_ok=True)
    keys = [
        "model",
        "target_ratio",
        "ratio",
        "size_bits",
        "dense_bits",
        "packed_bytes",
        "nnz",
        "clean_acc",
        "pgd_acc",
        "robust_acc",
        "suite",
        "headline",
        "gradient_masking",
        "gradient_free_flag",
        "collapse",
        "train_seconds",
        "wall_seconds",
    ]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "sweep.csv", lambda f: f.write(text.getvalue().encode()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = sorted((r for r in rows if "target_ratio" in r), key=lambda r: r["ratio"])
    dense = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    p = s.exp.protocol
    for ax, key, title in (
        (axes[0], "clean_acc", "TA (clean accuracy)"),
        (axes[1], "pgd_acc", f"robust accuracy (eps={p.eps:.3g})"),
    ):
        if key == "pgd_acc" and all(r["robust_acc"] is not None for r in comp + [dense]):
            key = "robust_acc"  # the headline: the worst case; PGD dotted for reference
            ax.plot(
                [r["ratio"] for r in comp],
                [100 * r["pgd_acc"] for r in comp],
                "s:",
                color="C1",
                label=f"ATMC, PGD-{p.eval_steps}",
            )
        lab = "ATMC" if key != "robust_acc" else f"ATMC, {comp[0]['headline']}" if comp else "ATMC"
        ax.plot([r["ratio"] for r in comp], [100 * r[key] for r in comp], "o-", label=lab)
        for r in comp:
            if r.get("collapse"):
                ax.annotate("collapsed", (r["ratio"], 100 * r[key]), fontsize=7, color="red")
        ax.axhline(100 * dense[key], color="gray", ls="--", label="dense (adversarial)")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio (model size / dense 32-bit size)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{s.exp.model_name} on {s.exp.data.name}")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def cmd_eval(a: argparse.Namespace) -> int:
    ck = load_checkpoint(a.checkpoint)
    meta = ck["meta"]
    if a.model is not None and meta.get("model") != a.model:
        raise CheckpointError(f"checkpoint {str(a.checkpoint)!r} holds model {meta.get('model')!r}, not {a.model!r}")
    if meta.get("dataset") not in DATASETS or not is_model_name(meta.get("model")):
        raise CheckpointError(f"checkpoint {str(a.checkpoint)!r} names an unknown model/dataset")
    try:  # the guard only trains: a checkpoint from before a guard check evaluates without it
        stored = meta.get("protocol")
        base = Protocol(**{**stored, "guard_drop": None}) if stored else PROTOCOLS[meta["dataset"]]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(a.checkpoint)!r} has a bad protocol: {e}") from None
    over = {
        k: getattr(a, k)
        for k in ("eps", "pgd_alpha", "apgd_steps", "wrm_gamma", "wrm_steps", "wrm_lr")
        if getattr(a, k) is not None
    }
    steps = {a.pgd_steps, a.eval_pgd_steps} - {None}  # both flags set the evaluation's PGD steps here
    if len(steps) > 1:
        raise ValueError(f"--pgd-steps {a.pgd_steps} and --eval-pgd-steps {a.eval_pgd_steps} disagree")
    if steps:
        over["eval_pgd_steps"] = steps.pop()
    protocol = dataclasses.replace(base, **over)
    _threads(a.threads or RECIPES[meta["dataset"]].threads)
    device = distributed.init_from_env(a.device)  # under torchrun the test split is shared out to the ranks
    seed = a.seed if a.seed is not None else meta.get("seed", 0)  # training's subset and attack starts
    if not _is_int(seed):
        raise CheckpointError(f"checkpoint {str(a.checkpoint)!r} has a bad seed {seed!r}")
    data = _load(meta["dataset"], a.data_root, download=a.download, test_subset=a.test_subset, seed=seed)
    exp = Experiment(
        meta["model"],
        data,
        protocol,
        seed=seed,
        device=device,
        eval_batch_size=a.batch_size_eval,
        use_autoattack={"auto": None, "yes": True, "no": False}[a.autoattack],
        suite=a.suite,
        square_queries=_pick(a.square_queries, RECIPES[meta["dataset"]].square_queries),
        n_target_classes=a.target_classes,
        channels_last=a.channels_last,
    )
    model = exp.load(a.checkpoint)
    unfinalized = meta.get("atmc") is not None and meta.get("stage") != "final"
    if a.finalize and unfinalized:
        from atmc_triton.api import finalize_

        finalize_(model)
    elif unfinalized:
        _say("[atmc] note: an unfinalized ATMC checkpoint (W = UV + C, not yet quantized); --finalize commits it")
    r = exp.evaluate(model, attacks=tuple(a.attack))
    res = r.as_dict()
    if not distributed.is_main():
        return 0
    if a.json:
        print(json.dumps(res))
        return 0
    print(
        f"{a.checkpoint}: {meta['model']} on {meta['dataset']} ({meta.get('stage')} checkpoint), "
        f"{r.n} test examples, eps={protocol.eps:.4g}"
    )
    print(f"  TA {_pct(r.clean_acc)} %")
    for k, label in (
        ("pgd", f"PGD-{protocol.eval_steps}"),
        ("fgsm", "FGSM"),
        ("wrm", f"WRM (gamma={protocol.wrm_gamma}, not in the worst case)"),
    ):
        if k in a.attack:
            print(f"  {label}: {_pct(res[f'{k}_acc'])} %")
    if r.robust_acc is not None:
        stages = ", ".join(f"{k} {v}" for k, v in r.cascade.items())
        print(f"  robust (per-example {r.headline}): {_worst(res)} %  [points broken first: {stages}]")
    print(f"  flags: {_flags(res)}")
    print(
        f"  size {r.size_bits:,} bits = {r.ratio:.4g} of dense ({r.dense_bits:,} bits), packed {r.packed_bytes:,} "
        f"bytes, {r.nnz:,} nonzeros; {r.seconds:.1f} s"
    )
    if r.gradient_masking:
        print("  possible gradient masking: PGD accuracy is more than 3 points above the worst case")
    hint = _suite_hint([res])
    if hint:
        print("  " + hint)
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="atmc", description="ATMC: adversarially robust model compression (Gui et al., NeurIPS 2019).")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    t = sub.add_parser(
        "train",
        help="dense adversarial pretraining -> ATMC -> finalize -> evaluation table",
        description="The whole pipeline. With no arguments: digits_cnn on scikit-learn's 8x8 digits "
        "(eps 0.2, PGD-10 training; evaluation: PGD-20, then the AutoAttack-grade suite on the points PGD "
        "missed, the per-example worst case as the headline), ATMC at ratio 0.02 with 4 bits.",
    )
    _add_train(t)
    t.set_defaults(func=cmd_train)
    s = sub.add_parser(
        "sweep",
        help="several ratios from one dense model -> sweep.csv + sweep.png",
        description="ATMC at each --ratios value from one dense adversarial model (trained, or "
        "--dense-checkpoint); writes sweep.csv and sweep.png (TA and ATA vs compression ratio, log-x).",
    )
    _add_train(s)
    s.add_argument("--ratios", type=_ratios, default=[0.05, 0.02, 0.01], help="comma list (default 0.05,0.02,0.01)")
    s.set_defaults(func=cmd_sweep)
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint against attacks",
        description="Evaluate a checkpoint (dense or ATMC) on its dataset's test split.",
    )
    e.add_argument("checkpoint", type=Path, help="a .pt checkpoint written by atmc train / sweep")
    e.add_argument(
        "--attack", nargs="+", choices=list(ATTACKS), default=["pgd", "apgd"], help="attacks to run (default: pgd apgd)"
    )
    e.add_argument(
        "--model",
        type=_model_name,
        help="refuse the checkpoint unless it holds this model (a name, tv:NAME, timm:NAME)",
    )
    e.add_argument("--finalize", action="store_true", help="finalize_ an unfinalized ATMC checkpoint first")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_data(e, dataset=False)
    _add_protocol(e, evaluating=True)
    e.add_argument(
        "--channels-last", action="store_true", help="evaluate in channels_last memory format (faster on CPU)"
    )
    e.set_defaults(func=cmd_eval)
    ap.subcommands = sub.choices  # main() names the subcommand in an unknown-flag error
    return ap


def _log_to_stderr() -> None:
    """``atmc_triton`` log records (e.g. "resuming ...") as ``[atmc] ...`` lines on rank 0's stderr."""
    logger = logging.getLogger("atmc_triton")
    if any(getattr(h, "_atmc_cli", False) for h in logger.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("[atmc] %(message)s"))
    h.addFilter(lambda record: distributed.is_main())
    h._atmc_cli = True
    logger.addHandler(h)
    logger.setLevel(logging.INFO)


def _fail_line(msg: str) -> None:
    """``atmc: msg`` on stderr; under torchrun with several ranks, ``atmc [rank r/N]: msg`` (every rank
    that fails says so, and which one it is). Progress lines go through :func:`_say` (rank 0 only)."""
    world = distributed.world_size()
    who = f" [rank {distributed.rank()}/{world}]" if world > 1 else ""
    print(f"atmc{who}: {msg}", file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """SIGTERM arrived (``timeout``, a batch scheduler). A ``BaseException``, like ``KeyboardInterrupt``, so that no
    ``except Exception`` on the way (a checkpoint load reading it as a corrupted file) swallows it."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atmc`` console script; returns the exit code."""
    ap = _parser()
    a, extra = ap.parse_known_args(argv)
    if extra:  # as parse_args, but the error names the subcommand ("atmc train: error: ...") as every other does
        ap.subcommands[a.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    _log_to_stderr()
    # one process (not under torchrun, whose agent stops a group with SIGTERM: a rank blocked in a collective would
    # run a Python handler only when the collective returns), in the main thread (where signal handlers live)
    catch = threading.current_thread() is threading.main_thread() and distributed.env_world_size() == 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if catch else None
    try:
        return a.func(a)
    except _Terminated:  # checkpoints are written atomically: the last complete one is where --resume continues
        _fail_line("terminated by SIGTERM (continue with --resume)")
        return 128 + signal.SIGTERM
    except (ValueError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail_line(f"error: {msg}")
        return 2
    except NonFiniteError as e:
        _fail_line(f"error: {e}")
        return 3
    except KeyboardInterrupt:
        _fail_line("interrupted (continue with --resume)")
        return 130
    finally:
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
