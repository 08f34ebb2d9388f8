"""Segmented Lloyd quantizer: every factor of ResNet34 (identity-init layout), b = 8 and b = 4, 20 iterations.

Side by side in one run, on the same values:

* ``triton``: ``atmc::lloyd_quantize`` with ``method="lloyd"`` (segmented sort, prefix sums, one
  Lloyd launch, codes pass; the reference rows use it too) and with the default ``"fast"`` (four more
  launches: two scans, the init and the refinement kernels), which the speed targets are for (<= 3 ms at
  b = 8, <= 1.5 ms at b = 4; ``bench.quant_quality_triton`` checks its quality);
* ``torch.sort alone``: one sort of all values, the floor the issue compares against;
* ``bucketize + index_add per segment``: the obvious batched-per-segment torch loop (20 iterations,
  no early stop, no host sync);
* ``eager reference``: :func:`lloyd_quantize_ref` (sort + boundary search per segment);
* ``dense-distance k-means``: what the public ATMC code does (``[n, K+1]`` distance matrix,
  argmin, per-centre means, ``.item()`` convergence check every iteration), timed on a subset of
  the segments and scaled to the full workload by value count (both numbers are reported).

Values: each conv/linear ``[out, in*kh*kw]`` gives ``U [out, r]``, ``V [r, in']``, ``C [out, in']``
with ``r = min(out, in')``, all dense Gaussian (the worst case: every segment full, no zeros).
``--quick`` uses a few tiny layers on the CPU (the Triton rows only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import time

import torch
from atmc_triton.kernels import lloyd_triton
from atmc_triton.kernels.lloyd import errors_for_bits, lloyd_quantize, lloyd_quantize_ref

from bench import model
from bench.common import Ctx, Row, Target, bench_ms, predicted

BENCH = "lloyd"
ITERS = 20
DENSE_SUBSET = 0.25  # fraction of the values (whole segments) the dense k-means runs on


def resnet34_shapes() -> list[tuple[int, int]]:
    """``(out, in * kh * kw)`` of every conv / linear of torchvision's ResNet34, in module order."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet34()
    return [
        (m.weight.shape[0], m.weight[0].numel())
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]


def factor_segments(shapes: list[tuple[int, int]], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Flat float32 values of every U, V, C factor and the segment offsets (as a list)."""
    sizes = []
    for out, fan_in in shapes:
        r = min(out, fan_in)
        sizes += [out * r, r * fan_in, out * fan_in]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    g = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(offsets[-1], generator=g, device=device) * 0.05
    return values, offsets


def bucketize_lloyd(values: torch.Tensor, offsets: list, bits: int, iters: int = ITERS) -> torch.Tensor:
    """Per segment: quantile init, then ``iters`` rounds of bucketize + index_add (no host sync)."""
    q = torch.empty_like(values)
    K = 2**bits
    for a, b in zip(offsets, offsets[1:]):
        x = values[a:b]
        c = torch.quantile(x[: 1 << 24], torch.linspace(0, 1, K + 1, device=x.device)[:-1] + 0.5 / K)
        c = torch.cat([c, c.new_zeros(1)]).sort()[0]  # + the pinned zero
        zero = c == 0
        for _ in range(iters):
            a_ = torch.bucketize(x, (c[1:] + c[:-1]) * 0.5)
            s1 = torch.zeros(K + 1, dtype=torch.float64, device=x.device).index_add_(0, a_, x.double())
            cnt = torch.bincount(a_, minlength=K + 1)
            c = torch.where((cnt > 0) & ~zero, (s1 / cnt.clamp(min=1)).float(), c)
        q[a:b] = c[torch.bucketize(x, (c[1:] + c[:-1]) * 0.5)]
    return q


def dense_kmeans(values: torch.Tensor, offsets: list, bits: int, iters: int = ITERS, chunk: int = 1 << 21):
    """Public-ATMC-style k-means per segment: ``[n, K+1]`` distances, argmin, means, ``.item()`` each iteration."""
    q = torch.empty_like(values)
    K = 2**bits
    for a, b in zip(offsets, offsets[1:]):
        x = values[a:b]
        c = torch.cat([x[torch.randint(x.numel(), (K,), device=x.device)], x.new_zeros(1)])  # random init
        prev = None
        for _ in range(iters):
            assign = torch.cat([((xc[:, None] - c[None, :]) ** 2).argmin(1) for xc in x.split(chunk)])
            s1 = torch.zeros(K + 1, device=x.device).index_add_(0, assign, x)
            cnt = torch.bincount(assign, minlength=K + 1)
            c = torch.where(cnt > 0, s1 / cnt.clamp(min=1), c)
            c[-1] = 0
            if prev is not None and (assign != prev).sum().item() == 0:
                break
            prev = assign
        q[a:b] = c[assign]
    return q


def _wall_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall-clock ms of ``reps`` calls after one warm-up (for slow, host-synchronising baselines)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def _triton_runs(device: torch.device) -> bool:
    return device.type == "cuda" or lloyd_triton._interpreted()


def run(ctx: Ctx) -> tuple[list[Row], list[Target]]:
    dev = ctx.device
    shapes = [(16, 27), (32, 144), (8, 288), (10, 32)] if ctx.quick else resnet34_shapes()
    values, offsets = factor_segments(shapes, dev)
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    n, S = values.numel(), len(offsets) - 1
    off_t = torch.tensor(offsets, dtype=torch.int64, device=dev)
    case0 = f"{'tiny' if ctx.quick else 'resnet34'} factors ({n / 1e6:.2f}M values, {S} segments)"
    reps = 1 if ctx.quick else 3
    fast = (lambda f: _wall_ms(f, dev, reps)) if ctx.quick else (lambda f: bench_ms(f, dev))
    triton_ok = _triton_runs(dev)
    rows: list[Row] = []
    targets: list[Target] = []

    sort_ms = fast(lambda: torch.sort(values))
    sort_launches = [model.Launch("torch.sort's index fill", 0, 8 * n), model.sort_pairs("torch.sort", n, 4, 8, 32)]
    sort_op = model.Op("sort", sort_launches, 8 * n)
    rows.append(Row(BENCH, case0, "torch.sort alone (floor)", sort_ms, predicted(sort_ms, sort_op, dev)))
    if triton_ok:  # where the time goes: the segmented sort, then + prefix sums and sums of squares
        seg_ms = fast(lambda: lloyd_triton._segment_sort(values, off_t))
        rows.append(Row(BENCH, case0, "triton pipeline: segmented sort only", seg_ms, {"x_sort": seg_ms / sort_ms}))
        prep_ms = fast(lambda: lloyd_triton._prepare(values, off_t, False))
        rows.append(Row(BENCH, case0, "triton pipeline: sort + prefix sums + sums of squares", prep_ms))
        ms = fast(lambda: errors_for_bits(values, off_t, ITERS, 0.0, "lloyd"))
        rows.append(Row(BENCH, case0, "triton errors_for_bits (b = 1..8, one sort)", ms, {"x_sort": ms / sort_ms}))

    cut = next(i for i, o in enumerate(offsets) if o >= DENSE_SUBSET * n) if not ctx.quick else S
    sub_n = offsets[cut]
    for b in (8, 4):
        case = f"{case0}, b={b}, {ITERS} it"
        bits = torch.full((S,), b, dtype=torch.int32, device=dev)
        ref_ms = _wall_ms(lambda bits=bits: lloyd_quantize_ref(values, off_t, bits, ITERS, 0.0, "lloyd"), dev, reps)
        rows.append(Row(BENCH, case, "eager reference (lloyd_quantize_ref)", ref_ms))
        buck_ms = _wall_ms(lambda b=b: bucketize_lloyd(values, offsets, b), dev, reps)
        rows.append(Row(BENCH, case, "bucketize + index_add per segment", buck_ms))
        dense_ms = _wall_ms(lambda b=b: dense_kmeans(values[:sub_n], offsets[: cut + 1], b), dev, 1)
        rows.append(
            Row(
                BENCH,
                case,
                "dense-distance k-means (ATMC style)",
                dense_ms * n / sub_n,
                {"measured_ms": dense_ms, "on_values": sub_n, "scaled_by": n / sub_n},
            )
        )
        if not triton_ok:
            continue
        tri_ms = fast(lambda bits=bits: lloyd_quantize(values, off_t, bits, ITERS, 0.0, "lloyd"))
        book, codes, _, err = lloyd_quantize(values, off_t, bits, ITERS, 0.0, "lloyd")
        rbook, rcodes, _, rerr = lloyd_quantize_ref(values, off_t, bits, ITERS, 0.0, "lloyd")
        check = {
            "code_mismatch": float((codes != rcodes).float().mean()),
            "book_max_rel": float(((book - rbook).abs() / rbook.abs().clamp(min=1e-30)).max()),
            "err_max_rel": float(((err - rerr).abs() / rerr.abs().clamp(min=1e-30)).max()),
        }
        rows.append(
            Row(
                BENCH,
                case,
                "triton lloyd_quantize, method 'lloyd' (legacy init)",
                tri_ms,
                {
                    "x_sort": tri_ms / sort_ms,
                    "vs_bucketize": buck_ms / tri_ms,
                    "vs_ref": ref_ms / tri_ms,
                    **check,
                    **predicted(tri_ms, model.lloyd_quantize(sizes, b, ITERS), dev),
                },
            )
        )
        # the default method, the one within 1.02x of the optimum, is what the speed targets are for; on a GPU it
        # promises quality (its error within rounding of the reference's), not the reference's bits
        def_ms = fast(lambda bits=bits: lloyd_quantize(values, off_t, bits, ITERS, 0.0))
        err_f = lloyd_quantize(values, off_t, bits, ITERS, 0.0)[3]
        rerr_f = lloyd_quantize_ref(values, off_t, bits, ITERS, 0.0)[3]
        op = model.lloyd_quantize(sizes, b, ITERS, method="fast", triton=model.installed_triton())
        extra = {"x_sort": def_ms / sort_ms, "vs_lloyd": tri_ms / def_ms}
        extra["err_max_rel"] = float(((err_f - rerr_f).abs() / rerr_f.abs().clamp(min=1e-30)).max())
        rows.append(
            Row(BENCH, case, "triton lloyd_quantize, default 'fast'", def_ms, extra | predicted(def_ms, op, dev))
        )
        if ctx.quick:  # a smoke run on tiny sizes measures nothing worth a target
            continue
        limit = 3.0 if b == 8 else 1.5
        what = f"triton 'fast' (the default), all {S} segments, b={b} (ms)"
        targets.append(Target(BENCH, what, def_ms, f"<= {limit:g} ms", def_ms <= limit))
        targets.append(
            Target(BENCH, f"triton vs bucketize + index_add, b={b}", buck_ms / tri_ms, ">= 20x", buck_ms / tri_ms >= 20)
        )
    return rows, targets
