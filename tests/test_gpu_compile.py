"""Ahead-of-time compile every Triton kernel specialization for an H100 (sm_90), without a GPU.

Triton's CPU interpreter accepts code the GPU compiler rejects (``tl.dot`` tile minimums, dtype
rules, layouts). This test records every kernel launch the launchers make on small CPU inputs
in the interpreter (plus each autotune config the GEMM launchers keep and bf16 variants of
half-precision pointers), then compiles all of them with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` in a fresh process (Triton's bundled ptxas; no driver needed), through
the shared recorder and compiler of ``bench/aot.py`` (which the static gate also uses). It does not
prove the code is fast or correct on a GPU: the ``gpu`` tests do that, and ``test_gpu_static.py``
judges what the compiled code looks like.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from bench.aot import compile_specs, record_launches, unique_specs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="records launches in Triton's CPU interpreter")

HERE = Path(__file__).resolve().parent


@pytest.fixture
def recorder():
    with record_launches() as specs:
        yield specs


def _exercise_admm():
    from atmc_triton.kernels.admm import admm_dual_update_triton, admm_step_triton

    for n, k, grad_dtype, nesterov in [
        (1, 1, torch.float32, False),
        (5000, 0, torch.float32, False),
        (5000, 700, torch.float16, True),
        (5000, 5000, torch.float32, False),
    ]:
        w, mom, z, u = (torch.randn(n) for _ in range(4))
        admm_step_triton(
            w,
            torch.randn(n).to(grad_dtype),
            mom,
            z,
            u,
            torch.zeros(n, dtype=torch.bool),
            0.1,
            0.9,
            1e-4,
            0.1,
            k,
            nesterov,
        )
    admm_dual_update_triton(torch.randn(100), torch.randn(100), torch.randn(100))


def _exercise_lloyd():
    from atmc_triton.kernels.lloyd_split_triton import segment_sort
    from atmc_triton.kernels.lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton

    x = torch.randn(3000)
    off = torch.tensor([0, 1000, 1003, 3000])
    lloyd_quantize_triton(x, off, torch.tensor([8, 2, 4], dtype=torch.int32), 5, 1e-5, "lloyd")
    errors_for_bits_triton(x, off, 5, 1e-5, "lloyd")
    x, off = x[:300], torch.tensor([0, 100, 103, 300])  # the fast path's kernels (slow in the interpreter)
    lloyd_quantize_triton(x, off, torch.tensor([3, 2, 1], dtype=torch.int32), 5, 1e-5, "fast")
    errors_for_bits_triton(x, off, 5, 1e-5, "fast")
    segment_sort(x, off)  # the launchers' split (the reference's fix-up in the interpreter): 16 and 512 bins
    segment_sort(x, torch.tensor([*range(290), 300]))


def _exercise_gemm():
    sys.path.insert(0, str(HERE))
    from atmc_triton.kernels import lowrank_gemm_triton as lt
    from atmc_triton.kernels.lowrank_gemm import IDENTITY_NONE, IDENTITY_U, IDENTITY_V
    from atmc_triton.kernels.packed_format import FMT_BITMAP, FMT_CSR, FMT_DENSE, FMT_EMPTY
    from test_lowrank_gemm import layer_case

    for M, fmts, identity, dtype, raw in [
        (3, (FMT_BITMAP, FMT_BITMAP, FMT_CSR), IDENTITY_NONE, torch.float16, False),
        (70, (FMT_BITMAP, FMT_EMPTY, FMT_BITMAP), IDENTITY_V, torch.float32, True),
        (3, (FMT_DENSE, FMT_DENSE, FMT_DENSE), IDENTITY_NONE, torch.float32, False),
        (3, (FMT_CSR, FMT_CSR, FMT_CSR), IDENTITY_U, torch.float16, False),
        (20, (FMT_DENSE, FMT_EMPTY, FMT_CSR), IDENTITY_V, torch.float32, True),
        (70, (FMT_DENSE, FMT_DENSE, FMT_CSR), IDENTITY_NONE, torch.float16, False),
        (70, (FMT_CSR, FMT_DENSE, FMT_DENSE), IDENTITY_U, torch.float32, False),
        (70, (FMT_CSR, FMT_CSR, FMT_EMPTY), IDENTITY_NONE, torch.float32, True),
    ]:
        x, b, n, r, factors = layer_case(M, 48, 40, 24, identity, fmts, dtype=dtype, raw=raw, density=0.2)
        lt.linear_launch(x, b, n, r, identity, factors, {})
        for f, (rows, cols) in zip(factors, ((n, r), (r, x.shape[1]), (n, x.shape[1]))):
            lt.atmc_decode_triton(f[0], rows, cols, *f[1:])
    return lt


def _autotune_variants(specs, lt):
    """Each autotune config the GEMM launchers keep (after pruning) applied to a recorded launch of the kernel."""
    out = []
    for spec in specs:
        if spec["name"] == "_tile_kernel":
            small = spec["args"]["M_BUCKET"][1] <= lt.SMALL_M
            configs = lt.tile_configs(small, spec["args"]["BLOCK_M"][1] if small else None)
        elif spec["name"] == "_csr_mm_kernel":
            configs = lt.CSR_NARROW_CONFIGS if spec["args"]["BLOCK_M"][1] <= 8 else lt.CSR_WIDE_CONFIGS
        else:
            continue
        for cfg in configs:
            args = {**spec["args"], **{k: ["int", v] for k, v in cfg.kwargs.items()}}
            out.append({**spec, "args": args, "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return out


def _bf16_variants(specs):
    out = []
    for spec in specs:
        if any(v[:2] == ["tensor", "fp16"] for v in spec["args"].values()):
            args = {
                k: (["tensor", "bf16", *v[2:]] if v[:2] == ["tensor", "fp16"] else v) for k, v in spec["args"].items()
            }
            args = {k: (["int", 2] if k == "DOT" and v == ["int", 1] else v) for k, v in args.items()}
            out.append({**spec, "args": args})
    return out


def test_every_kernel_compiles_for_sm90(recorder, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    _exercise_admm()
    _exercise_lloyd()
    lt = _exercise_gemm()
    specs = list(recorder)
    specs = unique_specs(specs + _autotune_variants(specs, lt) + _bf16_variants(specs))
    kernels = {s["name"] for s in specs}
    want = {
        "_lloyd_kernel",
        "_codes_kernel",
        "fast_init_kernel",
        "fast_refine_kernel",
        "scan_totals_kernel",
        "scan_kernel",
        "split_count_kernel",
        "split_scatter_kernel",
        "_tile_kernel",
        "_csr_mm_kernel",
    }
    assert want <= kernels, kernels
    assert len(kernels) >= 8, kernels
    print(f"{len(specs)} specializations of {len(kernels)} kernels")
    results = compile_specs(specs, arch=90, analyze=False, timeout=900)
    failures = [r["error"] for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert len(results) == len(specs)
