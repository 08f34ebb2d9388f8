"""ADMM step over every factor of a model, with the global top-k projection.

Workloads: the U, V, C factors of the CIFAR ResNet34 with the identity init (``r = min(out,
in')``: about 2x its 21.3M dense weights) and a flat 100M-element set (25 factors of 2000 x 2000).
Budget ``k`` = 10% of the factor elements; lr 0.01, momentum 0.9, weight decay 5e-4, rho 1e-3.

Side by side in one run, each on its own copy of the same state, stepping repeatedly (steady state):

* ``eager reference-style``: what the public ATMC code does: the prox term ``rho/2 ||W - Z + u||^2``
  by autograd, ``torch.optim.SGD`` (momentum, weight decay) on per-factor tensors, then ``torch.cat``
  of ``|W|``, ``torch.topk``, and masking of weights and momenta per factor;
* ``torch.compile(reference)``: :func:`admm_step_ref` on the flat buffers, compiled (inductor);
* ``foreach SGD + topk``: the best plain-PyTorch step a user would write: ``torch._foreach_*``
  SGD with the prox term on per-factor tensors, ``torch.topk`` of the concatenated ``|W|``, masks;
* ``triton``: the ``atmc::admm_step`` op (no sort / kthvalue, no host sync), given the previous
  step's tau as the optimizer does, with fp32 and bf16 grads.

The memory floor is the bytes a fused step must move (read grad, w, mom, z, u; write w, mom,
mask: 29 bytes per element with fp32 grads) over the measured copy bandwidth; each Triton row also
shows the band fraction it saw and the roofline prediction for it (``bench.model.admm_step``).
Targets: >= 3x the best of the three PyTorch steps, <= 1.5x the floor.
``--quick``: tiny sizes on the CPU, ``torch.compile(backend="eager")``, the Triton row only under
``TRITON_INTERPRET=1``; no targets.
"""

from __future__ import annotations

import math

import torch
from atmc_triton.kernels.admm import admm_step, admm_step_ref, admm_step_triton
from atmc_triton.kernels.admm_triton import BAND_HALF, interpreted

from bench import model
from bench.common import Ctx, Row, Target, bench_ms, copy_bandwidth, dynamo_graphs, warm_up

BENCH = "admm"
HP = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, rho=1e-3)
K_FRAC = 0.1


def resnet34_shapes() -> list[tuple[int, int]]:
    """``(out, in * kh * kw)`` of every conv / linear of the CIFAR ResNet34 (3x3 stem), in module order."""
    try:
        from atmc_triton.models import CifarResNet

        build = CifarResNet
    except ImportError:  # torchvision's ResNet34 with a 3x3 stem has the same shapes
        import torchvision

        def build():
            net = torchvision.models.resnet34(num_classes=10)
            net.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
            return net

    with torch.device("meta"):
        model = build()
    return [
        (m.weight.shape[0], m.weight[0].numel())
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]


def identity_factors(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Factor shapes ``U [out, r]``, ``V [r, in]``, ``C [out, in]`` with ``r = min(out, in)``."""
    out = []
    for o, i in shapes:
        r = min(o, i)
        out += [(o, r), (r, i), (o, i)]
    return out


def workloads(quick: bool) -> list[tuple[str, list[tuple[int, int]]]]:
    if quick:
        return [
            ("tiny layers", identity_factors([(16, 27), (32, 144), (8, 288), (10, 32)])),
            ("tiny flat", [(100, 100)] * 4),
        ]
    rn = identity_factors(resnet34_shapes())
    return [
        (f"resnet34 identity init ({sum(math.prod(s) for s in rn) / 1e6:.1f}M)", rn),
        ("flat 100M (25 x 2000x2000)", [(2000, 2000)] * 25),
    ]


def flat_state(n: int, device: torch.device, grad_dtype=torch.float32) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, generator=g, device=device) * 0.05
    return dict(
        w=w,
        grad=(torch.randn(n, generator=g, device=device) * 0.01).to(grad_dtype),
        mom=torch.zeros(n, device=device),
        z=w.clone(),
        u=torch.zeros(n, device=device),
        mask=torch.ones(n, dtype=torch.bool, device=device),
    )


class EagerATMC:
    """The public ATMC code's step on per-factor tensors: autograd prox, torch SGD, cat + topk, masks."""

    def __init__(self, shapes: list[tuple[int, int]], flat: dict, k: int):
        sizes = [math.prod(s) for s in shapes]

        def split(t):
            return [x.clone().view(s) for x, s in zip(t.split(sizes), shapes)]

        self.params = [torch.nn.Parameter(x) for x in split(flat["w"])]
        self.loss_grads, self.z, self.u = split(flat["grad"].float()), split(flat["z"]), split(flat["u"])
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        self.opt = torch.optim.SGD(self.params, lr=HP["lr"], momentum=HP["momentum"], weight_decay=HP["weight_decay"])
        self.k = k

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():  # the prox term joins the loss; backward adds its gradient
            prox = sum((p - z + u).square().sum() for p, z, u in zip(self.params, self.z, self.u))
            (HP["rho"] / 2 * prox).backward()
        torch._foreach_add_([p.grad for p in self.params], self.loss_grads)
        self.opt.step()
        with torch.no_grad():
            a = torch.cat([p.abs().reshape(-1) for p in self.params])
            tau = torch.topk(a, self.k, sorted=False).values.min()
            for p, m in zip(self.params, self.masks):
                torch.ge(p.abs(), tau, out=m)
                p.mul_(m)
                self.opt.state[p]["momentum_buffer"].mul_(m)


class ForeachTopk:
    """The best plain-PyTorch step: ``torch._foreach_*`` SGD + prox on per-factor tensors, then one
    ``torch.topk`` over the concatenated ``|W|`` for the threshold and per-factor masks (ties at tau
    all survive, so it can keep more than k; the op keeps exactly k)."""

    def __init__(self, shapes: list[tuple[int, int]], flat: dict, k: int):
        sizes = [math.prod(s) for s in shapes]

        def split(t):
            return [x.clone().view(s) for x, s in zip(t.split(sizes), shapes)]

        self.w, self.grad, self.mom = split(flat["w"]), split(flat["grad"]), split(flat["mom"])
        self.z, self.u = split(flat["z"]), split(flat["u"])
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.w]
        self.k = k

    def step(self) -> None:
        g = torch._foreach_sub(self.w, self.z)  # rho (w - z + u) + grad + wd w
        torch._foreach_add_(g, self.u)
        torch._foreach_mul_(g, HP["rho"])
        torch._foreach_add_(g, self.grad)
        torch._foreach_add_(g, self.w, alpha=HP["weight_decay"])
        torch._foreach_mul_(self.mom, HP["momentum"])
        torch._foreach_add_(self.mom, g)
        torch._foreach_add_(self.w, self.mom, alpha=-HP["lr"])
        a = torch._foreach_abs(self.w)
        tau = torch.topk(torch.cat([x.reshape(-1) for x in a]), self.k, sorted=False).values.min()
        for x, m in zip(a, self.masks):
            torch.ge(x, tau, out=m)
        torch._foreach_mul_(self.w, self.masks)
        torch._foreach_mul_(self.mom, self.masks)


def band_fraction(t: dict, tau: torch.Tensor) -> float:
    """Fraction of ``|w|`` keys within the band around ``tau`` (what the next step appends)."""
    key = t["w"].abs().view(torch.int32)
    tk = int(tau.view(torch.int32))
    lo = max(tk - BAND_HALF, 0)
    return float(((key >= lo) & (key < lo + 2 * BAND_HALF)).float().mean())


def _ref_step(t: dict, k: int) -> torch.Tensor:
    return admm_step_ref(
        t["w"],
        t["grad"],
        t["mom"],
        t["z"],
        t["u"],
        t["mask"],
        HP["lr"],
        HP["momentum"],
        HP["weight_decay"],
        HP["rho"],
        k,
        False,
    )


def _case(ctx: Ctx, case: str, shapes: list[tuple[int, int]], bandwidth: float) -> tuple[list[Row], list[Target]]:
    dev = ctx.device
    n = sum(math.prod(s) for s in shapes)
    k = int(K_FRAC * n)
    rows: list[Row] = []
    targets: list[Target] = []

    eager = EagerATMC(shapes, flat_state(n, dev), k)
    eager_ms = bench_ms(eager.step, dev)
    rows.append(
        Row(BENCH, case, "eager reference-style (autograd prox + SGD + cat + topk)", eager_ms, {"n": n, "k": k})
    )
    del eager  # free its memory before the next variant

    t = flat_state(n, dev)
    torch._dynamo.reset()
    # automatic dynamic: each step changes the ties at tau, and the ints the reference reads back (a graph break)
    # would otherwise recompile at every new value, inside the timing, up to dynamo's limit
    compiled = torch.compile(_ref_step, backend="eager" if ctx.quick else "inductor", dynamic=None)
    try:
        graphs = warm_up(lambda: compiled(t, k))  # compile outside the timing
        comp_ms = bench_ms(lambda: compiled(t, k), dev)
        extra = {"graphs": graphs, "recompiled_while_timed": dynamo_graphs() > graphs}
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # it would time eager code under the compiled label
        comp_ms, extra = float("nan"), {"error": "dynamo's recompile limit: not timed"}
    rows.append(Row(BENCH, case, "torch.compile(reference)", comp_ms, extra))
    del t

    fe = ForeachTopk(shapes, flat_state(n, dev), k)
    fe_ms = bench_ms(fe.step, dev)
    rows.append(Row(BENCH, case, "foreach SGD + topk (best plain PyTorch)", fe_ms))
    del fe
    best = min(ms for ms in (eager_ms, comp_ms, fe_ms) if ms == ms)  # (NaN: not timed)

    if not (dev.type == "cuda" or interpreted()):
        rows.append(Row(BENCH, case, "triton (skipped: no GPU and no TRITON_INTERPRET=1)", float("nan")))
        return rows, targets
    op = admm_step if dev.type == "cuda" else admm_step_triton  # the op on CPU runs the reference
    for gdt in (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,):  # interpreter: no bf16
        t = flat_state(n, dev, gdt)
        kw = dict(HP, k=k, nesterov=False)
        hint = [op(**t, **kw)]  # the first step has no previous tau (the FULL path)

        def step(t=t, kw=kw, hint=hint):
            hint[0] = op(**t, **kw, tau_hint=hint[0])  # as the optimizer does: the previous tau

        ms = bench_ms(step, dev)
        frac = band_fraction(t, hint[0])
        pred = model.admm_step(n, gdt.itemsize, band=frac)
        gpu = model.gpu_for(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", bandwidth)
        floor_ms = pred.floor_bytes / bandwidth * 1000
        name = "fp32" if gdt == torch.float32 else "bf16"
        rows.append(
            Row(
                BENCH,
                case,
                f"triton ({name} grads, previous tau)",
                ms,
                {
                    "floor_ms": floor_ms,
                    "x_floor": ms / floor_ms,
                    "predicted_ms": pred.predict_s(gpu) * 1000,
                    "x_predicted": ms / (pred.predict_s(gpu) * 1000),
                    "band_frac": frac,
                    "x_best_torch": best / ms,
                    "x_eager": eager_ms / ms,
                    "x_compiled": comp_ms / ms,
                    "x_foreach": fe_ms / ms,
                    "GB/s": pred.bytes / ms / 1e6,
                },
            )
        )
        if gdt == torch.float32 and not ctx.quick:
            targets += [
                Target(BENCH, f"triton vs best PyTorch step, {case}", best / ms, ">= 3x", best / ms >= 3),
                Target(BENCH, f"triton / memory floor, {case}", ms / floor_ms, "<= 1.5x", ms / floor_ms <= 1.5),
            ]
    return rows, targets


def run(ctx: Ctx) -> tuple[list[Row], list[Target]]:
    bandwidth = copy_bandwidth(ctx.device)
    rows = [Row(BENCH, "copy bandwidth", "tensor.copy_ (read + write)", float("nan"), {"GB/s": bandwidth / 1e9})]
    targets: list[Target] = []
    for case, shapes in workloads(ctx.quick):
        r, t = _case(ctx, case, shapes, bandwidth)
        rows += r
        targets += t
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, targets
