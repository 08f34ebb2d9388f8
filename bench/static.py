"""Static GPU performance gate: judge every kernel family by what Triton compiles, without a GPU.

``python -m bench.static --out DIR [--arch 90,80,89,121] [--triton36 PATH|auto|off]
[--newest PATH|auto|off]`` records a representative set of launches per kernel family (the
launchers driven on CPU tensors under ``TRITON_INTERPRET=1``, kernels not executed), adds each
autotune config the launcher keeps after its pruning, compiles everything ahead of time
(:mod:`bench.aot`) with the installed Triton, with Triton 3.6.0 and with the newest release
(:data:`SIDE_TRITONS`), and reads registers, spill bytes, shared memory, blocks/SM, 128-bit global
loads and tensor-core instructions out of the cubin. It writes ``static.json`` and
``static.md`` (one row per kernel x Triton version x arch), prints the gate's verdicts and the
roofline predictions of :mod:`bench.model` against every target.

The gate is TABLE-DRIVEN: :data:`FAMILIES` has one :class:`Family` per kernel family (ADMM,
Lloyd, GEMM) with its representative launches and its :class:`Rule` s (thresholds on sm_90).
A kernel redesign edits only its own entry. ``tests/test_gpu_static.py`` runs the gate in CI;
a family that fails today lists the failing Triton versions in ``Family.known_failures`` with
the issue that fixes it, and the test is ``xfail(strict=True)`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import model
from bench.aot import compile_specs, record_launches, side_dir, side_env, site_version, unique_specs

__all__ = [
    "ARCHS",
    "FAMILIES",
    "SM_LIMITS",
    "Family",
    "Rule",
    "blocks_per_sm",
    "check_family",
    "gather",
    "record_family",
    "run_gate",
    "side_dir",
    "side_env",
    "triton36_site",
    "triton_site",
    "worst_blocks",
]

TRITON36 = "3.6.0"  # torch 2.11's Triton: the one on the lent H200
TRITON_NEWEST = "3.9.0"  # the newest Triton release (PyPI, checked 2026-12-01); the installed one may be older
SIDE_TRITONS = (TRITON36, TRITON_NEWEST)  # gated beside the installed Triton (a version equal to it is not repeated)


# ---------------------------------------------------------------------------------------------- SM limits


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources (CUDA programming guide, compute capability table)."""

    regs: int = 65536
    smem_sm: int = 233472  # bytes of shared memory per SM usable by blocks
    smem_block: int = 232448  # max dynamic shared memory per block (opt-in)
    threads: int = 2048
    blocks: int = 32
    reserved_smem: int = 1024  # per block, taken by the system on sm_80+


SM_LIMITS = {
    80: SMLimits(smem_sm=167936, smem_block=166912),  # A100
    89: SMLimits(smem_sm=102400, smem_block=101376, threads=1536, blocks=24),  # L4 / RTX 4090
    90: SMLimits(),  # H100 / H200: 228 KB per SM, 227 KB per block
    100: SMLimits(),  # B200
    120: SMLimits(smem_sm=102400, smem_block=101376, threads=1536, blocks=32),  # RTX 50xx
    121: SMLimits(smem_sm=102400, smem_block=101376, threads=1536, blocks=32),  # GB10
}
ARCHS = (90, 80, 89, 121)  # sm_90 carries the thresholds; 121 is the newest arch both Tritons compile


def blocks_per_sm(regs: int, num_warps: int, smem: int, arch: int = 90) -> int:
    """Resident blocks per SM (0: cannot launch), from registers, threads, shared memory and the block cap."""
    lim = SM_LIMITS.get(arch, SM_LIMITS[90])
    if smem > lim.smem_block:
        return 0
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    by_regs = (lim.regs // regs_warp) // num_warps
    by_threads = lim.threads // (32 * num_warps)
    by_smem = lim.smem_sm // (math.ceil(smem / 128) * 128 + lim.reserved_smem)
    return min(by_regs, by_threads, by_smem, lim.blocks)


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """Thresholds for one kernel (on sm_90; other arches must only compile).

    ``when(spec)`` narrows a rule to some specializations (e.g. GEMM tiles used at M > 32).
    ``min_blocks``: resident blocks per H100 SM the design needs (from registers, warps and shared
    memory); ``vector_loads``: at least one 128-bit global load (``LDG.E.128``); ``vector_stores``: at least
    one 128-bit global store (``STG.E.128``); ``tensor_cores``:
    HGMMA or HMMA in the SASS; ``max_spill``: local-memory bytes per thread.
    """

    kernel: str
    min_blocks: int = 1
    max_spill: int = 0
    vector_loads: bool = False
    vector_stores: bool = False
    tensor_cores: bool = False
    smem_bound: Callable[[dict], int | None] | None = None  # the launcher's estimate must bound the real use
    when: Callable[[dict], bool] | None = None
    why: str = ""


@dataclass(frozen=True)
class Family:
    """One kernel family: how to drive its launchers, which extra specs to add, and its rules."""

    name: str
    issue: int  # the issue that owns the family's kernels
    exercise: Callable[[], None]  # drives the launchers on CPU tensors (launches are recorded)
    rules: tuple[Rule, ...]
    specialize: Callable[[list[dict]], list[dict]] = lambda specs: specs  # e.g. autotuned -> every kept config
    # Triton version or "*" -> (why, regex every violation it excuses matches); the test xfails only on those
    known_failures: dict[str, tuple[str, str]] = field(default_factory=dict)

    def known_failure(self, version: str) -> tuple[str, str] | None:
        """``(why, pattern)`` if the family fails the gate on Triton ``version`` today (the test xfails there)."""
        return self.known_failures.get(version) or self.known_failures.get("*")


def _exercise_admm() -> None:
    import torch
    from atmc_triton.kernels.admm import admm_dual_update_triton, admm_step_triton

    n = 1 << 20  # the kernels are persistent: n and the tile count are runtime values
    for k, grad_dtype in ((n // 10, torch.float32), (n // 10, torch.bfloat16), (n, torch.float32), (0, torch.float32)):
        w, mom, z, u = (torch.zeros(n) for _ in range(4))
        mask = torch.zeros(n, dtype=torch.bool)
        admm_step_triton(w, torch.zeros(n, dtype=grad_dtype), mom, z, u, mask, 0.1, 0.9, 5e-4, 1e-3, k, False)
    m = 1 << 16  # the optimizer's launches: the previous tau as a hint (the BAND path), with and without Nesterov
    for grad_dtype, nesterov in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        w, mom, z, u = (torch.zeros(m) for _ in range(4))
        mask, hint = torch.zeros(m, dtype=torch.bool), torch.zeros(())
        admm_step_triton(
            w, torch.zeros(m, dtype=grad_dtype), mom, z, u, mask, 0.1, 0.9, 5e-4, 1e-3, m // 10, nesterov, hint
        )
    admm_dual_update_triton(torch.zeros(n), torch.zeros(n), torch.zeros(n))


def _exercise_lloyd() -> None:
    import torch
    from atmc_triton.kernels.lloyd_split_triton import segment_sort
    from atmc_triton.kernels.lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton

    x = torch.randn(30000)
    off = torch.tensor([0, 10000, 10003, 30000])
    for method in ("lloyd", "fast"):  # "fast" adds the init kernel and the FAST Lloyd kernel
        lloyd_quantize_triton(x, off, torch.tensor([8, 2, 4], dtype=torch.int32), 20, 0.0, method)
        errors_for_bits_triton(x, off, 20, 0.0, method)
    # the split by segment (the launchers above take the reference's fix-up in the interpreter, where tl.sort is
    # slow): 16, 128 (ResNet34's 111 segments) and 1,024 bins, one block each (512: tests/test_gpu_compile.py)
    for S in (3, 111, 1024):
        segment_sort(x[: S + 100], torch.tensor([*range(S), S + 100]))


GEMM_CASES = (  # (N, K, ratio, bits, structure, M, dtype, formats): bench/gemm.py's layers (N >= K: identity on V)
    (384, 256, 0.05, 4, "identity", 16, "fp16", "speed"),  # M <= 16: split-K tiles on 5-bit dense codes + CSR (wide)
    (384, 256, 0.05, 4, "identity", 16, "fp16", "size"),  # ... on a bitmap factor + CSR
    (384, 256, 0.05, 8, "svd", 16, "fp16", "speed"),  # ... 9-bit dense codes (U and V), two stages
    (384, 256, 0.05, 8, "svd", 16, "fp16", "size"),  # ... 9-bit dense codes + bitmap C
    (384, 256, 0.05, 4, "identity", 16, "fp32", "speed"),  # ... fp32 activations (tf32 tensor cores)
    (384, 256, 0.05, 4, "identity", 16, "fp32", "size"),
    (384, 256, 0.05, 4, "identity", 20, "fp32", "speed"),  # 16 < M <= 32: split-K tiles with BLOCK_M = 32
    (384, 256, 0.05, 8, "identity", 1, "fp16", "speed"),  # M = 1: CSR factors (narrow), C and U in one launch
    (384, 256, 0.05, 8, "identity", 8, "fp16", "speed"),  # ... M = 8: the fused CSR launch, BLOCK_M 8 (narrow)
    (384, 256, 0.05, 8, "identity", 16, "fp16", "speed"),  # ... M = 16: BLOCK_M 16 (wide)
    (384, 256, 0.05, 8, "identity", 40, "fp16", "speed"),  # ... M > 32: BLOCK_M 32, the most registers
    (384, 256, 0.05, 4, "identity", 40, "fp16", "speed"),  # M > 32: dense codes in large tiles + CSR SpMM (no decode)
    (384, 256, 0.05, 4, "identity", 40, "fp16", "size"),  # ... a bitmap factor in large tiles
    (384, 256, 0.05, 4, "identity", 40, "fp32", "speed"),
    (384, 256, 0.05, 8, "svd", 40, "fp16", "speed"),  # M > 32: two coded factors, two stages
    (384, 256, 0.002, 8, "identity", 40, "fp16", "speed"),  # M > 32, all CSR: SpMM only
)


def _exercise_gemm() -> None:
    import torch
    from atmc_triton.kernels.lowrank_gemm_triton import _Factor, decode_launch, linear_launch, transpose_pad

    from bench.gemm import Layer

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for N, K, ratio, bits, structure, M, dt, formats in GEMM_CASES:
        layer = Layer("static", N, K, ratio, bits, structure, torch.device("cpu"), formats=formats)
        linear_launch(torch.zeros(M, K, dtype=dtypes[dt]), None, N, layer.r, layer.identity, layer.factors, {})
    # the decode kernels: the dense weight a packed layer caches (large M, convolutions), fp32 and fp16
    for formats in ("speed", "size"):  # dense codes + CSR, bitmap + CSR
        layer = Layer("static", 384, 256, 0.05, 4, "identity", torch.device("cpu"), formats=formats)
        shapes = ((384, layer.r), (layer.r, 256), (384, 256))
        for f, (rows, cols) in zip(layer.factors, shapes):
            if f[0]:
                for dtype in (torch.float32, torch.float16):
                    decode_launch(_Factor(f[0], rows, cols, *f[1:]), dtype)
    # the CSR operand's padded x^T (the linear launches above record it at K = 256): a 4096-wide x at each Mp
    # regime (flat runs of 2, 4, 16 and 64 columns, [64, 64] tiles at Mp = 128) in each dtype, and the fp32 t
    for M, dt in ((2, "fp16"), (4, "fp16"), (4, "bf16"), (4, "fp32"), (16, "bf16"), (40, "fp16"), (100, "fp16")):
        transpose_pad(torch.zeros(M, 4096, dtype=dtypes[dt]))


def _gemm_configs(specs: list[dict], keep_m1: bool = False) -> list[dict]:
    """Each recorded autotuned launch replaced by every config the launcher keeps after its pruning.

    Tile launches without products (epilogue only) use a fixed config; small-M tiles at ``M = 1``
    compile like ``M = 16`` (only the unused autotune key differs) and are left to the latter unless
    ``keep_m1`` (counting what a GPU run compiles).
    """
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    out = []
    for spec in specs:
        args = spec["args"]
        if spec["name"] == "_tile_kernel" and (args["KIND1"][1] or args["KIND2"][1]):
            if args["M_BUCKET"][1] < 16 and not keep_m1:
                continue
            small = args["M_BUCKET"][1] <= lt.SMALL_M
            configs = lt.tile_configs(small, args["BLOCK_M"][1] if small else None)
        elif spec["name"] == "_csr_mm_kernel":
            configs = lt.CSR_NARROW_CONFIGS if args["BLOCK_M"][1] <= 8 else lt.CSR_WIDE_CONFIGS
        else:
            out.append(spec)
            continue
        for cfg in configs:
            a = {**args, **{k: ["int", v] for k, v in cfg.kwargs.items()}}
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            out.append({**spec, "args": a, "options": opts, "autotuned": True})
    return out


def _tile_smem_bound(spec: dict) -> int | None:
    """The launcher's shared-memory estimate for an autotuned tile config (it prunes on it)."""
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    if spec["name"] != "_tile_kernel" or not spec.get("autotuned"):
        return None
    return lt.tile_smem({k: v[1] for k, v in spec["args"].items()}, spec["options"]["num_stages"])


def _large_tile(spec: dict) -> bool:
    """A tile launch with products at M > 32 (epilogue-only launches run no GEMM)."""
    args = spec["args"]
    return spec["name"] == "_tile_kernel" and args["M_BUCKET"][1] > 32 and bool(args["KIND1"][1] or args["KIND2"][1])


STREAM = "streaming kernel: 128-bit loads of contiguous data"
SPLIT = "one pass bound by what it issues (bench.sort_rank), not by its bytes: no spills, 2 blocks (16 warps) per SM"


def _blocks(inflight: int) -> int:
    """Blocks/SM a streaming kernel with ``inflight`` bytes of loads per program iteration needs on an H200."""
    return model.min_blocks_for_bandwidth(inflight, model.H200)


FAMILIES: dict[str, Family] = {
    "admm": Family(
        name="admm",
        issue=13,
        exercise=_exercise_admm,
        rules=(
            Rule("_update_kernel", _blocks(1024 * 20), vector_loads=True, why="20 KB of loads per 1,024-element tile"),
            Rule("_select_kernel", min_blocks=2, why="histograms of a small buffer (FULL path: a fallback pass)"),
            Rule("_write_kernel", _blocks(1024 * 8), vector_loads=True, why=STREAM),
            Rule("_dual_kernel", _blocks(4096 * 12), vector_loads=True, why=STREAM),
        ),
    ),
    "lloyd": Family(
        name="lloyd",
        issue=14,
        exercise=_exercise_lloyd,
        rules=(
            Rule("_lloyd_kernel", why="one program per segment: no spills"),
            Rule("fast_init_kernel", why="one program per segment: no spills"),
            Rule("fast_refine_kernel", why="one program per segment: no spills"),
            Rule("scan_totals_kernel", _blocks(1024 * 5), vector_loads=True, why=STREAM),
            Rule("scan_kernel", _blocks(1024 * 5), vector_loads=True, why=STREAM),
            Rule("_sumsq_kernel", _blocks(1024 * 4), vector_loads=True, why=STREAM),
            Rule("_codes_kernel", _blocks(1024 * 4), vector_loads=True, why=STREAM),
            Rule("split_count_kernel", min_blocks=2, why=SPLIT),
            Rule("split_scatter_kernel", min_blocks=2, why=SPLIT),
        ),
    ),
    "gemm": Family(
        name="gemm",
        issue=15,
        exercise=_exercise_gemm,
        specialize=_gemm_configs,
        rules=(
            Rule("_tile_kernel", smem_bound=_tile_smem_bound, why="no spills in any autotune config"),
            Rule("_tile_kernel", tensor_cores=True, when=_large_tile, why="tensor cores in every tile used at M > 32"),
            Rule("_csr_mm_kernel"),
            Rule("_decode_kernel", why="one-time decode of a cached weight, off the per-call path: no spills"),
            Rule(
                "_transpose_pad_kernel",
                _blocks(2048 * 2),
                vector_loads=True,
                vector_stores=True,
                why="the CSR operand's padded x^T: a copy, 2,048 elements a program (4 KB in fp16)",
            ),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------- running it


def record_family(fam: Family) -> list[dict]:
    """The family's launches, specialized (e.g. autotune configs), without repeats; needs ``TRITON_INTERPRET=1``."""

    with record_launches(execute=False) as specs:
        fam.exercise()
    specs = unique_specs(fam.specialize(unique_specs(specs)))
    for s in specs:
        s["family"] = fam.name
    return specs


def check_family(fam: Family, rows: list[dict]) -> list[str]:
    """Violations of ``fam``'s rules among compiled ``rows`` (sm_90 thresholds; other arches must compile)."""
    bad = []
    for r in rows:
        where = f"{fam.name}/{r['kernel']} [{r['what']}] triton {r['triton']} sm_{r['arch']}"
        if not r["ok"]:
            bad.append(f"{where}: does not compile: {r['error'][:300]}")
            continue
        if r["arch"] != 90:
            continue
        for rule in fam.rules:
            if rule.kernel != r["kernel"] or (rule.when is not None and not rule.when(r["spec"])):
                continue
            if r["spill_bytes"] > rule.max_spill:
                bad.append(f"{where}: spills {r['spill_bytes']} B/thread (limit {rule.max_spill})")
            if r["blocks_sm"] < rule.min_blocks:
                bad.append(
                    f"{where}: {r['blocks_sm']} blocks/SM < {rule.min_blocks} needed "
                    f"({r['regs']} regs x {r['num_warps']} warps, {r['smem']} B smem; {rule.why})"
                )
            if rule.vector_loads and r["sass"]["ldg128"] == 0:
                bad.append(f"{where}: no 128-bit global loads ({r['sass']['ldg']} narrower LDG; {rule.why})")
            if rule.vector_stores and r["sass"].get("stg128", 0) == 0:
                bad.append(f"{where}: no 128-bit global stores ({r['sass'].get('stg', 0)} narrower STG; {rule.why})")
            bound = rule.smem_bound(r["spec"]) if rule.smem_bound else None
            if bound is not None and r["smem"] > bound:
                bad.append(f"{where}: uses {r['smem']} B shared memory, above the launcher's estimate {bound}")
            if rule.tensor_cores and r["sass"]["hgmma"] + r["sass"]["hmma"] == 0:
                bad.append(f"{where}: no tensor-core instructions ({r['sass']['ffma']} FFMA; {rule.why})")
    return bad


def _what(spec: dict) -> str:
    """Short label of a spec: its non-pointer constexpr-ish arguments and options."""
    skip = {"n", "S", "tiles", "programs", "k", "M", "N", "K", "K1", "K2", "nnz", "book_len", "book1_len", "book2_len"}
    parts = []
    for k, v in spec["args"].items():
        if v[0] == "tensor":
            if k.startswith(("grad", "a1", "x", "out")) and v[1] != "fp32":
                parts.append(f"{k.removesuffix('_ptr')}:{v[1]}")
        elif v[0] in ("int", "bool") and k.isupper() and k not in skip:
            parts.append(f"{k}={int(v[1])}")
    parts.append(f"w{spec['options']['num_warps']}s{spec['options']['num_stages']}")
    return " ".join(parts)


def gather(specs: list[dict], arch: int, triton_path: str | None, cache_dir: Path | None = None) -> list[dict]:
    """Compile ``specs`` for ``sm_<arch>`` and return one figure row per spec."""

    rows = []
    for spec, res in zip(specs, compile_specs(specs, arch=arch, triton_path=triton_path, cache_dir=cache_dir)):
        arch = spec.get("arch", arch)
        row = {"family": spec["family"], "kernel": spec["name"], "what": _what(spec), "arch": arch, "spec": spec}
        row |= res
        row.setdefault("triton", "?")
        if res["ok"]:
            row["blocks_sm"] = blocks_per_sm(res["regs"], res["num_warps"], res["smem"], arch)
            lim = SM_LIMITS.get(arch, SM_LIMITS[90])
            row["occupancy"] = row["blocks_sm"] * res["num_warps"] * 32 / lim.threads
        rows.append(row)
    return rows


def triton_site(version: str, install: bool = True) -> tuple[str | None, str]:
    """A directory holding Triton ``version`` for a side half of the gate, and how it was found.

    ``$ATMC_TRITON<major><minor>`` (``ATMC_TRITON36``, ``ATMC_TRITON39``: an existing ``--target``
    install) first, then the cached side install :func:`side_dir`
    (``~/.cache/atmc_triton/triton-<version>-cp<py>``); with ``install``, ``pip install --target``
    into that cache when the package index is reachable.
    Returns ``(None, reason)`` when none can be had.
    """
    import subprocess

    var = side_env(version)
    env = os.environ.get(var)
    if env:
        if site_version(Path(env)) == version:
            return env, f"{var}={env}"
        return None, f"{var}={env} holds no triton {version} (a pip --target directory expected)"
    side = side_dir(version)
    if site_version(side) == version:
        return str(side), f"cached side install {side}"
    if not install:
        return None, f"no triton {version} at {side} and installing was not allowed"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(side), f"triton=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"pip install triton=={version} failed: {e}"
    if res.returncode != 0 or site_version(side) != version:
        return None, f"pip install triton=={version} failed (index unreachable?): {res.stderr.strip()[-300:]}"
    return str(side), f"installed into {side}"


def triton36_site(install: bool = True) -> tuple[str | None, str]:
    """:func:`triton_site` for Triton 3.6.0 (torch 2.11's, the lent GPU's)."""
    return triton_site(TRITON36, install)


def run_gate(
    triton_path: str | None = None,
    archs: tuple[int, ...] = ARCHS,
    families: tuple[str, ...] | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Record, compile and check every family with one Triton (``triton_path``: a side install, else the
    installed one). Full spec set on sm_90; one representative spec per kernel on the other arches.

    Returns ``{"triton": version, "rows": [...], "violations": {family: [...]}, "seconds": s, "compiles": n}``.
    """
    fams = [FAMILIES[f] for f in (families or FAMILIES)]
    t0 = time.time()
    specs = [s for f in fams for s in record_family(f)]
    todo = [{**s, "arch": a} for a in archs for s in (specs if a == 90 else representatives(specs))]
    rows = gather(todo, 90, triton_path, cache_dir)
    version = next((r["triton"] for r in rows if r.get("ok")), "?")
    violations = {f.name: check_family(f, [r for r in rows if r["family"] == f.name]) for f in fams}
    return {
        "triton": version,
        "rows": rows,
        "violations": violations,
        "seconds": time.time() - t0,
        "compiles": sum(not r.get("cached", False) for r in rows),
    }


def representatives(specs: list[dict]) -> list[dict]:
    """The first spec of each kernel (what the other arches compile)."""
    seen: dict[str, dict] = {}
    for s in specs:
        seen.setdefault(s["name"], s)
    return list(seen.values())


def predictions(blocks: dict[str, int] | None = None) -> list[dict]:
    """Every op of :mod:`bench.model` at the benchmark sizes, predicted on each model GPU (seconds)."""
    from bench import model
    from bench.admm import identity_factors, resnet34_shapes

    rn = [a * b for a, b in identity_factors(resnet34_shapes())]
    ops = [
        model.admm_step(sum(rn)),
        model.admm_step(sum(rn), grad_bytes=2),  # bf16 grads
        model.admm_step(100_000_000),
        model.admm_dual_update(sum(rn)),
        model.lloyd_quantize(rn, 8),
        model.lloyd_quantize(rn, 4),
        model.lloyd_quantize(rn, 8, method="fast"),
        model.lloyd_quantize(rn, 4, method="fast"),
        model.lloyd_errors_for_bits(rn),
    ]
    for N, K, ratio, bits, structure, Ms, formats in (
        (4096, 4096, 0.05, 8, "identity", (1, 16, 1024, 8192), "speed"),
        (4096, 4096, 0.05, 8, "identity", (1, 16), "size"),  # the bitmap format
        (4096, 4096, 0.05, 4, "identity", (1, 16, 1024, 8192), "speed"),
        (4096, 4096, 0.05, 4, "identity", (1, 16), "size"),
        (4096, 4096, 0.01, 8, "identity", (1, 16, 1024), "speed"),
        (11008, 4096, 0.05, 4, "identity", (1, 16, 1024), "speed"),
        (4096, 4096, 0.05, 4, "svd", (1, 16, 1024), "speed"),
        (500, 800, 0.01, 8, "identity", (1, 1024), "speed"),
    ):
        for M in Ms:
            ops.append(model.atmc_linear(M, N, K, ratio, bits, structure, formats=formats))
    out = []
    for op in ops:
        row = {"op": op.name, "target": op.target, "bytes": op.bytes, "flops": op.flops}
        for gpu in model.GPUS:
            pred, floor = op.predict_s(gpu, blocks), op.floor_s(gpu)
            row[gpu.name] = {"predicted_ms": pred * 1e3, "floor_ms": floor * 1e3, "x_floor": pred / floor}
            if "M" in op.notes:
                ref = model.cublas_linear(op.notes["M"], op.notes["N"], op.notes["K"]).predict_s(gpu)
                row[gpu.name]["x_cublas"] = ref / pred
        out.append(row)
    return out


def _table(header: list[str], rows: list[list]) -> str:
    line = lambda r: "| " + " | ".join(str(x) for x in r) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def figures_table(rows: list[dict]) -> str:
    """One markdown row per kernel specialization x Triton version x arch."""
    out = []
    for r in rows:
        if not r["ok"]:
            out.append([r["family"], r["kernel"], r["what"], r["triton"], r["arch"], "FAILED", "", "", "", "", "", ""])
            continue
        sass = r["sass"]
        out.append(
            [
                r["family"],
                r["kernel"],
                r["what"],
                r["triton"],
                f"sm_{r['arch']}",
                r["regs"],
                r["spill_bytes"],
                r["smem"],
                r["blocks_sm"],
                f"{r['occupancy']:.0%}",
                f"{sass['ldg128']}/{sass['ldg']}",
                f"{sass['hgmma']}/{sass['hmma']}",
            ]
        )
    head = ["family", "kernel", "specialization", "triton", "arch", "regs", "spill B", "smem B", "blocks/SM"]
    return _table(head + ["occupancy", "LDG.128/LDG", "HGMMA/HMMA"], out)


def summary_table(rows: list[dict], arch: int = 90) -> str:
    """Per kernel x Triton version on ``sm_<arch>``: the worst figure over its specializations."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["arch"] == arch:
            groups.setdefault((r["family"], r["kernel"], r["triton"]), []).append(r)
    out = []
    for (fam, kernel, version), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        if len(ok) < len(rs):
            out.append([fam, kernel, version, len(rs), f"{len(rs) - len(ok)} FAILED to compile", "", "", "", "", ""])
            continue
        out.append(
            [
                fam,
                kernel,
                version,
                len(rs),
                max(r["regs"] for r in ok),
                max(r["spill_bytes"] for r in ok),
                max(r["smem"] for r in ok),
                min(r["blocks_sm"] for r in ok),
                f"{sum(r['sass']['ldg128'] > 0 for r in ok)}/{len(ok)}",
                f"{sum(r['sass']['hgmma'] + r['sass']['hmma'] > 0 for r in ok)}/{len(ok)}",
            ]
        )
    head = ["family", "kernel", "triton", "specs", "max regs", "max spill B", "max smem B", "min blocks/SM"]
    return _table(head + ["specs with LDG.128", "specs with HGMMA/HMMA"], out)


def predictions_table(preds: list[dict]) -> str:
    """Predicted time of every op against its floor and target (PREDICTIONS, not measurements)."""
    from bench import model

    out = []
    for p in preds:
        h, g = p[model.H100.name], p[model.H200.name]
        extra = f"{h['x_cublas']:.2f}x" if "x_cublas" in h else ""
        out.append(
            [
                p["op"],
                f"{h['predicted_ms']:.4g}",
                f"{g['predicted_ms']:.4g}",
                f"{h['floor_ms']:.4g}",
                f"{h['x_floor']:.2f}x",
                extra,
                p["target"],
                "not yet measured",
            ]
        )
    head = ["op", "predicted ms H100", "predicted ms H200", "floor ms H100", "pred/floor", "vs cuBLAS (pred)"]
    return _table(head + ["target", "measured"], out)


def worst_blocks(rows: list[dict]) -> dict[str, int]:
    """The worst blocks/SM of each kernel on sm_90 over the gate's rows (every Triton compiled): what
    :func:`predictions` takes."""
    blocks: dict[str, int] = {}
    for r in rows:
        if r.get("ok") and r["arch"] == 90:
            blocks[r["kernel"]] = min(blocks.get(r["kernel"], 99), r["blocks_sm"])
    return blocks


def write_static(out: Path, results: list[dict], notes: list[str]) -> str:
    """Write ``static.json`` and ``static.md`` under ``out``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for res in results for r in res["rows"]]
    preds = predictions(worst_blocks(rows))
    slim = [{k: v for k, v in r.items() if k != "spec"} for r in rows]
    verdicts = {f"{fam} @ triton {res['triton']}": v for res in results for fam, v in res["violations"].items()}
    (out / "static.json").write_text(
        json.dumps({"notes": notes, "rows": slim, "violations": verdicts, "predictions": preds}, indent=1)
    )
    lines = ["## Static gate (compiled without a GPU)", "", *[f"* {n}" for n in notes], ""]
    for key, bad in verdicts.items():
        lines.append(f"* **{key}**: " + ("passes" if not bad else f"{len(bad)} violation(s)"))
        lines += [f"  * {b}" for b in bad]
    lines += ["", "### sm_90 (H100 / H200), worst case per kernel", "", summary_table(rows), ""]
    lines += ["### Every specialization x Triton x arch", "", figures_table(rows), ""]
    lines += ["## Roofline predictions (PREDICTIONS, not measurements)", ""]
    lines += [predictions_table(preds), ""]
    md = "\n".join(lines)
    (out / "static.md").write_text(md)
    return md


def predict_from(gate_json: Path, out: Path) -> int:
    """``predictions.json`` / ``predictions.md`` under ``out``: today's model on the blocks/SM of the gate run
    in ``gate_json`` (its rows are copied, so the file names the compiled figures it used)."""
    rows = json.loads(gate_json.read_text())["rows"]
    preds = predictions(worst_blocks(rows))
    out.mkdir(parents=True, exist_ok=True)
    keep = ("triton", "kernel", "arch", "ok", "blocks_sm")
    doc = {"blocks_from": gate_json.name, "rows": [{k: r.get(k) for k in keep} for r in rows], "predictions": preds}
    (out / "predictions.json").write_text(json.dumps(doc, indent=1))
    md = predictions_table(preds)
    (out / "predictions.md").write_text(md + "\n")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for static.json / static.md")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80,89,121")
    ap.add_argument("--triton36", default="auto", help="a triton 3.6.0 `pip --target` directory, 'auto' or 'off'")
    ap.add_argument(
        "--newest", default="auto", help=f"a triton {TRITON_NEWEST} `pip --target` directory, 'auto' or 'off'"
    )
    ap.add_argument("--only", default="", help="comma-separated families: " + ", ".join(FAMILIES))
    ap.add_argument(
        "--predict-from",
        type=Path,
        default=None,
        help="a static.json of an earlier gate run: re-run only the model on its blocks/SM (no compile)",
    )
    args = ap.parse_args(argv)
    if args.predict_from:
        return predict_from(args.predict_from, args.out)
    archs = tuple(int(a) for a in args.arch.split(","))
    fams = tuple(f.strip() for f in args.only.split(",") if f.strip()) or None
    import triton

    notes = [f"installed triton {triton.__version__}"]
    results = [run_gate(None, archs, fams)]
    for version, choice in ((TRITON36, args.triton36), (TRITON_NEWEST, args.newest)):
        if version == triton.__version__:
            notes.append(f"triton {version}: the installed one")
            continue
        if choice == "off":
            side, why = None, "off on the command line"
        else:
            if choice != "auto":
                os.environ[side_env(version)] = choice
            side, why = triton_site(version, install=choice == "auto")
        if side:
            notes.append(f"triton {version}: {why}")
            results.append(run_gate(side, archs, fams))
        else:
            notes.append(f"triton {version} half SKIPPED: {why}")
            if choice != "off":  # (asked for, and not to be had)
                print(f"[static] WARNING: triton {version} half skipped: {why}", file=sys.stderr, flush=True)
    for res in results:
        notes.append(f"triton {res['triton']}: {res['compiles']} cold compiles, {res['seconds']:.0f} s")
    md = write_static(args.out, results, notes)
    print(md)
    return 1 if any(v for res in results for v in res["violations"].values()) else 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # launches are recorded in the interpreter (compiles run without it)
    sys.exit(main())
