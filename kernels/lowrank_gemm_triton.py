"""Packed ATMC linear layer: Triton kernels and launchers.

Same semantics as :func:`atmc_triton.kernels.lowrank_gemm.atmc_linear_ref`. The launcher is
pure torch ops plus ``wrap_triton`` kernels (``torch.compile(fullgraph=True)`` traces it):

1. ``t = x deq(V)^T (+ x)`` ``[M, r]`` float32, skipped when ``U`` is empty; ``t`` *is* ``x``
   when ``V`` is empty and the identity is on ``V`` (the usual identity-init layer);
2. ``y = x deq(C)^T + t deq(U)^T (+ t) + bias``; with the identity on ``U`` and ``U`` empty (the
   identity-init layer with ``K > N``), ``y = x deq(C)^T + x deq(V)^T + bias`` in one stage.

Dense-coded and bitmap factors run in :func:`_tile_kernel`: an output tile ``[BLOCK_M, BLOCK_N]``
runs the K-steps of ``x deq(C)^T`` and then, as extra K-steps of the same accumulator, those of
``t deq(U)^T``; codes are unpacked (a bitmap's found by popcounts from its row-group pointer) and
looked up in the codebook inside the tile loop and fed to ``tl.dot`` (fp16/bf16 tensor cores;
tf32 for fp32 inputs). CSR factors run in
:func:`_csr_mm_kernel`, a second launch on the same output: one program owns ``BLOCK_M`` rows of
``M`` times ``BLOCK_R`` rows of the factor and walks their nonzeros, gathering the activations
from ``x^T`` (the ``BLOCK_M`` values one nonzero needs are contiguous; the sorted columns of a
row keep neighbouring lanes on neighbouring activations). The CSR factors of a stage that share an
activation run in ONE launch (:func:`csr_groups`): the usual identity-init layer, where ``t`` is
``x``, has ``y = x deq(C)^T + x deq(U)^T (+ x) + bias`` with both factors CSR, and its programs walk
the nonzeros of C's rows and then of U's (or V's) same rows into the same accumulators
(``HAS_SECOND``; each factor its own code width) and store once. When a stage has only CSR
factors, that first CSR launch writes the output itself (bias and identity term included): no
zero fill, no read-modify-write; so an all-CSR identity-init layer is one launch at ``M = 1``
and two at ``M > 1``: :func:`csr_operand`'s padded ``x^T`` ``[K + 1, Mp]`` is one
:func:`_transpose_pad_kernel` launch (:func:`transpose_pad`; ``F.pad``, a fill and a copy, only for CPU
tensors without Triton's interpreter).

Why a second kernel instead of fusing CSR rows into the tiles: the nonzeros per row vary, and a
fused walk would need a ``[BLOCK_M, BLOCK_N, BLOCK_J]`` gather per tile (registers explode at
GEMM tile sizes) while the tensor-core loop sits idle; separately, each kernel gets its own
tiles. The price, when a stage also has tile factors, is one read-modify-write of the output per
CSR launch: ``M N`` x 8 bytes (fp32) or 4 (fp16), against >= 3 bytes per nonzero read; at ``M = 1``
that is 32 KB for a 4096-wide layer, against megabytes of codes. ``bench/gemm.py`` measures that pass.

Two regimes, picked by ``M``:

* ``M <= SMALL_M`` (GEMV-like, bound by the compressed bytes): ``BLOCK_M`` 16/32, split-K over
  the combined K-steps of both factors, ``SPLIT_K`` chosen by :func:`split_k` so that at least
  ``TARGET_PROGRAMS`` programs are in flight; each split stores float32 partials to its own slice
  of a ``[SPLIT_K, M, N]`` workspace and one ``sum(0)`` adds them in a fixed order (no atomics:
  two runs give the same bits). The CSR launch then adds into that float32 sum.
* ``M > SMALL_M`` (GEMM-like, bound by tensor-core FLOPs): big tiles, no split, direct stores.
  No per-call decode: CSR factors run the CSR kernel at every ``M`` (``config={"densify": True}``
  decodes them into plain tile operands first, for the benchmark's comparison). From the
  crossover of :func:`~atmc_triton.kernels.lowrank_gemm.linear_path` on, packed layers skip
  these kernels and call cuBLAS on a dense weight decoded once and cached per layer.

Autotuning keys on a power-of-two bucket of ``M`` (plus the shapes, code widths and, for the CSR
kernel, whether it walks a second factor). The
codebook is read with a small-table load that stays in L1 (``book_gather=False``, the default)
or kept in registers/shared memory and read with ``tl.gather`` (``book_gather=True``); the
benchmark times both.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ._registry import fake_propagation, interpreted, wrap_triton
from .lowrank_gemm import (
    IDENTITY_U,
    IDENTITY_V,
    atmc_decode_ref,
    atmc_linear_ref,
    check_factor,
    check_linear,
    linear_op,
)
from .lowrank_gemm_kernels import _csr_mm_kernel, _decode_kernel, _tile_kernel, _transpose_pad_kernel
from .packed_format import BITMAP_GROUP, FMT_BITMAP, FMT_CSR, FMT_DENSE, FMT_EMPTY, code_width

__all__ = [
    "SMALL_M",
    "TARGET_PROGRAMS",
    "atmc_decode_triton",
    "csr_block_m",
    "csr_groups",
    "csr_operand",
    "atmc_linear_triton",
    "decode_launch",
    "linear_launch",
    "split_k",
    "transpose_pad",
]

SMALL_M = 32
TARGET_PROGRAMS = 264  # 2 programs per SM on a 132-SM H100: the split-K tile path aims at least this many
MAX_SPLIT_K = 16
GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2^31 - 1)
KIND_NONE, KIND_CODES, KIND_PLAIN, KIND_BITMAP = 0, 1, 2, 3
DOT_F32, DOT_F16, DOT_BF16 = 0, 1, 2
_DOT = {torch.float32: DOT_F32, torch.float16: DOT_F16, torch.bfloat16: DOT_BF16}


# ------------------------------------------------------------------------------------------------ configs


def _cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


TILE_SMALL_CONFIGS = [  # BLOCK_M (16 / 32) and SPLIT_K come from the launcher (split_k); <= 16 codes per thread
    _cfg(BLOCK_N=128, BLOCK_K=32, GROUP_M=1, num_warps=8),
    _cfg(BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=8),
    _cfg(BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_stages=4),
    _cfg(BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_stages=4),
]
TILE_LARGE_CONFIGS = [  # no spills on Triton 3.6 and 3.8 (<= 16 decoded codes per thread and K-step), < 227 KB smem
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, GROUP_M=8, num_warps=8),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, SPLIT_K=1, GROUP_M=8, num_warps=8),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, GROUP_M=8, num_stages=4),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, GROUP_M=8, num_stages=4),
]
# CSR kernel tiles [BLOCK_M, BLOCK_R, BLOCK_J]: "narrow" for BLOCK_M <= 8, "wide" for BLOCK_M 16 and 32
# (narrow: BLOCK_R <= 16, so a 4096-row factor gives >= 256 programs, two per SM)
CSR_NARROW_CONFIGS = [_cfg(BLOCK_R=br, BLOCK_J=bj, num_stages=4) for br, bj in ((16, 64), (8, 128), (4, 128))]
# (a thread owns 4 consecutive slots: BLOCK_R x BLOCK_J >= 4 x 32 x num_warps keeps every thread busy; wide:
# 1.69-1.73 warp instructions per nonzero slot at BLOCK_M = 16 in the compiled loop, sm_90, against 6.2 for
# (4, 64) and 8.5 for (2, 128), where threads would repeat other threads' work)
CSR_WIDE_CONFIGS = [_cfg(BLOCK_R=br, BLOCK_J=bj) for br, bj in ((4, 128), (8, 64), (2, 256))]
# Fixed tiles: Triton's interpreter (CPU tensors: nothing to tune), epilogue-only launches, tests.
FIXED_CONFIG = {
    "tile_small": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1},
    "tile_large": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2},
    "csr": {"BLOCK_R": 8, "BLOCK_J": 16},
}
# Decode tiles per format: [BLOCK_R, BLOCK_C] (CSR: BLOCK_R rows, BLOCK_C nonzeros of each at a time)
DECODE = {
    FMT_DENSE: {"BLOCK_R": 16, "BLOCK_C": 128},
    FMT_CSR: {"BLOCK_R": 16, "BLOCK_C": 32},
    FMT_BITMAP: {"BLOCK_R": 32, "BLOCK_C": 64},
}

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KB)


def tile_smem(meta: dict, num_stages: int) -> int:
    """Upper bound of :func:`_tile_kernel`'s shared memory: ``num_stages`` fp32-sized A and B tiles, an fp32
    ``[BLOCK_M, BLOCK_N]`` epilogue scratch (layout conversion of the accumulator) and 1 KB.

    (fp16 tiles stage the dequantized B in fp32; ``tests/test_gpu_static.py`` checks the bound against
    the compiled kernels.)
    """
    stages = num_stages * (meta["BLOCK_M"] * meta["BLOCK_K"] + meta["BLOCK_K"] * meta["BLOCK_N"]) * 4
    return stages + meta["BLOCK_M"] * meta["BLOCK_N"] * 4 + 1024


def tile_configs(small: bool, block_m: int | None = None) -> list:
    """The tile kernel's autotune configs that fit :data:`SMEM_LIMIT` (``block_m``: the launcher's, small M)."""
    configs = TILE_SMALL_CONFIGS if small else TILE_LARGE_CONFIGS
    return [c for c in configs if tile_smem({"BLOCK_M": block_m, **c.kwargs}, c.num_stages) <= SMEM_LIMIT]


def _prune_small(configs, named_args, **kwargs):  # pruned before anything is compiled
    return tile_configs(True, {**named_args, **kwargs}["BLOCK_M"])


def _prune_large(configs, named_args, **kwargs):
    return tile_configs(False)


_TILE_KEY = ["M_BUCKET", "N", "K1", "K2", "KIND1", "WIDTH1", "KIND2", "WIDTH2"]
_CSR_KEY = ["M_BUCKET", "N", "K", "WIDTH", "WIDTH2", "HAS_SECOND"]
_tile_small = triton.autotune(  # no reset_to_zero: every split stores its own slice of the workspace
    TILE_SMALL_CONFIGS, key=_TILE_KEY + ["SPLIT_K"], prune_configs_by={"early_config_prune": _prune_small}
)(_tile_kernel)
_tile_large = triton.autotune(TILE_LARGE_CONFIGS, key=_TILE_KEY, prune_configs_by={"early_config_prune": _prune_large})(
    _tile_kernel
)
_csr_narrow = triton.autotune(CSR_NARROW_CONFIGS, key=_CSR_KEY, restore_value=["out_ptr"])(_csr_mm_kernel)
_csr_wide = triton.autotune(CSR_WIDE_CONFIGS, key=_CSR_KEY, restore_value=["out_ptr"])(_csr_mm_kernel)


# ------------------------------------------------------------------------------------------------ launchers


class _Factor:
    """One packed factor ``[rows, cols]`` as the launcher sees it."""

    def __init__(self, fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor):
        self.fmt, self.rows, self.cols = fmt, rows, cols
        self.codes, self.book, self.indptr, self.indices = codes, book, indptr, indices
        self.raw = book.numel() == 0
        self.width = code_width(fmt, book.numel() - 1, self.raw)

    @property
    def max_codes(self) -> int:
        """Codes the stream can hold (its words less the pad word): a bitmap kernel never reads past it, even
        when corrupt pointers say otherwise (validated data has exactly its nonzero count)."""
        return 0 if self.fmt == FMT_EMPTY else (self.codes.numel() - 1) * 32 // self.width


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output element is written by a kernel (tests poison this with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    """Smallest power of two >= ``n``; on a symbolic ``n`` this guards only on its bucket."""
    p = 1
    while p < n:
        p *= 2
    return p


def csr_block_m(M: int) -> int:
    """Rows of activations one CSR program takes: ``pow2(M)`` up to 16, then 32-row chunks.

    (Compiled for sm_90, a thread owns whole nonzeros, so the cost per nonzero grows with the rows it
    multiplies: 1.07 warp instructions at 8 rows, 1.68 at 16: ``python -m bench.gemm_issue``.)
    """
    return _pow2(M) if M <= 16 else 32


def small_block_m(M: int) -> int:
    """``BLOCK_M`` of the small-M tile path: 16 rows up to ``M = 16``, then 32."""
    return 16 if M <= 16 else 32


def split_k(M: int, N: int, K_total: int, block_n: int = 64, block_k: int = 64) -> int:
    """Splits of the K-steps for the small-M tile path: enough for ``TARGET_PROGRAMS`` programs with
    ``block_n``-wide tiles of :func:`small_block_m` rows, at most ``MAX_SPLIT_K`` and at most one per
    ``block_k`` columns of ``K_total`` (a pure function of the shape). The split is fixed before the
    autotuner picks ``BLOCK_N``: a 128-wide config gets half the programs."""
    tiles = -(-M // small_block_m(M)) * -(-N // block_n)
    want = -(-TARGET_PROGRAMS // tiles)
    return max(1, min(MAX_SPLIT_K, want, -(-K_total // block_k)))


def _book_args(f: _Factor | None) -> tuple[Tensor | None, int, int]:
    if f is None or f.raw:
        return None, 1, 1
    return f.book, f.book.numel(), _pow2(f.book.numel())


def decode_into(out: Tensor, f: _Factor, accumulate: bool) -> Tensor:
    """``out [rows, cols] (+)= deq(f)``; a CSR factor always accumulates (``out`` must start at 0)."""
    if f.fmt == FMT_EMPTY:
        return out
    book, book_len, _ = _book_args(f)
    meta = DECODE[f.fmt]
    grid = (triton.cdiv(f.rows, meta["BLOCK_R"]),)  # CSR: BLOCK_R rows a program, walking their nonzeros
    if f.fmt != FMT_CSR:  # dense codes and bitmaps: 2-D tiles
        grid += (triton.cdiv(f.cols, meta["BLOCK_C"]),)
    wrap_triton(_decode_kernel)[grid](
        out_ptr=out,
        stride_o=out.stride(0),
        rows=f.rows,
        cols=f.cols,
        words_ptr=f.codes,
        book_ptr=f.codes if book is None else book,
        book_len=book_len,
        indptr_ptr=f.codes if f.fmt == FMT_DENSE else f.indptr,
        indices_ptr=f.codes if f.fmt == FMT_DENSE else f.indices,
        nnz=f.max_codes if f.fmt == FMT_BITMAP else f.indices.numel(),
        FMT=f.fmt,
        WIDTH=f.width,
        ACCUM=accumulate or f.fmt == FMT_CSR,
        GROUP=BITMAP_GROUP,
        **meta,
    )
    return out


def decode_launch(f: _Factor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense ``[rows, cols]`` of ``f`` in ``dtype``."""
    if f.fmt in (FMT_DENSE, FMT_BITMAP):  # these kernels write every element
        return decode_into(_empty((f.rows, f.cols), dtype, f.codes.device), f, accumulate=False)
    return decode_into(torch.zeros(f.rows, f.cols, dtype=dtype, device=f.codes.device), f, accumulate=True)


def _tile_launch(
    out: Tensor,
    terms: list,
    addend: Tensor | None,
    bias: Tensor | None,
    dot: int,
    small: bool,
    book_gather: bool,
    config: dict | None,
) -> None:
    """One :func:`_tile_kernel` launch for ``terms = [(A, _Factor | plain Tensor)]`` (at most two).

    ``out`` is ``[M, N]``, or on the split-K path the float32 workspace ``[SPLIT_K, M, N]``."""
    M, N = out.shape[-2:]
    splits = out.shape[0] if out.dim() == 3 else 1
    args = {
        "out_ptr": out,
        "stride_ok": out.stride(0) if out.dim() == 3 else 0,
        "stride_om": out.stride(-2),
        "M": M,
        "N": N,
        "e_ptr": out if addend is None else addend,
        "stride_em": 0 if addend is None else addend.stride(0),
        "bias_ptr": out if bias is None else bias,
        "M_BUCKET": _pow2(M),
    }
    consts = {
        "HAS_ADDEND": addend is not None,
        "HAS_BIAS": bias is not None,
        "DOT": dot,
        "BOOK_GATHER": book_gather,
        "GROUP": BITMAP_GROUP,
    }
    for s in (1, 2):
        a, b = terms[s - 1] if s <= len(terms) else (None, None)
        kind = (
            KIND_NONE
            if b is None
            else KIND_PLAIN
            if isinstance(b, Tensor)
            else KIND_BITMAP
            if b.fmt == FMT_BITMAP
            else KIND_CODES
        )
        f = b if kind in (KIND_CODES, KIND_BITMAP) else None
        book, book_len, book_size = _book_args(f)
        b_ptr = out if b is None else b if kind == KIND_PLAIN else f.codes
        K = 0 if a is None else a.shape[1]
        args |= {
            f"a{s}_ptr": out if a is None else a,
            f"stride_a{s}m": 0 if a is None else a.stride(0),
            f"K{s}": K,
            f"b{s}_ptr": b_ptr,
            f"book{s}_ptr": b_ptr if book is None else book,
            f"book{s}_len": book_len,
            f"stride_b{s}n": K,
            f"stride_b{s}k": 1,
            f"gp{s}_ptr": f.indptr if kind == KIND_BITMAP else b_ptr,
            f"bm{s}_ptr": f.indices if kind == KIND_BITMAP else b_ptr,
            f"nnz{s}": f.max_codes if kind == KIND_BITMAP else 0,
        }
        consts |= {
            f"KIND{s}": kind,
            f"WIDTH{s}": 0 if f is None else f.width,
            f"BOOK{s}": book_size if book_gather else 1,
        }
    if small:
        consts |= {"BLOCK_M": small_block_m(M), "SPLIT_K": splits}
    meta = (config or {}).get("tile")
    if meta is None and out.device.type != "cpu":
        kernel = _tile_small if small else _tile_large

        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"])

        wrap_triton(kernel)[grid](**args, **consts)
        return
    meta = {**FIXED_CONFIG["tile_small" if small else "tile_large"], **(meta or {})}
    if not small and meta["SPLIT_K"] != 1:
        raise ValueError("the large-M tile path stores its output: SPLIT_K must be 1")
    if small:
        meta = {k: v for k, v in meta.items() if k != "SPLIT_K"}  # the workspace fixes it
    consts |= meta
    grid = (triton.cdiv(M, consts["BLOCK_M"]) * triton.cdiv(N, consts["BLOCK_N"]), consts["SPLIT_K"])
    wrap_triton(_tile_kernel)[grid](**args, **consts)


def csr_operand(a: Tensor) -> Tensor:
    """The activations of :func:`_csr_mm_kernel`: ``a [M, K]`` itself when ``M == 1`` (a ``[K]`` view), else
    ``A^T`` padded to ``[K + 1, Mp]`` (``Mp``: ``M`` rounded up to :func:`csr_block_m`), the padding zeros.

    Row ``K`` (zeros) is where the kernel points every masked slot, and ``Mp`` columns let it gather
    ``BLOCK_M`` activations per nonzero without a mask. Built by :func:`transpose_pad`, ONE launch that reads
    ``a`` once and writes every element of the padded copy, wherever the Triton kernel runs (CUDA, or CPU
    tensors under Triton's interpreter); CPU tensors without the interpreter take ``F.pad`` (a fill, then a copy).
    """
    M = a.shape[0]
    if M == 1:
        return a.reshape(-1)
    if a.device.type == "cpu" and not interpreted(_transpose_pad_kernel):
        return torch.nn.functional.pad(a.t(), (0, _csr_cols(M) - M, 0, 1))  # one copy: [K + 1, Mp], contiguous
    return transpose_pad(a)


TRANSPOSE_TILE = 2048  # elements a _transpose_pad_kernel program moves when Mp <= 64 (16 a thread, 4 warps)
TRANSPOSE_BLOCK = 64  # its [64, 64] tiles for wider Mp


def transpose_pad(a: Tensor, out: Tensor | None = None) -> Tensor:
    """``F.pad(a.t(), (0, Mp - M, 0, 1))`` for ``a [M, K]`` in one :func:`_transpose_pad_kernel` launch: ``out
    [K + 1, Mp]`` (``Mp`` = :func:`_csr_cols` ``(M)``), ``a``'s dtype, every element written (``out``: a
    contiguous buffer to write into, else a new one). ``Mp <= 64``: a program writes ``TRANSPOSE_TILE // Mp``
    whole rows (one contiguous run); wider: ``[64, 64]`` tiles. One 1-D grid axis, any ``K``."""
    M, K = a.shape
    mp = _csr_cols(M)
    if a.stride(1) != 1:
        a = a.contiguous()
    if out is None:
        out = _empty((K + 1, mp), a.dtype, a.device)
    elif out.shape != (K + 1, mp) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(
            f"transpose_pad: out must be a contiguous {a.dtype} [{K + 1}, {mp}], got {out.dtype} {tuple(out.shape)}"
        )
    flat = mp <= TRANSPOSE_BLOCK  # (Mp is then a power of two: csr_block_m's)
    block_m = mp if flat else TRANSPOSE_BLOCK
    block_k = TRANSPOSE_TILE // mp if flat else TRANSPOSE_BLOCK
    num_m = triton.cdiv(mp, block_m)
    programs = triton.cdiv(K + 1, block_k) * num_m
    if programs >= 2**31:
        raise ValueError(f"transpose_pad: [{M}, {K}] needs {programs} programs, above CUDA's 2^31 - 1")
    wrap_triton(_transpose_pad_kernel)[(programs,)](
        x_ptr=a,
        out_ptr=out,
        M=M,
        K=K,
        stride_xm=a.stride(0),
        stride_o=mp,
        num_m=num_m,
        FLAT=flat,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
    )
    return out


def _csr_cols(M: int) -> int:
    """``Mp``: columns of :func:`csr_operand`'s ``A^T`` (``M`` rounded up to a multiple of ``csr_block_m(M)``)."""
    return -(-M // csr_block_m(M)) * csr_block_m(M)


def _csr_launch(
    out: Tensor,
    a_t: Tensor,
    f: _Factor,
    small: bool,
    config: dict | None,
    init: bool = False,
    addend: Tensor | None = None,
    bias: Tensor | None = None,
    second: _Factor | None = None,
) -> None:
    """``out += a deq(f)^T`` for a CSR factor ``f [N, K]`` and ``a_t = csr_operand(a)`` (``init``:
    ``out = addend + bias + a deq(f)^T``); ``second``, a CSR factor of the same shape on the same ``a``:
    ``out (+)= a deq(f)^T + a deq(second)^T`` in the same launch (one pass over ``out``). With ``M``
    contiguous, the ``BLOCK_M`` activations one nonzero multiplies are one or a few 16-byte vector reads."""
    M, N = out.shape
    block_m = csr_block_m(M)
    zero_row = M > 1
    vec = min(block_m, 16 // a_t.element_size())  # activations per vector load (16 bytes at most)
    mp = _csr_cols(M) if zero_row else 1
    if a_t.shape != ((f.cols + 1, mp) if zero_row else (f.cols,)) or not a_t.is_contiguous():
        raise ValueError(f"_csr_launch: a_t {tuple(a_t.shape)} is not csr_operand(a) for M = {M}, K = {f.cols}")
    if second is not None and (second.fmt != FMT_CSR or (second.rows, second.cols) != (f.rows, f.cols)):
        raise ValueError(
            f"_csr_launch: the second factor must be CSR [{f.rows}, {f.cols}], got format {second.fmt} "
            f"[{second.rows}, {second.cols}]"
        )
    book, book_len, _ = _book_args(f)
    g = f if second is None else second  # (without a second factor: placeholders the kernel never reads)
    book2, book2_len, _ = _book_args(g)
    args = {
        "out_ptr": out,
        "stride_om": out.stride(0),
        "M": M,
        "N": N,
        "a_ptr": a_t,
        "stride_akv": mp // vec,
        "K": f.cols,
        "indptr_ptr": f.indptr,
        "indices_ptr": f.indices,
        "words_ptr": f.codes,
        "book_ptr": f.codes if book is None else book,
        "book_len": book_len,
        "nnz": f.indices.numel(),
        "indptr2_ptr": g.indptr,
        "indices2_ptr": g.indices,
        "words2_ptr": g.codes,
        "book2_ptr": g.codes if book2 is None else book2,
        "book2_len": book2_len,
        "nnz2": g.indices.numel(),
        "e_ptr": out if addend is None else addend,
        "stride_em": 0 if addend is None else addend.stride(0),
        "bias_ptr": out if bias is None else bias,
        "M_BUCKET": _pow2(M),
        "WIDTH": f.width,
        "WIDTH2": 0 if second is None else second.width,
        "HAS_SECOND": second is not None,
        "INIT": init,
        "HAS_ADDEND": init and addend is not None,
        "HAS_BIAS": init and bias is not None,
        "ZERO_ROW": zero_row,
        "BLOCK_M": block_m,
        "VEC": vec,
    }
    meta = (config or {}).get("csr")
    if meta is not None or out.device.type == "cpu":
        meta = {**FIXED_CONFIG["csr"], **(meta or {})}
        if meta["BLOCK_J"] % 4:
            raise ValueError(
                f"_csr_launch: BLOCK_J must be a multiple of 4 (a thread's slot group), got {meta['BLOCK_J']}"
            )
    # grid axis 1 holds the row blocks of x, at most GRID_Y_MAX of them (CUDA's limit): more rows run as several
    # launches over row ranges of out, addend and a_t (a_t's columns: a flat view from the range's first column)
    rows = GRID_Y_MAX * block_m
    for m0 in range(0, M, rows):
        mc, part = min(rows, M - m0), args
        if M > rows:  # (one range, the common case: the tensors as they are)
            part = args | {"out_ptr": out[m0 : m0 + mc], "M": mc, "a_ptr": a_t.view(-1)[m0:]}
            if addend is not None:
                part["e_ptr"] = addend[m0 : m0 + mc]
        if meta is None:  # CUDA, autotuned
            kernel = _csr_narrow if block_m <= 8 else _csr_wide

            def grid(META, mc=mc):
                return (triton.cdiv(N, META["BLOCK_R"]), triton.cdiv(mc, block_m))

            wrap_triton(kernel)[grid](**part)
        else:
            wrap_triton(_csr_mm_kernel)[(triton.cdiv(N, meta["BLOCK_R"]), triton.cdiv(mc, block_m))](**part, **meta)


def _packed_matmul(
    M: int,
    N: int,
    products: list,
    addend: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    dot_dtype: torch.dtype,
    config: dict | None,
) -> Tensor:
    """``out [M, N] = sum_i A_i deq(F_i)^T + addend + bias`` for ``products = [(A_i, F_i)]``."""
    small = M <= SMALL_M
    cfg = config or {}
    densify = bool(cfg.get("densify", False))
    device = (addend if addend is not None else products[0][0]).device
    tile, sparse = [], []
    for a, f in products:
        if f.fmt in (FMT_DENSE, FMT_BITMAP):  # decoded in the tile loop, fed to tensor cores
            tile.append((a, f))
        elif f.fmt == FMT_CSR:
            if densify:
                tile.append((a, decode_launch(f, dot_dtype)))
            else:
                sparse.append((a, f))
    dot = _DOT[dot_dtype]
    gather = bool(cfg.get("book_gather", False))
    a_t: dict[int, Tensor] = {}

    def transposed(a: Tensor) -> Tensor:  # one [K + 1, Mp] copy per activation (x, t), shared by its CSR factors
        if id(a) not in a_t:
            a_t[id(a)] = csr_operand(a)
        return a_t[id(a)]

    groups = csr_groups(sparse)  # one CSR launch per activation: up to two factors walked by the same programs
    if small and tile:  # split-K: float32 partials per split, summed in a fixed order (deterministic)
        splits = (cfg.get("tile") or {}).get("SPLIT_K") or split_k(M, N, sum(a.shape[1] for a, _ in tile))
        ws = _empty((splits, M, N), torch.float32, device)
        _tile_launch(ws, tile, addend, bias, dot, True, gather, config)
        out = ws[0] if splits == 1 else ws.sum(0)
        for a, f, second in groups:
            _csr_launch(out, transposed(a), f, small, config, second=second)
        return out.to(out_dtype)
    out = _empty((M, N), out_dtype, device)
    if tile or not sparse:  # the tile kernel writes every element (an epilogue-only launch without products)
        fixed = config if tile else {**cfg, "tile": FIXED_CONFIG["tile_large"]}
        _tile_launch(out, tile, addend, bias, dot, False, gather, fixed)
    for i, (a, f, second) in enumerate(groups):
        first = i == 0 and not tile
        _csr_launch(
            out,
            transposed(a),
            f,
            small,
            config,
            init=first,
            addend=addend if first else None,
            bias=bias if first else None,
            second=second,
        )
    return out


def csr_groups(sparse: list) -> list:
    """The CSR launches of one stage: ``[(a, f, second)]`` for ``sparse = [(a, f)]`` CSR products, the factors
    that share an activation ``a`` (the same tensor, so the same ``K``) paired into one launch (``second``: the
    pair's other factor, or ``None``), in the order of their first factors. The usual identity-init layer (``t``
    is ``x``) so makes one CSR launch for ``x deq(C)^T + x deq(U)^T``; the code widths of a pair may differ.
    (``a`` is a dict key: a tensor hashes by identity; ``bench.model`` groups activation names the same way.)"""
    by_act: dict = {}
    for a, f in sparse:
        by_act.setdefault(a, []).append((a, f))
    groups = []
    for pairs in by_act.values():
        for i in range(0, len(pairs), 2):
            a, f = pairs[i]
            groups.append((a, f, pairs[i + 1][1] if i + 1 < len(pairs) else None))
    return groups


def _check_launch(op: str, x: Tensor, bias: Tensor | None) -> None:
    if x.dtype not in _DOT:
        raise ValueError(f"{op}: the Triton kernel takes float16, bfloat16 or float32 x, got {x.dtype}")


def linear_launch(
    x: Tensor, bias: Tensor | None, n: int, r: int, identity: int, factors, config: dict | None = None
) -> Tensor:
    """Triton ``atmc_linear`` (``factors = [(fmt, codes, book, indptr, indices)] * 3`` for U, V, C).

    ``config`` overrides tuning for tests: ``{"tile": {...}, "csr": {...}, "densify": bool,
    "book_gather": bool}`` (meta-parameters of the kernels; without it CUDA tensors autotune).
    """
    check_linear("atmc_linear", x, bias, n, r, identity, factors)
    _check_launch("atmc_linear", x, bias)
    if fake_propagation(x):  # meta x, or export / dynamo want the metadata only: no path chosen (a dynamic batch stays)
        return x.new_empty(x.shape[0], n)
    x = x.contiguous()  # a strided view is read as the reference reads it (the kernels index rows of x)
    bias = None if bias is None else bias.contiguous()
    M, K = x.shape
    if M == 0:
        return x.new_zeros(0, n)
    U, V, C = (_Factor(f[0], rows, cols, *f[1:]) for f, (rows, cols) in zip(factors, ((n, r), (r, K), (n, K))))
    if identity == IDENTITY_U and U.fmt == FMT_EMPTY:  # W = (0 + I) V + C: V [n, K] is one more product on x, and
        # two CSR factors share the launch (the identity-init layer with K > n); no t stage, no t buffer
        return _packed_matmul(M, n, [(x, C), (x, V)], None, bias, x.dtype, x.dtype, config)
    t = None
    if U.fmt != FMT_EMPTY:  # (the identity on U with U empty returned above)
        if V.fmt != FMT_EMPTY:  # t = x V^T (+ x)  [M, r]
            t = _packed_matmul(
                M, r, [(x, V)], x if identity == IDENTITY_V else None, None, torch.float32, x.dtype, config
            )
        elif identity == IDENTITY_V:
            t = x
    products = [(x, C)] + ([(t, U)] if t is not None else [])
    return _packed_matmul(M, n, products, t if identity == IDENTITY_U else None, bias, x.dtype, x.dtype, config)


@linear_op
def atmc_linear_triton(x: Tensor, bias: Tensor | None, n: int, r: int, identity: int, factors) -> Tensor:
    """Launcher of op ``atmc_linear`` (same signature and result as :func:`atmc_linear_ref`)."""
    if x.device.type == "cpu" or x.dtype == torch.float64:  # a CPU graph, or float64 x (no tensor-core dtype):
        return atmc_linear_ref(x, bias, n, r, identity, *(t for f in factors for t in f))  # the reference (torch)
    return linear_launch(x, bias, n, r, identity, factors)


def atmc_decode_triton(
    fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor
) -> Tensor:
    """Launcher of op ``atmc_decode`` (same signature and result as :func:`atmc_decode_ref`)."""
    if codes.device.type == "cpu":
        return atmc_decode_ref(fmt, rows, cols, codes, book, indptr, indices)
    check_factor("atmc_decode", "W", fmt, rows, cols, codes, book, indptr, indices, codes.device)
    if fake_propagation(codes):  # meta tensors, or dynamo / export fake propagation: the metadata only
        return codes.new_empty(rows, cols, dtype=torch.float32)
    return decode_launch(_Factor(fmt, rows, cols, codes, book, indptr, indices))
