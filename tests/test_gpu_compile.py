"""Ahead-of-time compile every Triton kernel specialization for an H100 (sm_90), without a GPU.

Triton's CPU interpreter accepts code the GPU compiler rejects (``tl.dot`` tile minimums, dtype
rules, layouts). This test records every kernel launch the launchers make on small CPU inputs
in the interpreter (plus each autotune config of the GEMM kernels and bf16 variants of
half-precision pointers), then compiles all of them with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` in a fresh process (Triton's bundled ptxas; no driver needed).
It does not prove the code is fast or correct on a GPU: the ``gpu`` tests do that.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="records launches in Triton's CPU interpreter")

HERE = Path(__file__).resolve().parent
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

COMPILE = r"""
import importlib, json, multiprocessing, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction


def build(spec):
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    sig, consts = {}, {}
    for p in fn.params:
        kind, value = spec["args"].get(p.name, ["default", p.default])
        if p.is_constexpr or kind in ("none", "default"):
            sig[p.name], consts[p.name] = "constexpr", value
        elif kind == "tensor":
            sig[p.name] = "*" + value
        elif kind == "bool":
            sig[p.name] = "i1"
        elif kind == "int":
            sig[p.name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            sig[p.name] = "fp32"
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=spec["options"])
        return None
    except Exception as e:  # report every failing specialization, not just the first
        return f"{spec['name']} {consts} {spec['options']}: {type(e).__name__}: {str(e)[:400]}"


if __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(build, specs, chunksize=1)
    failures = [r for r in results if r]
    print(json.dumps({"compiled": len(specs) - len(failures), "failures": failures}))
"""

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _describe(v):
    if isinstance(v, torch.Tensor):
        return ["tensor", _DTYPES[v.dtype]]
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int):
        return ["int", v]
    if isinstance(v, float):
        return ["float", v]
    if v is None:
        return ["none", None]
    raise TypeError(f"unexpected kernel argument {v!r}")


@pytest.fixture
def recorder(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    specs = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTION_KEYS if k in kwargs}
        bound = {**dict(zip(self.arg_names, args)), **kwargs}
        specs.append(
            {
                "module": self.fn.__module__,
                "name": self.fn.__name__,
                "args": {k: _describe(v) for k, v in bound.items()},
                "options": {"num_warps": 4, "num_stages": 3, **options},
            }
        )
        return original(self, *args, grid=grid, warmup=warmup, **options, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return specs


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
    from atmc_triton.kernels.lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton

    x = torch.randn(3000)
    off = torch.tensor([0, 1000, 1003, 3000])
    lloyd_quantize_triton(x, off, torch.tensor([8, 2, 4], dtype=torch.int32), 5, 1e-5)
    errors_for_bits_triton(x, off, 5, 1e-5)


def _exercise_gemm():
    sys.path.insert(0, str(HERE))
    from atmc_triton.kernels import lowrank_gemm_triton as lt
    from atmc_triton.kernels.lowrank_gemm import IDENTITY_NONE, IDENTITY_U, IDENTITY_V
    from atmc_triton.kernels.packed_format import FMT_CSR, FMT_DENSE, FMT_EMPTY
    from test_lowrank_gemm import layer_case

    for M, fmts, identity, dtype, raw in [
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
    """Each autotune config of the GEMM kernels applied to a recorded launch of the same kernel."""
    out = []
    for spec in specs:
        if spec["name"] == "_tile_kernel":
            small = spec["args"]["M_BUCKET"][1] <= lt.SMALL_M
            configs = lt.TILE_SMALL_CONFIGS if small else lt.TILE_LARGE_CONFIGS
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
        if any(v == ["tensor", "fp16"] for v in spec["args"].values()):
            args = {k: (["tensor", "bf16"] if v == ["tensor", "fp16"] else v) for k, v in spec["args"].items()}
            args = {k: (["int", 2] if k == "DOT" and v == ["int", 1] else v) for k, v in args.items()}
            out.append({**spec, "args": args})
    return out


def test_every_kernel_compiles_for_sm90(recorder, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    _exercise_admm()
    _exercise_lloyd()
    lt = _exercise_gemm()
    specs = list(recorder)
    specs += _autotune_variants(specs, lt) + _bf16_variants(specs)
    unique = {json.dumps(s, sort_keys=True): s for s in specs}
    kernels = {s["name"] for s in unique.values()}
    assert {"_lloyd_kernel", "_codes_kernel", "_tile_kernel", "_csr_mm_kernel"} <= kernels, kernels
    assert len(kernels) >= 8, kernels
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(list(unique.values())))
    print(f"{len(unique)} specializations of {len(kernels)} kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "aot_compile.py"
    script.write_text(COMPILE)
    res = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(report["failures"])
    assert report["compiled"] == len(unique)
