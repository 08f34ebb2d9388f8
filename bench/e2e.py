"""End-to-end training cost: ATMC vs dense PGD adversarial training, ResNet34, CIFAR shapes, batch 128, PGD-7.

One training step is what :func:`atmc_triton.train.fit` does per batch under the CIFAR-10
protocol (eps 4/255, PGD-7 with a random start in train mode, loss 0.5 CE(clean) + 0.5 CE(adv),
momentum 0.9, weight decay 5e-4), on one fixed synthetic batch already on the device (no data
loading in the timing). Side by side, from the same dense weights:

1. ``dense PGD-AT``: the dense model with ``torch.optim.SGD`` (what a user would otherwise run);
2. ``ATMC, reference ops``: ``compress_`` (ratio 0.01, 8 bits, the default sparse init: one factor
   entry per weight) + ``ADMM(backend="reference")``, the pure-PyTorch ADMM step and Lloyd quantizer;
3. ``ATMC, triton ops``: ``ADMM(backend="auto")``, the fused Triton kernels;
4. ``ATMC, triton ops + torch.compile``: the same with ``torch.compile(model)`` (inductor; the
   attack's cached-weight forward and the training forward compile to separate graphs; the
   optimizer step runs eagerly).

Per variant: warm-up steps (the compile happens there, reported as ``compile_s``), then timed
blocks of 10 steps (the quantizer runs every 10 steps, so each block holds exactly one),
``torch.cuda.synchronize`` around each block; the median block / 10 is the step time. Also
images/s and the peak GPU memory of the variant (``torch.cuda.max_memory_allocated`` after a
reset, each variant built alone). Target: ATMC (Triton) step time <= 1.10 x the dense step.
``--quick``: a 2k-weight CNN, batch 8, PGD-2, quantizer every 2 steps, on the CPU (``torch.compile(backend="eager")``).
"""

from __future__ import annotations

import copy
import functools
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from atmc_triton.api import compress_
from atmc_triton.attacks import pgd
from atmc_triton.config import ATMCConfig
from atmc_triton.models import build_model
from atmc_triton.optim import ADMM
from atmc_triton.train import PROTOCOLS
from bench.common import Ctx, Row, Target

BENCH = "e2e"
HP = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def _tiny_cnn() -> torch.nn.Module:
    """A 2k-weight CNN on 3x8x8 inputs for the CPU smoke run."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    )


def _workload(quick: bool) -> dict:
    """``block``: steps per timed block, also the quantizer interval (so every block holds one quantizer step)."""
    if quick:
        return dict(
            build=_tiny_cnn,
            shape=(3, 8, 8),
            batch=8,
            pgd_steps=2,
            warmup=1,
            blocks=2,
            block=2,
            case="tiny CNN 3x8x8, batch 8, PGD-2 (quick)",
        )
    return dict(
        build=lambda: build_model("resnet34", 10, (3, 32, 32)),
        shape=(3, 32, 32),
        batch=128,
        pgd_steps=7,
        warmup=3,
        blocks=3,
        block=10,
        case="resnet34 CIFAR-10 shapes, batch 128, PGD-7",
    )


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    clean_weight: float,
    gen: torch.Generator,
) -> None:
    """One PGD adversarial training step, as :func:`atmc_triton.train.fit` takes it."""
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True, eval_mode=False, generator=gen)
    opt.zero_grad(set_to_none=True)
    loss = clean_weight * F.cross_entropy(model(x), y) + (1.0 - clean_weight) * F.cross_entropy(model(x_adv), y)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], None], device: torch.device, warmup: int, blocks: int, block: int) -> dict:
    """Warm-up (timed as ``warmup_s``), then ``blocks`` blocks of ``block`` steps; median seconds per step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm = time.perf_counter() - t0
    per_step = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        _sync(device)
        per_step.append((time.perf_counter() - t0) / block)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s": statistics.median(per_step), "warmup_s": warm, "peak_gib": peak}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: Ctx) -> tuple[list[Row], list[Target]]:
    dev, w = ctx.device, _workload(ctx.quick)
    p = PROTOCOLS["cifar10"]
    torch.manual_seed(0)
    base = w["build"]()  # dense initial weights, shared by every variant
    g = torch.Generator(dev).manual_seed(0)
    x = torch.rand((w["batch"], *w["shape"]), generator=g, device=dev)
    y = torch.randint(0, 10, (w["batch"],), generator=g, device=dev)
    cfg = ATMCConfig(ratio=0.05 if ctx.quick else 0.01, bits=8, quant_interval=w["block"])
    backend = "eager" if ctx.quick else "inductor"

    def variant(kind: str, compiled: bool) -> dict:
        model = copy.deepcopy(base).to(dev).train()
        if kind == "dense":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **HP)
        else:
            compress_(model, cfg)
            opt = ADMM(model, cfg, backend=kind, **HP)
        net = torch.compile(model, backend=backend) if compiled else model
        gen = torch.Generator(dev).manual_seed(1)
        step = functools.partial(train_step, net, opt, x, y, p.eps, p.alpha, w["pgd_steps"], p.clean_weight, gen)
        res = _measure(step, dev, w["warmup"], w["blocks"], w["block"])
        del model, net, opt, step
        _free(dev)
        return res

    on_cpu = "" if dev.type == "cuda" else " (CPU: the ops run their PyTorch references)"
    plan = [
        ("dense PGD-AT (torch.optim.SGD)", "dense", False),
        ("ATMC, reference ADMM + Lloyd (backend='reference')", "reference", False),
        ("ATMC, triton kernels (backend='auto')" + on_cpu, "auto", False),
        (f"ATMC, triton kernels + torch.compile(model, backend={backend!r})" + on_cpu, "auto", True),
    ]
    res = {}
    for name, kind, compiled in plan:
        res[name] = variant(kind, compiled)
    dense_s = res[plan[0][0]]["s"]
    rows = []
    for name, _, compiled in plan:
        r = res[name]
        extra = {"images_per_s": w["batch"] / r["s"], "vs_dense": r["s"] / dense_s, "peak_GiB": r["peak_gib"]}
        if compiled:
            extra["compile_s"] = r["warmup_s"]
        rows.append(Row(BENCH, w["case"], name, 1000 * r["s"], extra))
    targets = []
    if not ctx.quick:
        for name, label in ((plan[2][0], "eager"), (plan[3][0], "torch.compile")):
            over = res[name]["s"] / dense_s - 1
            targets.append(
                Target(
                    BENCH,
                    f"ATMC (triton, {label}) step overhead over dense PGD-AT, resnet34 b128",
                    100 * over,
                    "<= 10 %",
                    over <= 0.10,
                )
            )
        ref_s, tri_s = res[plan[1][0]]["s"], res[plan[2][0]]["s"]
        targets.append(
            Target(BENCH, "ATMC step time, reference ops / triton ops", ref_s / tri_s, "> 1x", ref_s / tri_s > 1)
        )
    return rows, targets
