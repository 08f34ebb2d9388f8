"""Dequantize-sparse-lowrank linear layer on packed factors: the PyTorch reference and the ops.

A packed ATMC layer stores each factor ``U [N, r]``, ``V [r, K]``, ``C [N, K]`` as bit-packed
codes into a small codebook, dense or CSR (:mod:`atmc_triton.kernels.packed_format`). Its
forward is

    y = x W^T + bias,   W = deq(U) deq(V) + deq(C)   (+ the identity of the identity init)

computed without forming W:  t = x deq(V)^T  [M, r],  y = t deq(U)^T + x deq(C)^T + bias.
``identity`` = 1 means W = (U + I) V + C (so y gains t, r = N); 2 means W = U (V + I) + C
(so t gains x, r = K); 0 means no identity term.

Ops (namespace ``atmc``): ``atmc_linear`` (the layer, differentiable in ``x`` and ``bias``) and
``atmc_decode`` (one factor to a dense float32 matrix). Each factor enters as ``fmt`` plus its
four tensors ``codes`` (int32 words), ``book`` (float32), ``indptr`` (int32), ``indices``
(int16/int32); unused ones are empty. The Triton launchers (:mod:`.lowrank_gemm_triton`)
serve CUDA tensors; these references are the CPU kernels and the test oracle.

Which path a packed layer takes for ``M`` rows of activations is :func:`linear_path`, a pure
function of ``M`` and the layer's sizes, from the cost model :func:`predicted_us` (H100
figures; a prediction, not a measurement):

* ``"dense"`` (``M >=`` crossover ``> PACKED_M``): ``F.linear`` (cuBLAS) on the decoded dense
  weight that a packed layer caches once, on the first such call (``PackedLayer.cache_nbytes``
  reports it). The crossover is where the model's packed time reaches cuBLAS's on the dense
  weight; it can fall below ``SMALL_M_PATH`` but never to ``PACKED_M`` (:func:`dense_crossover`).
* ``"split_k"`` (``M <= SMALL_M_PATH``, below the crossover): dense-coded and bitmap factors run
  split-K tensor-core tiles (deterministic fixed-order sum), CSR factors a SpMV-like kernel. The
  model bounds them by bytes and by the instructions their compiled loops issue (:data:`ISSUE`);
  the latter dominates for large layers.
* ``"tile"`` (``SMALL_M_PATH < M <`` crossover): the packed kernels with large tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._registry import HAS_TRITON, no_data, register_op
from .packed_format import (
    BITMAP_GROUP,
    FMT_BITMAP,
    FMT_CSR,
    FMT_DENSE,
    FMT_EMPTY,
    MAX_BOOK,
    bitmap_encode,
    bitmap_groups,
    bitmap_mask,
    bitmap_words,
    code_width,
    decode_factor_ref,
    packed_words,
    unpack_bits,
)

__all__ = [
    "H100",
    "IDENTITY_NONE",
    "PATHS",
    "PACKED_M",
    "SMALL_M_PATH",
    "IDENTITY_U",
    "IDENTITY_V",
    "ISSUE",
    "ISSUE_COUNTS",
    "atmc_decode",
    "atmc_decode_ref",
    "atmc_linear",
    "atmc_linear_ref",
    "check_factor",
    "check_factor_values",
    "check_linear",
    "dense_crossover",
    "dequantize",
    "issue_instructions",
    "linear_op",
    "linear_path",
    "predicted_us",
]

IDENTITY_NONE, IDENTITY_U, IDENTITY_V = 0, 1, 2
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PATHS = ("split_k", "tile", "dense")
SMALL_M_PATH = 32  # = lowrank_gemm_triton.SMALL_M: the split-K tile regime
PACKED_M = 16  # up to this many rows the packed kernels always run (no dense copy of the weight in memory)
# H100 SXM ceilings the model uses: HBM bytes/s, bf16/fp16 dense tensor-core FLOP/s, fp32 CUDA-core FLOP/s,
# aggregate L1 bytes/s for the CSR kernel's activation gathers (x^T stays in L1/L2; sorted columns let
# neighbouring nonzeros share sectors), and a fixed ramp + tail latency per call.
H100 = {"hbm": 3.0e12, "tc": 780e12, "fma": 60e12, "l1": 20e12, "launch_us": 1.0, "issue": 132 * 4 * 1.755e9}
# Warp instructions the compiled hot loops issue (sm_90 SASS, fp16 x, the best autotune config;
# `python -m bench.gemm_issue` recounts them, bench/results/gemm_issue_2026-11-30_book.json), per Triton: per
# decoded weight element and BLOCK_M-row tile of the tile kernel ("dense" codes, "bitmap"), per stored
# nonzero and BLOCK_M rows of the CSR kernel. At "issue" warp instructions/s (132 SMs x 4 schedulers x
# 1.755 GHz) they bound a kernel's time from below. Triton 3.8 (torch 2.14's) is the model's default; 3.9, the
# newest, is within 3 % of it; 3.6 (torch 2.11's, the lent H200's) issues 1.4x more for dense tiles and
# 0.96-0.99x as much for CSR (whose loop has no layout exchange on either since a thread owns whole nonzeros,
# 4 consecutive ones; before that, the counts at BLOCK_M 2 / 4 / 16 were 2.2 / 2.7 / 1.5x these on 3.8 and
# 2.8 / 3.0 / 1.7x on 3.6:
# bench/results/gemm_issue_2026-11-30_csr.json).
ISSUE_COUNTS = {
    "3.8": {
        "dense": {16: 0.63, 32: 0.64, 64: 0.74, 128: 0.91},
        "bitmap": {16: 1.34, 32: 1.34, 64: 1.38, 128: 1.55},
        "csr": {1: 0.62, 2: 0.71, 4: 0.82, 8: 1.07, 16: 1.68, 32: 2.75},
    },
    "3.6": {
        "dense": {16: 0.88, 32: 0.90, 64: 1.02, 128: 1.14},
        "bitmap": {16: 1.33, 32: 1.35, 64: 1.41, 128: 1.61},
        "csr": {1: 0.61, 2: 0.68, 4: 0.81, 8: 1.06, 16: 1.67, 32: 2.73},
    },
    "3.9": {  # the newest release (bench/results/gemm_issue_2026-12-01_triton39.json): within 3 % of 3.8
        "dense": {16: 0.63, 32: 0.64, 64: 0.74, 128: 0.91},
        "bitmap": {16: 1.38, 32: 1.38, 64: 1.37, 128: 1.55},
        "csr": {1: 0.62, 2: 0.69, 4: 0.82, 8: 1.06, 16: 1.67, 32: 2.73},
    },
}
ISSUE = ISSUE_COUNTS["3.8"]


def issue_instructions(M: int, csr_nnz: int, coded_elems: int, bitmap_elems: int = 0, triton: str = "3.8") -> float:
    """Warp instructions the packed kernels' hot loops issue for ``M`` rows (from :data:`ISSUE_COUNTS`
    of ``triton``: ``"3.8"``, ``"3.6"`` or ``"3.9"``).

    Tiles: every decoded element once per ``BLOCK_M``-row tile (16 or 32 rows on the split-K path, the
    cheapest of 32/64/128 above); CSR: every nonzero once per ``BLOCK_M`` rows (the launcher's
    ``pow2(M)`` up to 16, then 32-row chunks).

    Example:
        >>> issue_instructions(16, 1000, 0, 2000)  # 1000 nonzeros at 1.68 + 2000 bitmap elements at 1.34
        4360.0
    """
    if triton not in ISSUE_COUNTS:
        raise ValueError(f"issue_instructions: triton must be one of {sorted(ISSUE_COUNTS)}, got {triton!r}")
    counts = ISSUE_COUNTS[triton]
    if M <= SMALL_M_PATH:
        bm = 16 if M <= 16 else 32
        tile = coded_elems * counts["dense"][bm] + bitmap_elems * counts["bitmap"][bm]
    else:
        tile = min(
            -(-M // bm) * (coded_elems * counts["dense"][bm] + bitmap_elems * counts["bitmap"][bm])
            for bm in (32, 64, 128)
        )
    cb = 1 << max(0, M - 1).bit_length() if M <= 16 else 32  # lowrank_gemm_triton.csr_block_m
    return round(tile + csr_nnz * counts["csr"][cb] * -(-M // cb), 6)


def predicted_us(
    path: str,
    M: int,
    N: int,
    K: int,
    packed_bytes: int,
    csr_nnz: int,
    coded_elems: int,
    act_bytes: int = 2,
    hw: dict | None = None,
    bitmap_elems: int = 0,
    triton: str = "3.8",
    launches: int = 1,
) -> float:
    """Predicted microseconds of one ``[M, K] x [K, N]`` packed-layer call on ``path`` (roofline model).

    ``packed_bytes``: the layer's packed factor bytes; ``csr_nnz``: nonzeros stored as CSR (run on
    CUDA cores, each gathering ``M`` activations); ``coded_elems`` / ``bitmap_elems``: elements of
    dense-coded / bitmap factors (decoded in tensor-core tiles of at least 16 rows). The time is the
    largest of DRAM bytes, FLOPs, L1 gathers and instruction issue (:func:`issue_instructions`, with the
    counts of ``triton``), plus ``hw["launch_us"]`` for each of the call's ``launches`` kernel launches (a
    packed call makes 1 to 6: ``bench.model.atmc_linear`` lists them; 1, the default, is a lower bound).
    ``"dense"`` is cuBLAS on the cached dense weight (one launch).

    Example:
        >>> round(predicted_us("dense", 1, 4096, 4096, 0, 0, 0), 1)  # 32 MiB of fp16 weight at 3 TB/s
        12.2
    """
    hw = hw or H100
    io = act_bytes * M * (K + N)
    if path == "dense":
        return hw["launch_us"] + 1e6 * max((2 * N * K + io) / hw["hbm"], 2 * M * N * K / hw["tc"])
    if path not in PATHS:
        raise ValueError(f"predicted_us: path must be one of {PATHS}, got {path!r}")
    if launches < 1:
        raise ValueError(f"predicted_us: launches must be >= 1, got {launches}")
    rows = max(M, 16)  # an mma tile has at least 16 rows
    fetch = (packed_bytes + io + 4 * M * N) / hw["hbm"]  # + the float32 output pass of the CSR kernel
    compute = 2 * rows * (coded_elems + bitmap_elems) / hw["tc"] + 2 * M * csr_nnz / hw["fma"]
    gather = act_bytes * M * csr_nnz / hw["l1"]
    issue = issue_instructions(M, csr_nnz, coded_elems, bitmap_elems, triton) / hw["issue"]
    return hw["launch_us"] * launches + 1e6 * max(fetch, compute, gather, issue)


def dense_crossover(
    N: int, K: int, packed_bytes: int, csr_nnz: int, coded_elems: int, act_bytes: int = 2, bitmap_elems: int = 0
) -> int:
    """Smallest ``M > PACKED_M`` from which the model predicts cuBLAS on the cached dense weight at least
    as fast as the packed kernels. Both predictions grow with ``M``: above ``SMALL_M_PATH`` by bisection;
    when cuBLAS already wins at ``SMALL_M_PATH + 1``, the smallest ``M`` from which it wins at every
    ``M`` up to there (a step down at a time). Up to ``PACKED_M`` rows the packed kernels always run:
    small batches are where compression pays in memory, and a cached dense weight would undo it.
    Each path is charged one launch: the packed one's extra launches (1 to 5 more, about 1 µs each) can
    only move the crossover down, by a few rows.

    Example:
        >>> N = K = 4096; nnz = 6_710_886  # 40 % dense: ratio 0.05 of fp32 at 4 bits, one CSR factor
        >>> dense_crossover(N, K, nnz * 5 // 2, nnz, 0)  # the CSR kernel issue-bound: cuBLAS from M = 17
        17
    """

    def dense_wins(m: int) -> bool:
        args = (m, N, K, packed_bytes, csr_nnz, coded_elems, act_bytes, None, bitmap_elems)
        return predicted_us("dense", *args) <= predicted_us("tile", *args)

    lo, hi = SMALL_M_PATH + 1, 1 << 20
    if dense_wins(lo):
        while lo > PACKED_M + 1 and dense_wins(lo - 1):
            lo -= 1
        return lo
    if not dense_wins(hi):
        return hi
    while hi - lo > 1:  # dense_wins(lo) is False, dense_wins(hi) is True
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if dense_wins(mid) else (mid, hi)
    return hi


def linear_path(M: int, crossover: int) -> str:
    """``"dense"`` from ``crossover`` on; below it ``"split_k"`` up to ``SMALL_M_PATH`` and ``"tile"`` above.

    Example:
        >>> [linear_path(m, 100) for m in (1, 32, 33, 99, 100)]
        ['split_k', 'split_k', 'tile', 'tile', 'dense']
        >>> [linear_path(m, 17) for m in (1, 16, 17)]
        ['split_k', 'split_k', 'dense']
    """
    if M < 0:
        raise ValueError(f"linear_path: M must be >= 0, got {M}")
    if crossover < 1:
        raise ValueError(f"linear_path: crossover must be >= 1, got {crossover}")
    return "dense" if M >= crossover else "split_k" if M <= SMALL_M_PATH else "tile"


def dequantize(codes: Tensor, book: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``book[codes]`` with the shape of ``codes`` (``book [slots]``, ``codes`` any integer dtype)."""
    return book.to(dtype).index_select(0, codes.reshape(-1).long()).view(codes.shape)


def check_factor(
    op: str,
    name: str,
    fmt: int,
    rows: int,
    cols: int,
    codes: Tensor,
    book: Tensor,
    indptr: Tensor,
    indices: Tensor,
    device: torch.device,
) -> None:
    """Validate one packed factor's format, dtypes, devices and sizes (not its index values)."""
    where = f"{op}: factor {name} [{rows}, {cols}]"
    if fmt not in (FMT_EMPTY, FMT_DENSE, FMT_CSR, FMT_BITMAP):
        raise ValueError(f"{where}: fmt must be 0 (empty), 1 (dense), 2 (csr) or 3 (bitmap), got {fmt}")
    for t, what, dtypes in (
        (codes, "codes", (torch.int32,)),
        (book, "book", (torch.float32,)),
        (indptr, "indptr", (torch.int32,)),
        (indices, "indices", (torch.int16, torch.int32)),
    ):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in dtypes:
            raise ValueError(
                f"{where}: {what} must be a 1-D {'/'.join(map(str, dtypes))} tensor, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != device:
            raise ValueError(f"{where}: {what} is on {t.device}, x is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{where}: {what} must be contiguous")
    nbook = book.numel()
    if fmt == FMT_EMPTY:
        if codes.numel() or nbook or indptr.numel() or indices.numel():
            raise ValueError(f"{where}: an empty factor has empty codes, book, indptr and indices")
        return
    if nbook == 1 or nbook > MAX_BOOK:
        raise ValueError(
            f"{where}: book must hold the zero plus 1..256 levels (or nothing for raw values), got {nbook} entries"
        )
    width = code_width(fmt, nbook - 1, nbook == 0)
    if fmt == FMT_BITMAP:  # the code count is data (indptr[-1]): check_factor_values checks the codes' size
        want = {"indptr": rows * bitmap_groups(cols) + 1, "indices": rows * bitmap_words(cols)}
        for what, t in (("indptr", indptr), ("indices", indices)):
            if t.numel() != want[what]:
                raise ValueError(f"{where}: a bitmap factor's {what} must have {want[what]} entries, got {t.numel()}")
        if indices.dtype != torch.int32:
            raise ValueError(f"{where}: a bitmap factor's indices (the bitmap words) must be int32")
        if codes.numel() < 1:
            raise ValueError(f"{where}: codes must hold at least the pad word")
        return
    if fmt == FMT_DENSE:
        count = rows * cols
        if indptr.numel() or indices.numel():
            raise ValueError(f"{where}: a dense factor has empty indptr and indices")
    else:
        count = indices.numel()
        if indptr.numel() != rows + 1:
            raise ValueError(f"{where}: indptr must have rows + 1 = {rows + 1} entries, got {indptr.numel()}")
        if indices.dtype == torch.int16 and cols > 2**15:
            raise ValueError(f"{where}: int16 column indices cannot address {cols} columns")
    if codes.numel() != packed_words(count, width):
        raise ValueError(
            f"{where}: codes must hold {packed_words(count, width)} int32 words "
            f"({count} codes of {width} bits plus a pad word), got {codes.numel()}"
        )


def check_factor_values(
    op: str, name: str, fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor
) -> int:
    """Validate the index values of a packed factor (after :func:`check_factor`); returns its nonzero count.

    Finite codebook levels, codes within the codebook, ``indptr`` rising from 0 to nnz, column indices in
    ``[0, cols)`` and ascending within each row (the CSR kernel multiplies a masked slot's codebook level
    by a zero activation, so a non-finite level would reach rows that do not use it). Reads the data (a
    host sync on a GPU): packed layers run it when built, loaded or changed, the CPU reference on every
    eager call, the CUDA launcher and compiled graphs never (the kernels clamp codes and mask columns as a
    second line of defence).
    """
    where = f"{op}: factor {name}"
    if fmt == FMT_EMPTY:
        return 0
    raw = book.numel() == 0
    levels = book.numel() - 1
    width = code_width(fmt, levels, raw)
    if not raw and not bool(torch.isfinite(book).all()):
        raise ValueError(f"{where}: codebook levels must be finite, got {book[~torch.isfinite(book)][:4].tolist()}")
    if fmt == FMT_DENSE:
        if raw:
            return int((codes[:-1].view(torch.float32) != 0).sum())
        c = unpack_bits(codes, rows * cols, width)
        if int(c.max()) > levels:
            raise ValueError(f"{where} has code {int(c.max())} past its {levels} levels")
        return int((c != 0).sum())
    if fmt == FMT_BITMAP:
        return _check_bitmap_values(where, rows, cols, codes, book, indptr, indices, raw, levels, width)
    nnz = indices.numel()
    ip = indptr.long()
    if int(ip[0]) != 0 or int(ip[-1]) != nnz or bool((ip[1:] < ip[:-1]).any()):
        raise ValueError(f"{where}: indptr must rise from 0 to nnz={nnz}")
    col = indices.long()
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"{where} has column indices outside [0, {cols})")
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), ip[1:] - ip[:-1], output_size=nnz)
    if bool(((row[1:] == row[:-1]) & (col[1:] <= col[:-1])).any()):
        raise ValueError(f"{where}: column indices must ascend within each row")
    if not raw and nnz and int(unpack_bits(codes, nnz, width).max()) >= levels:
        raise ValueError(f"{where} has codes past its {levels} levels")
    return nnz


def _check_bitmap_values(where, rows, cols, codes, book, indptr, indices, raw, levels, width) -> int:
    """:func:`check_factor_values` of a bitmap factor: no bit past ``cols``, group pointers equal to the
    bitmap's running popcounts, codes sized for them and within the codebook."""
    nz = bitmap_mask(indices, rows, cols)
    want_ptr, want_words = bitmap_encode(nz)
    if not torch.equal(want_words, indices):
        raise ValueError(f"{where}: the bitmap has bits set past column {cols}")
    if not torch.equal(want_ptr, indptr):
        raise ValueError(
            f"{where}: indptr must count the bitmap's nonzeros before each row group of {BITMAP_GROUP} columns"
        )
    nnz = int(want_ptr[-1])
    if codes.numel() != packed_words(nnz, width):
        raise ValueError(
            f"{where}: codes must hold {packed_words(nnz, width)} int32 words "
            f"({nnz} codes of {width} bits plus a pad word), got {codes.numel()}"
        )
    if not raw and nnz and int(unpack_bits(codes, nnz, width).max()) >= levels:
        raise ValueError(f"{where} has codes past its {levels} levels")
    return nnz


def check_linear(
    op: str, x: Tensor, bias: Tensor | None, n: int, r: int, identity: int, factors, values: bool = False
) -> None:
    """Validate ``atmc_linear`` arguments; ``factors`` is ``[(fmt, codes, book, indptr, indices)] * 3`` (U, V, C).

    ``values``: also check the index values (:func:`check_factor_values`)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(
            f"{op}: x must be a 2-D float tensor [M, K], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    K = x.shape[1]
    if n < 1 or r < 0 or K < 1:
        raise ValueError(f"{op}: need N, K >= 1 and r >= 0, got N={n}, r={r}, K={K}")
    if r == 0 and (factors[0][0] != FMT_EMPTY or factors[1][0] != FMT_EMPTY):
        raise ValueError(f"{op}: r = 0 (W = C) needs empty U and V (fmt 0), got fmts {factors[0][0]}, {factors[1][0]}")
    if identity not in (IDENTITY_NONE, IDENTITY_U, IDENTITY_V):
        raise ValueError(f"{op}: identity must be 0, 1 or 2, got {identity}")
    if (identity == IDENTITY_U and r != n) or (identity == IDENTITY_V and r != K):
        raise ValueError(
            f"{op}: identity={identity} needs r == {'N' if identity == IDENTITY_U else 'K'}, got r={r}, N={n}, K={K}"
        )
    if bias is not None:
        if bias.shape != (n,) or bias.dtype not in _FLOATS:
            raise ValueError(f"{op}: bias must be a float tensor [{n}], got {bias.dtype} {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device}, x is on {x.device}")
    for name, (rows, cols), f in zip("UVC", ((n, r), (r, K), (n, K)), factors):
        check_factor(op, name, f[0], rows, cols, *f[1:], device=x.device)
        if values:
            check_factor_values(op, name, f[0], rows, cols, *f[1:])


def _decoded(fmt, rows, cols, codes, book, indptr, indices, dtype) -> Tensor | None:
    if fmt == FMT_EMPTY:
        return None
    return decode_factor_ref(fmt, rows, cols, codes, book, indptr, indices).to(dtype)


def linear_op(impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Give ``impl(x, bias, n, r, identity, factors)`` op ``atmc_linear``'s flat, annotated signature (what
    ``torch.library`` reads); ``factors = ((fmt, codes, book, indptr, indices),) * 3`` for U, V, C.

    The reference and the Triton launcher share it; the result keeps ``impl``'s name and docstring.
    """

    def op(
        x: Tensor,
        bias: Tensor | None,
        n: int,
        r: int,
        identity: int,
        u_fmt: int,
        u_codes: Tensor,
        u_book: Tensor,
        u_indptr: Tensor,
        u_indices: Tensor,
        v_fmt: int,
        v_codes: Tensor,
        v_book: Tensor,
        v_indptr: Tensor,
        v_indices: Tensor,
        c_fmt: int,
        c_codes: Tensor,
        c_book: Tensor,
        c_indptr: Tensor,
        c_indices: Tensor,
    ) -> Tensor:
        factors = (
            (u_fmt, u_codes, u_book, u_indptr, u_indices),
            (v_fmt, v_codes, v_book, v_indptr, v_indices),
            (c_fmt, c_codes, c_book, c_indptr, c_indices),
        )
        return impl(x, bias, n, r, identity, factors)

    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):  # not __wrapped__: torch would read impl's
        setattr(op, attr, getattr(impl, attr))
    return op


@linear_op
def atmc_linear_ref(x: Tensor, bias: Tensor | None, n: int, r: int, identity: int, factors) -> Tensor:
    """``y [M, n]`` for ``x [M, K]`` from packed factors ``U [n, r]``, ``V [r, K]``, ``C [n, K]``.

    Dequantizes each factor densely, then ``t = x V^T``, ``y = t U^T + x C^T + bias`` (plus
    the identity terms). Accumulates in float32 (float64 for float64 ``x``); returns ``x.dtype``.

    Example:
        >>> from atmc_triton.kernels.packed_format import pack_bits
        >>> e = torch.empty(0, dtype=torch.int32)
        >>> book = torch.tensor([0.0, 2.0])
        >>> u = (1, pack_bits(torch.tensor([1, 0, 0, 1]), 1), book, e, e.short())  # U = 2 I
        >>> none = (0, e, e.float(), e, e.short())
        >>> atmc_linear_ref(torch.ones(1, 2), None, 2, 2, 2, *u, *none, *none).tolist()  # U (0 + I) x
        [[2.0, 2.0]]
    """
    check_linear("atmc_linear", x, bias, n, r, identity, factors, values=not no_data(x))
    K = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    U, V, C = (_decoded(f[0], rows, cols, *f[1:], acc) for f, (rows, cols) in zip(factors, ((n, r), (r, K), (n, K))))
    xf = x.to(acc)
    y = xf.new_zeros(x.shape[0], n)
    if U is not None or identity == IDENTITY_U:
        t = xf @ V.T if V is not None else xf.new_zeros(x.shape[0], r)  # [M, r]
        if identity == IDENTITY_V:
            t = t + xf
        if U is not None:
            y = y + t @ U.T
        if identity == IDENTITY_U:
            y = y + t
    if C is not None:
        y = y + xf @ C.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def _linear_fake(x, bias, n, r, identity, *factors):
    return x.new_empty(x.shape[0], n)


def atmc_decode_ref(
    fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor
) -> Tensor:
    """The dense float32 factor ``[rows, cols]`` of a packed one (validated).

    Example:
        >>> from atmc_triton.kernels.packed_format import pack_bits
        >>> e = torch.empty(0, dtype=torch.int32)
        >>> atmc_decode_ref(1, 1, 3, pack_bits(torch.tensor([2, 0, 1]), 2), torch.tensor([0.0, 0.5, 4.0]),
        ...                 e, e.short()).tolist()
        [[4.0, 0.0, 0.5]]
    """
    check_factor("atmc_decode", "W", fmt, rows, cols, codes, book, indptr, indices, codes.device)
    if not no_data(codes):  # a traced graph (or a fake or meta tensor) cannot branch on data
        check_factor_values("atmc_decode", "W", fmt, rows, cols, codes, book, indptr, indices)
    return decode_factor_ref(fmt, rows, cols, codes, book, indptr, indices)


def _decode_fake(fmt, rows, cols, codes, book, indptr, indices):
    return codes.new_empty(rows, cols, dtype=torch.float32)


if HAS_TRITON:
    from .lowrank_gemm_triton import atmc_decode_triton, atmc_linear_triton
else:  # the package works without Triton: the references serve every device
    atmc_decode_triton = atmc_linear_triton = None

atmc_linear = register_op("atmc_linear", reference=atmc_linear_ref, fake=_linear_fake, launcher=atmc_linear_triton)
atmc_decode = register_op("atmc_decode", reference=atmc_decode_ref, fake=_decode_fake, launcher=atmc_decode_triton)


# --- autograd: y = x W^T + b, so dx = g W and db = sum(g); the packed factors are constants ----------------------


def _setup_context(ctx, inputs, output):
    x, bias, n, r, identity = inputs[:5]
    ctx.meta = (x.shape[1], n, r, identity, x.dtype, None if bias is None else bias.dtype)
    ctx.fmts = inputs[5::5]
    ctx.save_for_backward(*(t for i in range(3) for t in inputs[6 + 5 * i : 10 + 5 * i]))


def _backward(ctx, grad):
    K, n, r, identity, dtype, bias_dtype = ctx.meta
    saved = ctx.saved_tensors
    shapes = ((n, r), (r, K), (n, K))
    g = grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    U, V, C = (
        atmc_decode(fmt, rows, cols, *saved[4 * i : 4 * i + 4]).to(g.dtype) if fmt != FMT_EMPTY else None
        for i, (fmt, (rows, cols)) in enumerate(zip(ctx.fmts, shapes))
    )
    dx = g.new_zeros(g.shape[0], K)
    if U is not None or identity == IDENTITY_U:
        s = g @ U if U is not None else g.new_zeros(g.shape[0], r)  # [M, r]
        if identity == IDENTITY_U:
            s = s + g
        if V is not None:
            dx = dx + s @ V
        if identity == IDENTITY_V:
            dx = dx + s
    if C is not None:
        dx = dx + g @ C
    # summed in g's float32 (float64) and then cast: an fp16 sum over a large batch overflows or rounds
    db = g.sum(0).to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[1] else None
    return (dx.to(dtype), db) + (None,) * 18


atmc_linear.register_autograd(_backward, setup_context=_setup_context)
