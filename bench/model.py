"""Roofline model of every op: bytes, FLOPs and latency of each launch, counted by construction.

Each op has its own function (``admm_step``, ``admm_dual_update``, ``lloyd_quantize``,
``lloyd_errors_for_bits``, ``atmc_linear``) that lists the launches the launcher makes, with the
bytes each one reads and writes from DRAM, its FLOPs, and two static latency figures: the bytes
one program has in flight per loop iteration (Little's law: bandwidth <= resident programs x
bytes in flight / latency, with resident programs from the static gate's blocks/SM), and the
longest chain of dependent global loads one program walks (a binary search, a scan).
A kernel redesign updates its op's function here, nothing else.

Predicted time of an op on a :class:`GPU`: the sum over launches of
``max(bytes / effective bandwidth, FLOPs / peak, dependent chain x latency) + launch gap``.
These are PREDICTIONS, never measurements; ``python -m bench`` prints measured / predicted.
Each op also gives its physical floor (bytes it must move / peak bandwidth, or FLOPs / peak)
and its target restated against that floor.

Example:
    >>> op = admm_step(45_000_000)
    >>> op.floor_s(H100), op.predict_s(H100)  # seconds: 29 B/element floor, 41.5 B/element design
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "GPU",
    "GPUS",
    "H100",
    "H200",
    "Launch",
    "Op",
    "admm_dual_update",
    "admm_foreach_topk",
    "admm_step",
    "atmc_linear",
    "cublas_linear",
    "gpu_for",
    "lloyd_errors_for_bits",
    "lloyd_quantize",
    "min_blocks_for_bandwidth",
    "sort_pairs",
]


@dataclass(frozen=True)
class GPU:
    """Assumed ceilings of one GPU (the project's sustained figures, not datasheet peaks; nothing here was measured)."""

    name: str
    bandwidth: float = 3.0e12  # B/s, DRAM
    tc_flops: float = 780e12  # bf16 / fp16 tensor-core FLOP/s
    fma_flops: float = 60e12  # fp32 FFMA FLOP/s (no tensor cores): 132 SMs x 128 lanes x 2 x 1.755 GHz, as lowrank_gemm
    sms: int = 132
    latency: float = 0.6e-6  # s, dependent DRAM load to use
    l2_latency: float = 0.25e-6  # s, dependent L2 hit
    launch: float = 2.5e-6  # s per launch (gap between back-to-back kernels, no CUDA graph)
    issue_rate: float = 132 * 4 * 1.755e9  # warp instructions/s: 4 schedulers per SM, one issue per cycle each
    clock: float = 1.755e9  # Hz: the H100 PCIe's boost (the SXM boosts to 1.98 GHz: issue-bound terms up to 13 % high)


H100 = GPU("H100 SXM (3.0 TB/s)", bandwidth=3.0e12)
H200 = GPU("H200 (4.3 TB/s)", bandwidth=4.3e12)
GPUS = (H100, H200)


def installed_triton() -> str:
    """The installed Triton as a key of the instruction-count tables (``"3.6"``, ``"3.8"``, ``"3.9"``); ``"3.8"``,
    the model's default, for a release they do not have."""
    import triton
    from atmc_triton.kernels.lowrank_gemm import ISSUE_COUNTS

    version = ".".join(triton.__version__.split(".")[:2])
    return version if version in ISSUE_COUNTS and version in REFINE_SASS else "3.8"  # (both have 3.6, 3.8, 3.9)


def gpu_for(name: str, measured_bandwidth: float | None = None) -> GPU:
    """The model GPU for a device name (``torch.cuda.get_device_name``); others use the measured bandwidth."""
    if "H200" in name:
        return H200
    if "H100" in name:
        return H100
    return GPU(name, bandwidth=measured_bandwidth or H100.bandwidth)


def min_blocks_for_bandwidth(inflight_per_block: float, gpu: GPU = H100, at_least: int = 2) -> int:
    """Resident blocks per SM a streaming kernel needs to keep ``bandwidth x latency`` bytes in flight.

    ``at_least`` (2): one block's loads overlap another's arithmetic and stores.
    """
    need = gpu.bandwidth * gpu.latency / gpu.sms  # bytes in flight per SM
    return max(at_least, math.ceil(need / inflight_per_block))


@dataclass
class Launch:
    """One kernel launch: DRAM bytes, FLOPs, and the static latency figures."""

    name: str  # kernel (as in the static gate) or library call
    read: float  # bytes read from DRAM
    written: float  # bytes written to DRAM
    flops: float = 0.0
    tensor_cores: bool = True  # FLOPs on tensor cores (else fp32 FMA)
    inflight: float = 0.0  # bytes one program loads per loop iteration (0: not latency-limited)
    chain: int = 0  # dependent global loads on one program's critical path
    chain_l2: bool = True  # the chain hits L2 (else DRAM)
    programs: int = 1  # programs in the grid (waves of the chain)
    issue: float = 0.0  # warp instructions the launch issues (its hot loop's SASS x iterations; 0: not counted)
    serial: float = 0.0  # cycles one program issues back to back on its critical path (one warp per scheduler)

    def time_s(self, gpu: GPU, blocks_sm: int | None = None) -> float:
        bw = gpu.bandwidth
        if self.inflight and blocks_sm:
            bw = min(bw, blocks_sm * gpu.sms * self.inflight / gpu.latency)
        mem = (self.read + self.written) / bw
        comp = self.flops / (gpu.tc_flops if self.tensor_cores else gpu.fma_flops)
        waves = math.ceil(self.programs / (gpu.sms * (blocks_sm or 1)))
        lat = (self.chain * (gpu.l2_latency if self.chain_l2 else gpu.latency) + self.serial / gpu.clock) * waves
        return max(mem, comp, lat, self.issue / gpu.issue_rate) + gpu.launch


@dataclass
class Op:
    """An op's launches, its physical floor (bytes / FLOPs it cannot avoid) and its target."""

    name: str
    launches: list[Launch]
    floor_bytes: float
    floor_flops: float = 0.0
    target: str = ""  # the target, restated against the floor
    target_x_floor: float | None = None  # the target as a multiple of the floor time (<=), if it is one
    notes: dict = field(default_factory=dict)

    @property
    def bytes(self) -> float:
        return sum(x.read + x.written for x in self.launches)

    @property
    def flops(self) -> float:
        return sum(x.flops for x in self.launches)

    def floor_s(self, gpu: GPU) -> float:
        return max(self.floor_bytes / gpu.bandwidth, self.floor_flops / gpu.tc_flops)

    def predict_s(self, gpu: GPU, blocks: dict[str, int] | None = None) -> float:
        """Predicted seconds; ``blocks`` maps a kernel name to its blocks/SM from the static gate."""
        blocks = blocks or {}
        return sum(x.time_s(gpu, blocks.get(x.name)) for x in self.launches)


# ---------------------------------------------------------------------------------------------- ADMM


def admm_step(
    n: int,
    grad_bytes: int = 4,
    nesterov: bool = False,
    band: float = 0.042,
    full: bool = False,
    block: int = 1024,
    max_programs: int = 256,
) -> Op:
    """The fused ADMM step of ``kernels/admm_triton.py`` on ``n`` elements with a proper top-k (0 < k < n).

    Five launches, no memset: ``_update`` (read grad, w, mom, z, u; write s; append the keys of
    the band around the previous tau, a fraction ``band`` of the elements), three ``_select``
    levels (BAND path: levels 2 and 3 read the band's keys; ``full``: the fallback path, each level
    recomputes the keys from w, s (and mom with Nesterov)), and ``_write`` (read w, s (mom); write w,
    mom, mask). ``band`` 0.042: Gaussian weights at k = 10 % with tau low in its binade (the band is
    +-6.25 % of tau); 0.021 at the top. Floor: read grad, w, mom, z, u once and write w, mom, mask
    once (29 B/element with fp32 grads).
    """
    tiles = math.ceil(math.ceil(n / block) / max_programs)
    programs = math.ceil(math.ceil(n / block) / tiles)
    keep = 8 + (4 if nesterov else 0)  # w, s (and mom): what the write pass and a FULL level read
    chain = 4  # each select level: its previous histogram, then the buffer / chunk
    if full:
        levels = [Launch("_select_kernel", keep * n, 4 * 2048, inflight=512 * keep, chain=chain, programs=programs)]
        levels += [Launch("_select_kernel", keep * n, 4 * 1024, inflight=512 * keep, chain=chain, programs=programs)]
        levels += [Launch("_select_kernel", keep * n, 4 * 1024 * (1 + programs), chain=chain, programs=programs)]
    else:
        levels = [Launch("_select_kernel", 4 * 2 * programs, 8, chain=2, programs=programs)]  # decides BAND
        levels += [Launch("_select_kernel", 4 * band * n, 4 * 1024, chain=chain, programs=programs)]
        levels += [Launch("_select_kernel", 4 * band * n, 4 * 1024 * (1 + programs), chain=chain, programs=programs)]
    launches = [
        Launch(
            "_update_kernel",
            (16 + grad_bytes) * n,
            4 * n + 4 * band * n * (not full) + 4 * (3 * programs + 4096),
            inflight=block * (16 + grad_bytes),
            programs=programs,
        ),
        *levels,
        Launch("_write_kernel", keep * n + 4 * 1024 * 2, 9 * n, inflight=block * keep, chain=3, programs=programs),
    ]
    floor = (16 + grad_bytes + 9) * n
    path = "FULL (fallback)" if full else f"BAND f={band:g}"
    return Op(
        f"admm_step n={n / 1e6:.1f}M grads {'fp32' if grad_bytes == 4 else f'{8 * grad_bytes}-bit'}"
        + (" nesterov" if nesterov else "")
        + f" {path}",
        launches,
        floor,
        target=f"<= 1.5x its bytes floor ({16 + grad_bytes + 9} B/element)",
        target_x_floor=1.5,
        notes={"bytes_per_element": sum(x.read + x.written for x in launches) / n},
    )


def admm_foreach_topk(n: int, k: int, grad_bytes: int = 4) -> Op:
    """The best plain-PyTorch step (``bench/admm.py``'s ``foreach SGD + topk``), bytes only: each
    ``_foreach`` op reads its inputs and writes its output; ``torch.topk`` as a radix select (four
    8-bit passes over the keys, then values and int64 indices of the k kept). A lower bound (no
    launch gaps, no sort overheads): the Triton step's ">= 3x" target is measured against it."""
    sgd = (8 + 4) + 12 + 8 + (8 + grad_bytes) + 12 + 8 + 12 + 12  # sub, add u, mul rho, add grad, add wd w, mom, w
    launches = [
        Launch("_foreach SGD + prox", sgd * n, 0),
        Launch("abs + cat", 8 * n, 8 * n),
        Launch("torch.topk (radix select)", 4 * 4 * n + 4 * n, 12 * k),
        Launch("ge + mask w, mom", 4 * n + 10 * n, 9 * n),
    ]
    return Op(f"foreach SGD + topk n={n / 1e6:.1f}M", launches, (16 + grad_bytes + 9) * n)


def admm_dual_update(n: int, block: int = 4096) -> Op:
    """``u += w - z``: read u, w, z, write u (the floor itself)."""
    return Op(
        f"admm_dual_update n={n / 1e6:.1f}M",
        [Launch("_dual_kernel", 12 * n, 4 * n, inflight=12 * block, programs=math.ceil(n / block))],
        16 * n,
        target="<= 1.2x its bytes floor (16 B/element)",
        target_x_floor=1.2,
    )


# ---------------------------------------------------------------------------------------------- Lloyd


def sort_pairs(name: str, n: int, key_bytes: int, value_bytes: int, key_bits: int) -> Launch:
    """A device radix sort of (key, value) pairs: 8-bit digits, each pass reads and writes both (CUB onesweep)."""
    passes = math.ceil(key_bits / 8)
    return Launch(name, n * key_bytes + passes * n * (key_bytes + value_bytes), passes * n * (key_bytes + value_bytes))


L2_BYTES = 50e6  # H100 / H200 L2: a gather whose whole source fits is served from it


def segment_gather_bytes(sizes: list[int]) -> float:
    """DRAM bytes ``index_select`` reads gathering the globally sorted float32 values into segment order.

    Segment ``s`` (share ``f = n_s / n``) has its values spread at random over the whole sorted buffer
    (segments of alike distributions, as the benchmark's), read in rising order: a 32-B sector (8 values)
    holds one of them with probability ``1 - (1 - f)^8``, so each gathered value costs
    ``4 (1 - (1 - f)^8) / f`` B (32 as ``f -> 0``, 4 at ``f = 1``), unless the buffer fits in L2 (then 4 B).

    Example:
        >>> round(segment_gather_bytes([50_000_000] * 4) / 200_000_000, 1)  # 4 equal segments: B per value
        14.4
    """
    n = sum(sizes)
    if 4 * n <= L2_BYTES:
        return 4.0 * n
    return sum(4.0 * n * (1.0 - (1.0 - s / n) ** 8) for s in sizes if s)


# SASS instruction totals per warp of the split's two kernels (split_count_kernel, split_scatter_kernel; no loops, no
# branches: each warp issues every instruction once), 8 warps, by bins NB (python -m bench.sort_rank,
# bench/results/sort_rank_2026-12-02_split.json)
SPLIT_SASS = {
    "3.8": {128: (472, 1424), 256: (560, 1424), 1024: (2208, 6560)},
    "3.6": {128: (656, 1368), 256: (816, 1368), 1024: (4184, 6328)},
    "3.9": {128: (472, 1032), 256: (560, 1032), 1024: (2112, 4648)},
}


def _segment_split(n: int, S: int, triton: str = "3.8") -> list[Launch]:
    """``lloyd_split_triton.segment_sort`` after its ``torch.sort``: the count kernel (read the int64 index,
    write the segment byte and two ``[blocks, NB]`` tables), the scan of the counts, the scatter kernel (the
    segment byte, the block's values, the tables' rows; write each value once). Issue: :data:`SPLIT_SASS`."""
    from atmc_triton.kernels.lloyd_split_triton import SPLIT_WARPS, _seg_dtype, split_shape

    nb, block, _ = split_shape(S)
    count, scatter = SPLIT_SASS[triton][min(k for k in SPLIT_SASS[triton] if k >= nb)]
    blocks = math.ceil(n / block)
    tab, seg = 4 * blocks * nb, _seg_dtype(S).itemsize * n
    return [
        Launch("split_count_kernel", 8 * n, seg + 2 * tab, issue=blocks * SPLIT_WARPS * count),
        Launch("cumsum of the block counts", tab, tab),
        Launch("split_scatter_kernel", seg + 4 * n + 2 * tab, 4 * n, issue=blocks * SPLIT_WARPS * scatter),
    ]


def _lloyd_prepare(sizes: list[int], triton: str = "3.8", fast: bool = False) -> list[Launch]:
    """The segmented sort, scans and sums of squares (``lloyd_triton._prepare``): every launch the launcher
    makes, as a profiler lists them (each ``torch.sort`` fills its own int64 index first). The split by segment
    is :func:`_segment_split` up to ``MAX_SEGMENTS`` segments, else the reference's fix-up
    (``segment_sort_ref``); the scans are :func:`_scans` (``fast``: with squares and ranks)."""
    from atmc_triton.kernels.lloyd_split_triton import MAX_SEGMENTS

    n, segments = sum(sizes), len(sizes)
    if segments <= MAX_SEGMENTS:
        split = _segment_split(n, segments, triton)
    else:
        key = 1 if segments <= 256 else 2 if segments <= 2**15 else 4
        split = [
            Launch("searchsorted (segment of each value)", 8 * n, 4 * n),
            Launch("segment id to narrow key", 4 * n, key * n),
            Launch("the stable sort's index fill", 0, 8 * n),
            sort_pairs("stable sort of segment ids", n, key, 8, 8 * key),
            Launch("index_select", 8 * n + segment_gather_bytes(sizes), 4 * n),
        ]
    return [
        Launch("torch.sort's index fill", 0, 8 * n),
        sort_pairs("torch.sort float32 + int64 indices", n, 4, 8, 32),
        *split,
        *_scans(n, fast),
        Launch("_sumsq_kernel", 4 * n, 8 * 32 * segments, inflight=4 * 1024, programs=32 * segments),
        Launch("full (tol)", 0, 8),
    ]


def _lloyd_chain(largest: int, iters: int) -> int:
    """Dependent loads of one Lloyd program: two zero searches, then per iteration a boundary search + prefix sums."""
    steps = math.ceil(math.log2(largest + 1)) + 2
    return 2 * steps + (iters + 1) * (steps + 1) + 4


FAST_PASSES = {1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 4, 7: 4, 8: 4}  # most windowed-DP passes seen per b
# (the cases of bench/quant_quality_triton.py: synthetic families, the issue's cases and one far-outlier
# segment, PASS_RTOL = 3e-3, counted on the reference and on the kernel in the interpreter, 52 of 52 cases equal;
# the kernel caps them at 32). {..., 7: 5, 8: 11} before the compand cap of one centre per value (2026-11-30,
# twelfth sitting), {..., 7: 7, 8: 16} without any compand cap, {5: 5, 6: 5, 7: 8, 8: 17} at PASS_RTOL = 1e-3.
# Not in this count: the twelfth sitting's tests with 2 to 6 weights 1000x out of 2,000 or 6,000 values take
# 11 to 25 passes at b = 8 (the prediction with 25 passes for every segment: 9.7 ms instead of 4.5).


def _scans(n: int, fast: bool, block: int = 1024) -> list[Launch]:
    """The quantizer's two scans (``lloyd_triton._scans``): block totals (read the sorted values), torch scans
    of the totals (two small launches per total: cumsum, subtract; the int32 run count's cumsum promotes to
    int64, a cast back), then each block's inclusive prefix sums of the finite values plus what precedes it
    (float64, 8 B per value written). ``fast`` adds a byte per value marking the segment starts (zero fill,
    index fill; read by both scans), the prefix sums of squares (float64) and the distinct-run ranks (int32):
    20 B written per value. The predecessor each value compares with comes from L1."""
    blocks = math.ceil(n / block)
    read, per_block, written = (5, 20, 20) if fast else (4, 8, 8)
    small = 7 if fast else 2
    marks = [Launch("zeros (segment starts)", 0, n), Launch("index_fill_ (segment starts)", 0, 0)] if fast else []
    return [
        *marks,
        Launch("scan_totals_kernel", read * n, per_block * blocks, inflight=read * block, programs=blocks),
        *(
            Launch("cumsum / sub / cast of the block totals", per_block * blocks, per_block * blocks)
            for _ in range(small)
        ),
        Launch("scan_kernel", read * n + per_block * blocks, written * n, inflight=read * block, programs=blocks),
    ]


def _fast_init_chain(largest: int) -> int:
    """Dependent loads of one ``fast_init_kernel`` program: the zero, rank, grid and midpoint searches, the
    atom sums, the compand search and the means."""
    steps = math.ceil(math.log2(largest + 1)) + 2
    return 5 * steps + 50


# Warp instructions per warp of fast_refine_kernel's loops (4 warps, one per scheduler), sm_90 SASS
# (`python -m bench.refine_issue`, bench/results/fast_refine_sass_2026-11-30_grid.json, after the one-atom
# candidates at the spread's ends; 579 / 999 for the tile before them, fast_refine_sass_2026-11-30_outliers.json,
# and 886 / 466 / 777 on 3.8 and 923 for 3.6's tile in fast_refine_sass_2026-11-30_slowpath.json): a
# Viterbi step without its two branches ("step"), the V0 branch (taken while a candidate is at or before the
# sign change: about half the steps), the zero-cluster branch (one to three steps: not counted), a backtrack step, a
# 32-row candidate tile. The float64 divisions' slow paths (52 instructions of the step's loop body, not
# issued unless a quotient needs the fix-up) are left out; counted, the step was 938 / 913.
REFINE_SASS = {  # fast_refine_sass_2026-12-01_race.json (the backtrack reads no boundary back): its unrolled loop,
    # 143 instructions, holds 4 steps (4 stores; 8 REDUX, two picks a step): 35.75 a step (17.875 until 2026-12-02,
    # which divided by the picks)
    "3.8": {"step": 892, "v0": 470, "back": 35.75, "cand": 623},
    "3.6": {"step": 871, "v0": 470, "back": 35.75, "cand": 709},
    "3.9": {"step": 880, "v0": 470, "back": 35.75, "cand": 620},
}
SHUFFLE_CYCLES = 30  # latency of one dependent shuffle or barrier round of a reduction


def _fast_refine(bits: int, passes: int, triton: str = "3.8") -> tuple[int, float]:
    """``(dependent L2 loads, serial cycles)`` of one ``fast_refine_kernel`` program: per pass, the candidate
    tiles (a load, then the gathers of their atoms and sums: 2 latencies each), then per boundary a Viterbi
    step and a backtrack step. Their loads are issued a step ahead (off the chain), so each step costs the
    instructions its warp issues (one warp per scheduler: a lower bound, stalls not counted) plus its
    dependent reductions: a min, a first-argmin and the exchange of V (11 shuffle or barrier rounds), and
    the backtrack's pick (5)."""
    T = 2**bits + 2
    c = REFINE_SASS[triton]
    tiles = math.ceil(T / 32)
    step = c["step"] + c["v0"] / 2 + 11 * SHUFFLE_CYCLES
    back = c["back"] + 5 * SHUFFLE_CYCLES
    return passes * 2 * tiles, passes * ((T - 1) * (step + back) + tiles * c["cand"])


def lloyd_quantize(sizes: list[int], bits: int, iters: int = 20, method: str = "lloyd", triton: str = "3.8") -> Op:
    """``lloyd_quantize`` of segments ``sizes`` (every value nonzero: the worst case) at ``bits``, ``iters`` rounds.

    Lloyd itself is one program per segment: its time is the dependent chain of the largest one
    (binary searches over its sorted values, L2 latency per step). Floor: read the values once and
    write codes (int16) and q (float32): 10 B/value. Targets (ResNet34): <= 3 ms at b = 8, <= 1.5 ms
    at b = 4. ``method="lloyd"``: the chain does not depend on K (256 lanes at every b).
    ``method="fast"`` adds squares and ranks to the scans of :func:`_scans`, the init and refinement kernels (one
    program per segment each; the refinement's critical path is the windowed-DP passes,
    :data:`FAST_PASSES`, proportional to K, costed from its compiled instructions, :data:`REFINE_SASS`
    of ``triton``) and a second Lloyd run in the Lloyd kernel.
    """
    n, S = sum(sizes), len(sizes)
    K = 2**bits
    fast = method == "fast"
    chain = _lloyd_chain(max(sizes), iters) * (2 if fast else 1)
    launches = _lloyd_prepare(sizes, triton, fast)
    if fast:
        p = FAST_PASSES[bits]
        atoms = S * 3 * 4104 * 8  # atom boundaries and their sums (written, then read per pass)
        rows = S * 264 * 32 * 24 * p  # per pass: candidates, their counts and sums, backpointers
        loads, serial = _fast_refine(bits, p, triton)
        launches += [
            Launch("fast_init_kernel", 0, atoms, chain=_fast_init_chain(max(sizes))),
            Launch("fast_refine_kernel", atoms * p, rows, chain=loads, serial=serial),
        ]
    launches += [
        Launch("_lloyd_kernel", S * K * 4 * 2 * (iters + 1), S * (K + 1) * 4 * 2, chain=chain),
        Launch("_codes_kernel", 4 * n, 6 * n, inflight=4 * 1024, programs=math.ceil(n / 1024)),
    ]
    return Op(
        f"lloyd_quantize b={bits}" + (" fast" if fast else ""),
        launches,
        10 * n,
        target=("<= 3 ms at b = 8" if bits == 8 else "<= 1.5 ms at b = 4" if bits == 4 else "(no target)")
        + f" (method='{method}', a design with one full sort; the bytes floor is 10 B/value)",
        notes={"values": n, "segments": S},
    )


def lloyd_errors_for_bits(sizes: list[int], iters: int = 20) -> Op:
    """``errors_for_bits``: one sort, then the Lloyd kernel on an ``[S, 8]`` grid (b = 1..8), no codes pass."""
    n, S = sum(sizes), len(sizes)
    launches = _lloyd_prepare(sizes) + [
        Launch("_lloyd_kernel", S * 8 * 256 * 4 * (iters + 1), S * 8 * 4, chain=_lloyd_chain(max(sizes), iters)),
    ]
    return Op("lloyd_errors_for_bits", launches, 4 * n, target="(no target; one sort for b = 1..8)")


# ---------------------------------------------------------------------------------------------- GEMM


def _factor_bytes(rows: int, cols: int, nnz: int, bits: int, formats: str = "speed") -> tuple[int, int]:
    """(format, exact packed bytes) of a factor with ``nnz`` nonzeros over ``2^bits`` levels."""
    from atmc_triton.kernels.packed_format import SIZE_FORMATS, SPEED_FORMATS, choose_format, factor_nbytes

    levels = min(2**bits, max(nnz, 1))
    fmt = choose_format(rows, cols, nnz, levels, False, SIZE_FORMATS if formats == "size" else SPEED_FORMATS)
    return fmt, factor_nbytes(fmt, rows, cols, nnz, levels, False)


def packed_layer(N: int, K: int, ratio: float, bits: int, structure: str = "identity", formats: str = "speed") -> dict:
    """Factor shapes, nonzeros, formats and bytes of ``bench/gemm.py``'s synthetic layer (expected counts)."""
    nnz = max(3, int((ratio * 32 * N * K - 3 * 32 * 2**bits) // bits))
    if structure == "svd":
        r = max(1, min(N, K, nnz // 2 // (N + K)))
        want = {"U": N * r, "V": r * K, "C": nnz - r * (N + K)}
    else:
        r = min(N, K)
        main, other = ("U", "V") if K <= N else ("V", "U")
        share = (0.8, 0.05) if structure == "identity+V" else (0.85, 0.0)
        want = {main: int(share[0] * nnz), other: int(share[1] * nnz), "C": int(0.15 * nnz)}
    shapes = {"U": (N, r), "V": (r, K), "C": (N, K)}
    out = {"r": r, "structure": structure, "factors": {}}
    for f in "UVC":
        rows, cols = shapes[f]
        count = min(want[f], rows * cols)
        fmt, nbytes = _factor_bytes(rows, cols, count, bits, formats) if count else (0, 0)
        out["factors"][f] = {"rows": rows, "cols": cols, "nnz": count, "fmt": fmt, "bytes": nbytes}
    out["bytes"] = sum(f["bytes"] for f in out["factors"].values())
    return out


def cublas_linear(M: int, N: int, K: int, elt: int = 2) -> Op:
    """Dense ``F.linear`` in fp16: read W and x, write y; 2MNK FLOPs on tensor cores."""
    nbytes = elt * (N * K + M * K + M * N)
    gemm = Launch("cublas gemm", elt * (N * K + M * K), elt * M * N, 2 * M * N * K)
    return Op("cuBLAS fp16", [gemm], nbytes, 2 * M * N * K)


def atmc_linear(
    M: int,
    N: int,
    K: int,
    ratio: float,
    bits: int,
    structure: str = "identity",
    elt: int = 2,
    formats: str = "speed",
    triton: str = "3.8",
) -> Op:
    """What a ``PackedLinear`` runs at batch ``M`` with ``elt``-byte activations (``linear_path`` picks the path).

    "split_k" (M <= 32): split-K tiles stream the dense-coded factors into a ``[SPLIT_K, M, n]`` fp32
    workspace, one fixed-order sum, then one CSR pass per activation of the CSR factors (the launcher's
    ``csr_groups``: the factors on ``x`` in one launch; read-modify-write of the fp32 sum) and a final cast;
    a stage of CSR factors only writes its output from its first CSR pass (the identity-init layer with both
    factors CSR: one launch at ``M = 1``, plus the one-launch padded transpose of ``x`` at ``M > 1``).
    "tile" (32 < M < crossover): large tensor-core tiles for dense codes and bitmaps, CSR SpMM on CUDA
    cores, no decode. "dense" (M >= crossover): cuBLAS on the weight decoded once and cached (the
    one-time decode is not counted). Each packed launch also carries the warp instructions its hot
    loop issues (:func:`~atmc_triton.kernels.lowrank_gemm.issue_instructions`). Floor: the packed
    bytes + x + y, or the dense FLOPs at M > 32. ``formats``: ``pack_``'s ("speed" or "size"); ``triton``:
    whose instruction counts (``ISSUE_COUNTS``).
    """
    from atmc_triton.kernels.lowrank_gemm import dense_crossover, issue_instructions, linear_path
    from atmc_triton.kernels.lowrank_gemm_triton import _csr_cols as csr_cols
    from atmc_triton.kernels.lowrank_gemm_triton import csr_groups, split_k
    from atmc_triton.kernels.packed_format import FMT_BITMAP, FMT_CSR, FMT_DENSE

    lay = packed_layer(N, K, ratio, bits, structure, formats)
    fs = lay["factors"]
    r = lay["r"]
    x, y = elt * M * K, elt * M * N
    csr_nnz = sum(f["nnz"] for f in fs.values() if f["fmt"] == FMT_CSR)
    coded = sum(f["rows"] * f["cols"] for f in fs.values() if f["fmt"] == FMT_DENSE)
    bitmap = sum(f["rows"] * f["cols"] for f in fs.values() if f["fmt"] == FMT_BITMAP)
    path = linear_path(M, dense_crossover(N, K, lay["bytes"], csr_nnz, coded, elt, bitmap))
    launches: list[Launch] = []
    small = path == "split_k"
    if path == "dense":
        launches.append(Launch("cuBLAS on the cached dense weight", elt * (N * K + M * K), y, 2 * M * N * K))
    else:
        # stages: t = x V^T [M, r] (when V and U are both present), then y = x C^T + t U^T (+ identity)
        stages = []
        if fs["U"]["nnz"] and fs["V"]["nnz"]:
            stages.append(("t", r, K, [("x", fs["V"])]))
            stages.append(("y", N, K, [("x", fs["C"]), ("t", fs["U"])]))
        else:  # identity init: t is x itself
            main = fs["U"] if fs["U"]["nnz"] else fs["V"]
            stages.append(("y", N, K, [("x", fs["C"]), ("x", main)]))
        act = {"x": x, "t": 4 * M * r}  # t is float32
        for out_name, n, _kdim, products in stages:
            products = [(a, f) for a, f in products if f["nnz"]]
            out_elt = 4 if out_name == "t" else elt
            tile = [(a, f) for a, f in products if f["fmt"] in (FMT_DENSE, FMT_BITMAP)]
            csr = [(a, f) for a, f in products if f["fmt"] == FMT_CSR]
            acc_elt = 4 if small and tile else out_elt  # the split-K sum is float32
            if tile:
                acts = {a for a, _ in tile}
                flops = sum(2 * max(M, 16) * f["rows"] * f["cols"] for _, f in tile)  # mma tiles have >= 16 rows
                splits = split_k(M, n, sum(f["cols"] for _, f in tile)) if small else 1
                b_bytes = sum(f["bytes"] for _, f in tile)
                written = 4 * splits * M * n if small else out_elt * M * n
                elems = {
                    k: sum(f["rows"] * f["cols"] for _, f in tile if f["fmt"] == k) for k in (FMT_DENSE, FMT_BITMAP)
                }
                issue = issue_instructions(M, 0, elems[FMT_DENSE], elems[FMT_BITMAP], triton=triton)
                launches.append(
                    Launch("_tile_kernel", b_bytes + sum(act[a] for a in acts), written, flops, issue=issue)
                )
                if small and splits > 1:
                    launches.append(Launch("split-K sum (fixed order)", 4 * splits * M * n, 4 * M * n))
            for a in {a for a, _ in csr} if M > 1 else ():  # csr_operand: x^T padded to [K + 1, Mp] for
                cols = K if a == "x" else r  # coalesced CSR gathers, one _transpose_pad_kernel launch that reads
                pad = act[a] * (cols + 1) * csr_cols(M) // (cols * M)  # x once and writes every padded element
                launches.append(Launch("_transpose_pad_kernel", act[a], pad))
            for i, (a, *pair) in enumerate(csr_groups(csr)):  # the launcher's: the factors on one activation, pairwise
                group = [f for f in pair if f is not None]
                rmw = 0 if (i == 0 and not tile) else acc_elt * M * n
                nnz = sum(f["nnz"] for f in group)
                launches.append(
                    Launch(
                        "_csr_mm_kernel",
                        sum(f["bytes"] for f in group) + act[a] + rmw,
                        acc_elt * M * n,
                        2 * M * nnz,
                        False,
                        issue=issue_instructions(M, nnz, 0, triton=triton),
                    )
                )
            if small and tile and out_elt != 4:
                launches.append(Launch("cast fp32 -> out", 4 * M * n, out_elt * M * n))
    floor_b = lay["bytes"] + x + y
    floor_f = 0.0 if M <= 32 else 2 * M * N * K
    if M <= 32:
        dense_bytes = 2 * N * K + x + y
        target = (
            f">= 70% of the packed bytes floor (the floor allows {dense_bytes / floor_b:.2f}x cuBLAS fp16; "
            f"70% of it is {0.7 * dense_bytes / floor_b:.2f}x)"
        )
    else:
        target = "<= 1.1x cuBLAS time (both at the dense FLOPs floor)"
    return Op(
        f"atmc_linear {N}x{K} r={ratio} b={bits} {structure}{' size' if formats == 'size' else ''} M={M} [{path}]",
        launches,
        floor_b,
        floor_f,
        target=target,
        notes={
            "M": M,
            "N": N,
            "K": K,
            "path": path,
            "packed_bytes": lay["bytes"],
            "formats": {k: v["fmt"] for k, v in fs.items()},
        },
    )
