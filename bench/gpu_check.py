"""One-shot GPU check: correctness of every op, then the benchmarks, in under 8 minutes on a cold machine.

``python -m bench.gpu_check [--out DIR]`` (on the GPU machine, cold Triton cache, after
``pip install --no-index --no-deps --no-build-isolation -e .``; ``DIR`` defaults to ``$OUT/check``):

1. correctness of every op against its reference at a few representative shapes and dtypes, with
   NaN-poisoned outputs (:data:`CORRECTNESS`; GEMM tiles on one pinned config each, so its cold
   compiles stay under 60; :data:`LEFT_OUT` says which specializations it leaves to ``pytest -m gpu``);
2. the benchmarks (:data:`BENCHMARKS`), autotuned over the configs the static gate accepts (the
   launchers prune the rest before compiling), each against its target and the roofline
   prediction of :mod:`bench.model`, and each GEMM row's output against cuBLAS's (rows with
   ``M <= SPARSE_MAX_M`` also time ``torch.sparse`` CSR, cuSPARSE, side by side);
3. one table: measured vs target vs prediction.

Every row is appended to ``DIR/gpu_check.jsonl`` (flushed and fsynced) the moment it is measured;
a failure is caught per case and recorded, and a soft deadline (``--budget-s``, default 420)
skips what is left, so a crash or the machine's time limit keeps every figure already taken.

``python -m bench.gpu_check --estimate`` (CPU, no GPU needed) records every launch the check
makes (Triton's interpreter, kernels not run; benchmark layers at scaled-down sizes with the same
specializations), compiles each distinct specialization ahead of time for sm_90 with Triton 3.6
when available (what the test machine has), and prints the cold-run estimate: compile CPU seconds
(the GPU machine compiles serially, in-process) plus the predicted benchmark time and harness
overheads. ``tests/test_gpu_static.py`` asserts the estimate is at most 8 minutes.
Without CUDA and without ``--estimate`` it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

BUDGET_S = 420.0  # the soft deadline: 7 of the 8 minutes
MAX_CORRECTNESS_COMPILES = 60
SPARSE_MAX_M = 16  # GEMM rows up to this batch also time torch.sparse CSR (the side-by-side)
CUBLAS_TOL = 1e-2  # a benchmarked GEMM's max |packed - cuBLAS| / max |cuBLAS| (fp16 roundings: ~1e-3)
STARTUP_S = 25.0  # python + torch + CUDA context + first allocations, on the test machine (estimate only)
TIMING_OVERHEAD_S = 0.5  # one bench_ms call (25 ms warm-up + 200 ms of repetitions + sync), estimate only
AUTOTUNE_OVERHEAD_S = 0.2  # benchmarking one autotune config for one key (estimate only)
LEFT_OUT = (
    "Nesterov ADMM steps, fp16 ADMM grads (bf16 covers the half-precision path), "
    "Lloyd with max_iter = 0 / tol > 0, GEMM with raw (unquantized, 32-bit) factors, book_gather=True, "
    "biases, identity on U (K > N), bf16 at M > 32, bitmap factors (pack_(formats='size')), "
    "the fixed test tiles of tests/test_lowrank_gemm.py and tests/test_bitmap_gemm.py: "
    "all of them run in `pytest -m gpu`"
)


# ---------------------------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def poisoned_outputs():
    """Launcher output allocations start as NaN (floats) or a sentinel (ints): an unwritten element shows."""
    from atmc_triton.kernels import lloyd_split_triton, lloyd_triton, lowrank_gemm_triton

    def poison(shape, dtype, device):
        import torch

        fill = float("nan") if dtype.is_floating_point else 77 if dtype == torch.uint8 else -12345
        return torch.full(shape, fill, dtype=dtype, device=device)

    saved = lloyd_triton._new, lowrank_gemm_triton._empty, lloyd_split_triton._empty
    lloyd_triton._new = lowrank_gemm_triton._empty = lloyd_split_triton._empty = poison
    try:
        yield
    finally:
        lloyd_triton._new, lowrank_gemm_triton._empty, lloyd_split_triton._empty = saved


@contextlib.contextmanager
def split_in_interpreter():
    """The Lloyd launchers split by segment with the Triton kernels in the interpreter too (the check's dry
    recordings must hold the launches a GPU makes; executed, the interpreter takes about 1.3 s a block)."""
    from atmc_triton.kernels import lloyd_split_triton

    saved = lloyd_split_triton.INTERPRETED_MAX
    lloyd_split_triton.INTERPRETED_MAX = 2**62
    try:
        yield
    finally:
        lloyd_split_triton.INTERPRETED_MAX = saved


def _admm_case(n: int, k_frac: float, grad: str, dual: bool = False, hinted: bool = False) -> Callable[[object], dict]:
    """``hinted``: a first step, then the checked one with the first step's tau as its hint (the band path)."""

    def run(device) -> dict:
        import torch
        from atmc_triton.kernels.admm import admm_dual_update_triton, admm_step_ref, admm_step_triton

        g = torch.Generator().manual_seed(n)
        w, z, u = (torch.randn(n, generator=g) * 0.05 for _ in range(3))
        mom = torch.randn(n, generator=g) * 0.01
        if dual:
            want = u.clone()
            want += w - z
            got = u.to(device)
            admm_dual_update_triton(got, w.to(device), z.to(device))
            return {"max_abs": float((got.cpu() - want).abs().max()), "ok": torch.equal(got.cpu(), want)}
        gr = (torch.randn(n, generator=g) * 0.01).to(getattr(torch, grad))
        k = int(k_frac * n)
        hp = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, rho=1e-3, k=k, nesterov=False)
        ref = dict(w=w.clone(), grad=gr.float(), mom=mom.clone(), z=z, u=u, mask=torch.zeros(n, dtype=torch.bool))
        hint = None
        if hinted:  # a reference step first: the checked step starts from its state, hinted with its tau
            hint = admm_step_ref(**ref, **hp)
        start = {key: ref[key].clone() for key in ("w", "mom")}
        tau_ref = admm_step_ref(**ref, **hp, tau_hint=hint)
        dev = {key: v.to(device) for key, v in dict(grad=gr, z=z, u=u, **start).items()}
        dev["mask"] = torch.zeros(n, dtype=torch.bool, device=device)
        path = None
        if hinted:  # the same step on copies through the raw launch, whose workspace says the path it took
            from atmc_triton.kernels.admm_triton import BAND, PATH_WORD, launch_admm_step

            probe = {key: v.clone() for key, v in dev.items()}
            s, tau = torch.empty_like(probe["w"]), probe["w"].new_empty(())
            args = [probe[key] for key in ("w", "grad", "mom", "z", "u", "mask")] + [s, tau]
            ws = launch_admm_step(
                *args, *(hp[key] for key in ("lr", "momentum", "weight_decay", "rho", "k", "nesterov")), hint.to(device)
            )
            path = "band" if int(ws[PATH_WORD]) == BAND else "full"
        tau = admm_step_triton(**dev, **hp, tau_hint=None if hint is None else hint.to(device))
        nnz = int((dev["w"] != 0).sum())
        # the fused update may contract into FMAs: the kept set may differ at ties within one ulp
        differ = int((dev["mask"].cpu() != ref["mask"]).sum())
        t, t_ref = float(tau), float(tau_ref)
        tau_ok = t == t_ref or abs(t - t_ref) <= 1e-6 * abs(t_ref)  # (+inf when nothing is kept)
        return {
            "kept": nnz,
            "k": k,
            "mask_mismatch": differ,
            "w_max_abs_err": float((dev["w"].cpu() - ref["w"]).abs().max()),
            "tau": t,
            "tau_ref": t_ref,
            "path": path,
            "ok": nnz <= k and differ <= max(2, n // 100_000) and tau_ok and path in (None, "band"),
        }

    return run


def _lloyd_case(sizes: list[int], bits: list[int], errors_for_bits: bool = False) -> Callable[[object], dict]:
    def run(device) -> dict:
        import torch
        from atmc_triton.kernels.lloyd import errors_for_bits_ref, lloyd_quantize_ref
        from atmc_triton.kernels.lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton

        g = torch.Generator().manual_seed(sum(sizes))
        values = torch.randn(sum(sizes), generator=g)
        values[torch.rand(values.numel(), generator=g) < 0.1] = 0.0
        offsets = torch.tensor([0] + sizes).cumsum(0)
        if errors_for_bits:
            got = errors_for_bits_triton(values.to(device), offsets.to(device), 20, 0.0).cpu()
            want = errors_for_bits_ref(values, offsets, 20, 0.0)
            rel = float(((got.double() - want.double()).abs() / want.double().abs().clamp(min=1e-12)).max())
            # ("fast" on a GPU: a near-tie may resolve the other way at an equal error, as the gpu tests allow)
            return {"err_max_rel": rel, "ok": rel <= 1e-3 and not got.isnan().any()}
        b = torch.tensor(bits, dtype=torch.int32)
        got = [t.cpu() for t in lloyd_quantize_triton(values.to(device), offsets.to(device), b.to(device), 20, 0.0)]
        want = lloyd_quantize_ref(values, offsets, b, 20, 0.0)
        mism = float((got[1] != want[1]).float().mean())
        book_rel = float(((got[0] - want[0]).abs() / want[0].abs().clamp(min=1e-30)).max())
        # "fast" (the default) promises quality on a GPU, not the reference's bits (a near-tie of its windowed DP
        # may resolve the other way): each segment's error within 0.1 % of the reference's
        err_rel = float(((got[3].double() - want[3].double()) / want[3].double().clamp(min=1e-30)).max())
        o, decoded, sse_rel = offsets.tolist(), True, 0.0
        for s in range(len(sizes)):  # codes decode to q, and q's error is the one reported
            cs, qs, xs = got[1][o[s] : o[s + 1]].long(), got[2][o[s] : o[s + 1]], values[o[s] : o[s + 1]].double()
            decoded &= bool((cs >= 0).all() and (cs < got[0].shape[1]).all()) and torch.equal(qs, got[0][s][cs])
            sse = float(((xs - qs.double()) ** 2).sum())
            sse_rel = max(sse_rel, abs(sse - float(got[3][s])) / max(sse, 1e-30))
        return {
            "code_mismatch": mism,
            "book_max_rel": book_rel,
            "err_max_rel_excess": err_rel,
            "reported_vs_recomputed_sse": sse_rel,
            "ok": err_rel <= 1e-3 and decoded and sse_rel <= 1e-5 and not got[2].isnan().any(),
        }

    return run


def _split_case(sizes: list[int]) -> Callable[[object], dict]:
    """The quantizer's segmented sort (``torch.sort`` + the Triton split) against the torch fix-up: the same
    bits (NaN, +-inf, +-0 and ties included)."""

    def run(device) -> dict:
        import torch
        from atmc_triton.kernels.lloyd_split_triton import segment_sort, segment_sort_ref

        g = torch.Generator().manual_seed(len(sizes))
        values = torch.randn(sum(sizes), generator=g)
        for special, share in ((0.0, 0.1), (-0.0, 0.05), (0.5, 0.05), (float("nan"), 1e-4), (float("inf"), 1e-4)):
            values[torch.rand(values.numel(), generator=g) < share] = special
        offsets = torch.tensor([0] + sizes).cumsum(0)
        got = segment_sort(values.to(device), offsets.to(device)).cpu()
        want = segment_sort_ref(values.to(device), offsets.to(device)).cpu()  # (torch.sort's order on the device)
        diff = int((got.view(torch.int32) != want.view(torch.int32)).sum())
        return {"values_differing": diff, "ok": diff == 0}

    return run


def _gemm_case(N: int, K: int, ratio: float, bits: int, structure: str, M: int, dtype: str) -> Callable:
    def run(device) -> dict:
        import torch
        from atmc_triton.kernels.lowrank_gemm import atmc_linear_ref
        from atmc_triton.kernels.lowrank_gemm_triton import linear_launch

        from bench.gemm import Layer

        layer = Layer("check", N, K, ratio, bits, structure, torch.device("cpu"))
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(getattr(torch, dtype))
        facs = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f) for f in layer.factors]
        got = linear_launch(x.to(device), None, N, layer.r, layer.identity, facs, pinned_config(M)).float().cpu()
        want = atmc_linear_ref(x.float(), None, N, layer.r, layer.identity, *[t for f in layer.factors for t in f])
        rel = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
        # float32 runs tf32 tensor cores on a GPU (truncated operands, up to 4 of them per element)
        fp32_tol = 1e-4 if torch.device(device).type == "cpu" else 2e-3
        tol = {"float32": fp32_tol, "float16": 2e-2, "bfloat16": 5e-2}[dtype]
        return {"max_rel_err": rel, "formats": layer.fmts, "ok": rel <= tol and not got.isnan().any()}

    return run


def pinned_config(M: int) -> dict:
    """One autotune config per GEMM kernel for the correctness phase (with the launch options the autotuner
    would use, so the benchmarks reuse the compiled kernels); the benchmarks autotune over all of them."""
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    small = M <= lt.SMALL_M
    tile = lt.TILE_SMALL_CONFIGS[0] if small else lt.TILE_LARGE_CONFIGS[2]
    csr = lt.CSR_NARROW_CONFIGS[0] if (small and M <= 8) else lt.CSR_WIDE_CONFIGS[0]
    # (num_ctas is left out: wrap_triton refuses it as a kernel argument on a GPU)
    return {c: {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} for c, cfg in
            (("tile", tile), ("csr", csr))}  # fmt: skip


CORRECTNESS: list[tuple[str, str, Callable]] = [  # (op, case, run(device) -> metrics with "ok")
    ("admm_step", "n=1000003 k=10% fp32 grads", _admm_case(1_000_003, 0.1, "float32")),
    ("admm_step", "n=1000003 k=10% bf16 grads", _admm_case(1_000_003, 0.1, "bfloat16")),
    ("admm_step", "n=1000003 k=10% fp32 grads, hinted (band path)", _admm_case(1_000_003, 0.1, "float32", hinted=True)),
    ("admm_step", "n=4099 k=n (keep all)", _admm_case(4099, 1.0, "float32")),
    ("admm_step", "n=4099 k=0 (keep none)", _admm_case(4099, 0.0, "float32")),
    ("admm_dual_update", "n=1000003", _admm_case(1_000_003, 0, "float32", dual=True)),
    (
        "lloyd_quantize",
        "segments 1/7/63/1000/100003, b 8/4/1/8/4",
        _lloyd_case([1, 7, 63, 1000, 100_003], [8, 4, 1, 8, 4]),
    ),
    ("lloyd_errors_for_bits", "segments 7/1000/100003", _lloyd_case([7, 1000, 100_003], [], errors_for_bits=True)),
    ("segment_sort", "111 segments, 2.1M values (128 bins)", _split_case([0, 3] + [19_000] * 108 + [47_001])),
    ("segment_sort", "300 segments, 30k values (512 bins, 2-byte ids)", _split_case([1] * 299 + [29_701])),
    ("atmc_linear", "1024x768 r=0.05 b=4 M=1 fp16", _gemm_case(1024, 768, 0.05, 4, "identity", 1, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 M=16 fp16", _gemm_case(1024, 768, 0.05, 4, "identity", 16, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=8 M=16 fp16", _gemm_case(1024, 768, 0.05, 8, "identity", 16, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 M=1000 fp16", _gemm_case(1024, 768, 0.05, 4, "identity", 1000, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 svd M=16 fp16", _gemm_case(1024, 768, 0.05, 4, "svd", 16, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 svd M=1000 fp16", _gemm_case(1024, 768, 0.05, 4, "svd", 1000, "float16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 M=16 bf16", _gemm_case(1024, 768, 0.05, 4, "identity", 16, "bfloat16")),
    ("atmc_linear", "1024x768 r=0.05 b=4 M=16 fp32", _gemm_case(1024, 768, 0.05, 4, "identity", 16, "float32")),
]


# ---------------------------------------------------------------------------------------------- benchmarks


def _admm_sizes() -> list[int]:
    from bench.admm import identity_factors, resnet34_shapes

    return [a * b for a, b in identity_factors(resnet34_shapes())]


def _bench_admm(device, scale: bool) -> Iterator[dict]:
    import torch
    from atmc_triton.kernels.admm import admm_step, admm_step_triton

    from bench import model
    from bench.admm import HP, band_fraction, flat_state
    from bench.common import bench_ms

    n = 1 << 20 if scale else sum(_admm_sizes())
    for gdt in (torch.float32, torch.bfloat16):
        t = flat_state(n, device, gdt)
        op = admm_step if device.type == "cuda" else admm_step_triton  # (CPU: the dry recording for --estimate)
        kw = dict(HP, k=n // 10, nesterov=False)
        hint = [op(**t, **kw)]  # the first step has no previous tau (the FULL path)
        if scale:
            op(**t, **kw, tau_hint=hint[0])  # (the recording: the band path's launches too)
            ms, pred = float("nan"), model.admm_step(n, gdt.itemsize)
        else:

            def step(t=t, kw=kw, hint=hint, op=op):
                hint[0] = op(**t, **kw, tau_hint=hint[0])  # as the optimizer does: the previous tau (band path)

            ms = bench_ms(step, device)
            pred = model.admm_step(n, gdt.itemsize, band=band_fraction(t, hint[0]))  # the band the steps read
        yield _row("admm_step", f"resnet34 factors n={n} grads {str(gdt)[6:]}", ms, pred)
        del t


def _bench_lloyd(device, scale: bool) -> Iterator[dict]:
    import torch
    from atmc_triton.kernels.lloyd import lloyd_quantize

    from bench import model
    from bench.common import bench_ms

    sizes = [100, 5000, 30000] if scale else _admm_sizes()
    values = torch.randn(sum(sizes), device=device) * 0.05
    off = torch.tensor([0] + sizes, device=device).cumsum(0)
    for b in (8, 4):
        bits = torch.full((len(sizes),), b, dtype=torch.int32, device=device)
        fn = lambda bits=bits: lloyd_quantize(values, off, bits, 20, 0.0)  # noqa: E731
        if device.type != "cuda":
            from atmc_triton.kernels.lloyd_triton import lloyd_quantize_triton

            fn = lambda bits=bits: lloyd_quantize_triton(values, off, bits, 20, 0.0)  # noqa: E731
        ms = bench_ms(fn, device) if not scale else (fn(), float("nan"))[1]
        yield _row(
            "lloyd_quantize",
            f"resnet34 factors b={b}",
            ms,
            model.lloyd_quantize(sizes, b, method="fast", triton=model.installed_triton()),  # the default method
            limit_ms=3.0 if b == 8 else 1.5 if b == 4 else None,
        )


GEMM_BENCH = (  # (N, K, ratio, bits, structure, Ms): the targets' layers
    (4096, 4096, 0.05, 8, "identity", (1, 4, 16, 1024, 8192)),
    (4096, 4096, 0.05, 4, "identity", (1, 16, 1024, 8192)),
    (11008, 4096, 0.05, 4, "identity", (1, 16)),
    (4096, 4096, 0.05, 4, "svd", (16, 1024)),
)


def _bench_gemm(device, scale: bool) -> Iterator[dict]:
    import torch
    import torch.nn.functional as F
    from atmc_triton.kernels.lowrank_gemm_triton import linear_launch

    from bench import model
    from bench.common import bench_ms
    from bench.gemm import Layer

    tri = model.installed_triton()  # the counts of the Triton that compiled the kernels (3.6 on the H200)
    for N, K, ratio, bits, structure, Ms in GEMM_BENCH:
        n_, k_ = (N * 384 // 4096 // 16 * 16, K * 256 // 4096) if scale else (N, K)  # same specializations
        layer = Layer("bench", n_, k_, ratio, bits, structure, device)
        for M in Ms:
            dt = torch.float16
            x = torch.randn(M, k_, device=device).to(dt)
            # on the GPU through the op: a direct launch goes through wrap_triton, whose autotuners with pruning are
            # rebuilt (and re-benchmarked) on every call; the op calls the kernels with it off (CPU: the recording)
            run = (
                (lambda x=x, lay=layer: lay.triton(x))
                if device.type == "cuda"
                else (lambda x=x, lay=layer: linear_launch(x, None, lay.N, lay.r, lay.identity, lay.factors))
            )
            if scale:
                run()
                op = model.atmc_linear(M, N, K, ratio, bits, structure, triton=tri)
                yield _row("atmc_linear", f"{N}x{K} M={M}", float("nan"), op) | {"M": M}
                continue
            ms = bench_ms(run, device)
            dense_ms = bench_ms(lambda x=x, w=layer.w16: F.linear(x, w), device)
            op = model.atmc_linear(M, N, K, ratio, bits, structure, triton=tri)
            row = _row("atmc_linear", f"{N}x{K} r={ratio} b={bits} {structure} M={M}", ms, op)
            want = F.linear(x, layer.w16).float()  # the autotuned configs' answer against cuBLAS's
            row["max_rel_vs_cublas"] = float((run().float() - want).abs().max() / want.abs().max())
            row["ok"] = row["max_rel_vs_cublas"] <= CUBLAS_TOL  # the only check of the autotuned configs
            row["cublas_ms"] = dense_ms
            row["x_cublas"] = dense_ms / ms
            row["M"] = M
            if M <= SPARSE_MAX_M:  # torch.sparse CSR (cuSPARSE SpMM) side by side, where the packed kernels run
                try:
                    if getattr(layer, "sparse_ops", None) is None:
                        layer.make_sparse()
                    sparse_ms = bench_ms(lambda x=x, lay=layer: lay.torch_sparse(x), device)
                    row["torch_sparse_ms"] = sparse_ms
                    row["x_torch_sparse"] = sparse_ms / ms
                except Exception as e:  # beta API: a failure is recorded, not fatal
                    row["torch_sparse_error"] = f"{type(e).__name__}: {e}"[:200]
            yield row


BENCHMARKS: list[tuple[str, Callable]] = [("admm", _bench_admm), ("lloyd", _bench_lloyd), ("gemm", _bench_gemm)]


def _row(op: str, case: str, ms: float, model_op, limit_ms: float | None = None) -> dict:
    """A benchmark row: measured vs the model's prediction and floor on this GPU, and the target."""
    from bench import model

    gpu = model.gpu_for(_gpu_name())
    pred, floor = model_op.predict_s(gpu) * 1e3, model_op.floor_s(gpu) * 1e3
    row = {"phase": "bench", "op": op, "case": case, "measured_ms": ms, "predicted_ms": pred, "floor_ms": floor}
    row |= {"x_pred": ms / pred, "x_floor": ms / floor, "target": model_op.target}
    if model_op.target_x_floor is not None:
        row["met"] = ms / floor <= model_op.target_x_floor
    if limit_ms is not None:
        row["met"] = ms <= limit_ms
    return row


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- the run


class Log:
    """Appends each row to ``DIR/gpu_check.jsonl`` at once (flushed, fsynced)."""

    def __init__(self, out: Path, env: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.env, self.rows = out / "gpu_check.jsonl", env, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps({**self.env, **row}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_check(out: Path, budget_s: float = BUDGET_S) -> int:
    t0 = time.time()  # (before torch's import: a cold import takes seconds of the budget too)
    import faulthandler

    import torch

    device = torch.device("cuda")

    faulthandler.dump_traceback_later(budget_s + 90, exit=True)  # a hung kernel: say where, and end while time is left
    try:
        return _run_check(out, budget_s, device, t0)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _run_check(out: Path, budget_s: float, device, t0: float) -> int:
    """:func:`run_check`'s body (correctness, then the benchmarks), under its hang guard."""
    import torch

    from bench.common import environment

    log = Log(out, environment(device))
    log.add({"phase": "start", "left_out": LEFT_OUT})
    failed = 0
    with poisoned_outputs():
        for op, case, fn in CORRECTNESS:
            if time.time() - t0 > budget_s:
                log.add({"phase": "correctness", "op": op, "case": case, "skipped": "time budget"})
                continue
            t1 = time.time()
            try:
                res = fn(device)
            except Exception as e:  # one op's failure must not hide the others
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
            failed += not res["ok"]
            log.add({"phase": "correctness", "op": op, "case": case, "seconds": time.time() - t1, **res})
            print(f"[check] {op} {case}: {'ok' if res['ok'] else 'FAILED'} ({time.time() - t1:.1f}s)", flush=True)
    for name, fn in BENCHMARKS:
        if time.time() - t0 > budget_s:
            log.add({"phase": "bench", "op": name, "skipped": "time budget"})
            continue
        try:
            for row in fn(device, False):  # (generators: each row is logged the moment it is measured)
                log.add(row)
                failed += row.get("ok") is False  # a benchmarked result that disagrees with cuBLAS
                print(f"[bench] {row['op']} {row['case']}: {row['measured_ms']:.4g} ms", flush=True)
                if time.time() - t0 > budget_s:
                    log.add({"phase": "bench", "op": name, "skipped": "time budget (the rest of this benchmark)"})
                    break
            torch.cuda.empty_cache()
        except Exception as e:
            failed += 1
            err = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
            log.add({"phase": "bench", "op": name, **err})
    print(summary(log.rows))
    (out / "gpu_check.md").write_text(summary(log.rows))
    print(f"[check] {time.time() - t0:.0f} s in all; {failed} failure(s)")
    return 1 if failed else 0


def summary(rows: list[dict]) -> str:
    """One table: every op's correctness, then measured vs target vs the roofline prediction."""
    lines = [
        "| phase | op | case | result | measured ms | predicted ms | measured / predicted | floor ms | target | met |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("phase") == "correctness":
            res = "skipped" if "skipped" in r else "ok" if r.get("ok") else f"FAILED {r.get('error', '')[:80]}"
            lines.append(f"| correctness | {r['op']} | {r['case']} | {res} | | | | | | |")
        elif r.get("phase") == "bench" and "measured_ms" in r:
            met = {True: "yes", False: "NO"}.get(r.get("met"), "")
            if "x_cublas" in r:
                met = f"{r['x_cublas']:.2f}x cuBLAS"
                if "x_torch_sparse" in r:
                    met += f", {r['x_torch_sparse']:.2f}x torch.sparse"
            res = "" if r.get("ok") is not False else f"FAILED: {r['max_rel_vs_cublas']:.3g} from cuBLAS (max rel)"
            lines.append(
                f"| bench | {r['op']} | {r['case']} | {res} | {r['measured_ms']:.4g} | {r['predicted_ms']:.4g} | "
                f"{r['x_pred']:.2f} | {r['floor_ms']:.4g} | {r['target']} | {met} |"
            )
        elif r.get("phase") == "bench":
            lines.append(f"| bench | {r['op']} | | {r.get('skipped') or r.get('error', '')} | | | | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the estimate


def record_check() -> tuple[list[dict], list[dict]]:
    """Launches of the correctness phase and of the benchmarks (dry, in the interpreter), autotune expanded."""
    import torch

    from bench.aot import record_launches, unique_specs
    from bench.static import _gemm_configs

    cpu = torch.device("cpu")
    with split_in_interpreter(), record_launches(execute=False) as corr:
        for _, _, fn in CORRECTNESS:
            with contextlib.suppress(Exception):  # dry launches leave outputs unwritten: comparisons may raise
                fn(cpu)
    with split_in_interpreter(), record_launches(execute=False) as bench:
        for _, fn in BENCHMARKS:
            for _ in fn(cpu, True):
                pass
    corr = unique_specs(corr)  # pinned configs: what is recorded is what runs
    seen = {json.dumps(s, sort_keys=True) for s in corr}
    bench = [
        s
        for s in unique_specs(_gemm_configs(unique_specs(bench), keep_m1=True))
        if json.dumps(s, sort_keys=True) not in seen
    ]
    return corr, bench


def estimate(triton_path: str | None, per_kernel: int | None = None) -> dict:
    """The cold-run estimate in seconds, with its parts.

    ``per_kernel=None`` compiles every spec of the check; ``per_kernel=p`` compiles only the first
    ``p`` specs of each kernel and charges every other spec of that kernel their mean CPU time (the
    test's setting: a fresh 2-core machine compiles a handful, not all ~120).
    """
    from bench import model
    from bench.aot import compile_specs, record_launches

    corr, bench = record_check()
    for s in corr + bench:
        s["family"] = "check"
    specs = corr + bench
    if per_kernel is None:
        sample = list(range(len(specs)))
    else:
        if per_kernel < 1:
            raise ValueError(f"estimate: per_kernel must be >= 1 or None, got {per_kernel}")
        taken: dict[str, int] = {}
        sample = []
        for i, s in enumerate(specs):
            if taken.get(s["name"], 0) < per_kernel:
                taken[s["name"]] = taken.get(s["name"], 0) + 1
                sample.append(i)
    res = compile_specs([specs[i] for i in sample], arch=90, triton_path=triton_path)
    bad = [r["error"] for r in res if not r["ok"]]
    times: dict[str, list[float]] = {}
    for i, r in zip(sample, res):
        times.setdefault(specs[i]["name"], []).append(r.get("compile_cpu_s", r.get("compile_s", 0.0)))
    mean = {name: sum(t) / len(t) for name, t in times.items()}
    cpu_s = [mean[s["name"]] for s in specs]
    compile_corr, compile_bench = sum(cpu_s[: len(corr)]), sum(cpu_s[len(corr) :])
    import torch

    gpu = model.H200
    run_s = 0.0
    timings = 0
    with record_launches(execute=False):  # only the rows' predictions are needed: dry launches
        rows = [row for _, fn in BENCHMARKS for row in fn(torch.device("cpu"), True)]
    for row in rows:
        # + cuBLAS, and torch.sparse where M <= SPARSE_MAX_M (charged at the packed kernel's time)
        calls = (2 + (row["M"] <= SPARSE_MAX_M)) if row["op"] == "atmc_linear" else 1
        timings += calls
        run_s += calls * 20 * row["predicted_ms"] / 1e3  # beyond the fixed 225 ms of a do_bench call
    tuned = sum(1 for s in bench + corr if s.get("autotuned"))
    total = (
        STARTUP_S
        + compile_corr
        + compile_bench
        + timings * TIMING_OVERHEAD_S
        + tuned * AUTOTUNE_OVERHEAD_S
        + run_s
        + 20.0  # references on the CPU and input generation (ResNet34-sized tensors)
    )
    return {
        "correctness_compiles": len(corr),
        "bench_compiles": len(bench),
        "compile_cpu_s": compile_corr + compile_bench,
        "compiled": len(sample),
        "timings": timings,
        "autotune_configs": tuned,
        "total_s": total,
        "failures": bad,
        "gpu": gpu.name,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="directory for gpu_check.jsonl / gpu_check.md")
    ap.add_argument("--estimate", action="store_true", help="on CPU: count and time the cold compiles")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="soft deadline in seconds")
    args = ap.parse_args(argv)
    if args.estimate:
        from bench.static import triton36_site

        side, why = triton36_site(install=False)
        print(
            f"[estimate] compiling with {'triton 3.6.0 at ' + side if side else 'the installed triton (' + why + ')'}"
        )
        est = estimate(side)
        print(json.dumps(est, indent=1))
        print(
            f"[estimate] cold run: {est['total_s'] / 60:.1f} min (limit 8); "
            f"{est['correctness_compiles']} correctness compiles (limit {MAX_CORRECTNESS_COMPILES})"
        )
        return 0 if est["total_s"] <= 480 and not est["failures"] else 1
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed", file=sys.stderr)
        return 2
    try:  # (the kernels live in kernels/, which only an install maps to atmc_triton.kernels)
        import atmc_triton.kernels  # noqa: F401
    except ImportError as e:
        print(
            f"gpu_check: atmc_triton is not installed ({e}); first run "
            "`python3 -m pip install --no-index --no-deps --no-build-isolation -e .`",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; on CPU run `python -m bench.gpu_check --estimate`", file=sys.stderr)
        return 2
    if args.out is None:
        if not os.environ.get("OUT"):
            ap.error("--out is required (or $OUT, as on the lent GPU machine: the check then writes $OUT/check)")
        args.out = Path(os.environ["OUT"]) / "check"
    return run_check(args.out, args.budget_s)


if __name__ == "__main__":
    if "--estimate" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # launches are recorded in the interpreter
    sys.exit(main())
