"""Packed ATMC linear layer: Triton kernels and launchers.

Same semantics as :func:`atmc_triton.kernels.lowrank_gemm.atmc_linear_ref`. The launcher is
pure torch ops plus ``wrap_triton`` kernels (``torch.compile(fullgraph=True)`` traces it):

1. ``t = x deq(V)^T (+ x)`` ``[M, r]`` float32, skipped when ``U`` is empty; ``t`` *is* ``x``
   when ``V`` is empty and the identity is on ``V`` (the usual identity-init layer);
2. ``y = x deq(C)^T + t deq(U)^T (+ t) + bias``.

Dense-coded factors run in :func:`_tile_kernel`: an output tile ``[BLOCK_M, BLOCK_N]`` runs the
K-steps of ``x deq(C)^T`` and then, as extra K-steps of the same accumulator, those of
``t deq(U)^T``; codes are unpacked and looked up in the codebook inside the tile loop and fed
to ``tl.dot`` (fp16/bf16 tensor cores; exact fp32 for fp32 inputs). CSR factors run in
:func:`_csr_mm_kernel`, a second launch on the same output: one program owns ``BLOCK_M`` rows of
``M`` times ``BLOCK_R`` rows of the factor and walks their nonzeros, gathering the activations
from ``x^T`` (the ``BLOCK_M`` values one nonzero needs are contiguous; the sorted columns of a
row keep neighbouring lanes on neighbouring activations). When a stage has only CSR factors, the
first CSR launch writes the output itself (bias and identity term included): no zero fill.

Why a second kernel instead of fusing CSR rows into the tiles: the nonzeros per row vary, and a
fused walk would need a ``[BLOCK_M, BLOCK_N, BLOCK_J]`` gather per tile (registers explode at
GEMM tile sizes) while the tensor-core loop sits idle; separately, each kernel gets its own
tiles. The price is one read-modify-write of the output per extra CSR factor: ``M N`` x 8 bytes
(fp32) or 4 (fp16), against >= 3 bytes per nonzero read; at ``M = 1`` that is 32 KB for a
4096-wide layer, against megabytes of codes. ``bench/gemm.py`` measures that pass.

Two regimes, picked by ``M``:

* ``M <= SMALL_M`` (GEMV-like, bound by the compressed bytes): ``BLOCK_M`` 16/32, split-K over
  the combined K-steps of both factors with fp32 atomics into a zeroed float32 buffer.
* ``M > SMALL_M`` (GEMM-like, bound by tensor-core FLOPs): big tiles, no split, direct stores.
  A CSR factor with density ``>= DENSIFY_MIN_DENSITY`` is first decoded into a plain tile
  operand (its CUDA-core SpMM would cost more than the dense tensor-core tiles: roughly
  ``density x (tensor-core FLOP/s) / (L2 bytes/s per 2-byte gather)``, ~ 1 at 1/128 on an H100),
  and two factors that multiply the same activations (``U`` and ``C`` when ``t`` is ``x``) are
  decoded and summed into one operand, so the GEMM runs once.

Autotuning keys on a power-of-two bucket of ``M`` (plus the shapes and code widths). The
codebook is read with a small-table load that stays in L1 (``book_gather=False``, the default)
or kept in registers/shared memory and read with ``tl.gather`` (``book_gather=True``); the
benchmark times both.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from .lowrank_gemm import IDENTITY_U, IDENTITY_V, atmc_decode_ref, atmc_linear_ref, check_factor, check_linear
from .lowrank_gemm_kernels import _csr_mm_kernel, _decode_csr_kernel, _decode_dense_kernel, _tile_kernel
from .packed_format import FMT_CSR, FMT_DENSE, FMT_EMPTY, code_width

__all__ = [
    "DENSIFY_MIN_DENSITY",
    "SMALL_M",
    "atmc_decode_triton",
    "atmc_linear_triton",
    "decode_launch",
    "linear_launch",
]

SMALL_M = 32
DENSIFY_MIN_DENSITY = 1 / 128
KIND_NONE, KIND_CODES, KIND_PLAIN = 0, 1, 2
DOT_F32, DOT_F16, DOT_BF16 = 0, 1, 2
_DOT = {torch.float32: DOT_F32, torch.float16: DOT_F16, torch.bfloat16: DOT_BF16}


# ------------------------------------------------------------------------------------------------ configs


def _cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


TILE_SMALL_CONFIGS = [  # BLOCK_M (16 / 32) comes from the launcher; split-K for enough programs in flight
    _cfg(BLOCK_N=32, BLOCK_K=128, SPLIT_K=8, GROUP_M=1),
    _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, GROUP_M=1),
    _cfg(BLOCK_N=64, BLOCK_K=64, SPLIT_K=16, GROUP_M=1, num_stages=4),
    _cfg(BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, GROUP_M=1),
]
TILE_LARGE_CONFIGS = [
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, SPLIT_K=1, GROUP_M=8, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
]
# CSR kernel tiles [BLOCK_M, BLOCK_R, BLOCK_J]: "narrow" for BLOCK_M <= 8, "wide" for BLOCK_M 16..64
CSR_NARROW_CONFIGS = [_cfg(BLOCK_R=br, BLOCK_J=bj) for br, bj in ((16, 64), (8, 128), (32, 32))]
CSR_WIDE_CONFIGS = [_cfg(BLOCK_R=br, BLOCK_J=bj) for br, bj in ((2, 64), (4, 32), (8, 16))]
# Fixed tiles: Triton's interpreter (CPU tensors: nothing to tune), epilogue-only launches, tests.
FIXED_CONFIG = {
    "tile_small": {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 1},
    "tile_large": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2},
    "csr": {"BLOCK_R": 8, "BLOCK_J": 16},
}
DECODE_DENSE = {"BLOCK_R": 16, "BLOCK_C": 128}
DECODE_CSR = {"BLOCK_R": 16, "BLOCK_J": 32}

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KB)


def tile_smem(meta: dict, num_stages: int) -> int:
    """Upper bound of :func:`_tile_kernel`'s shared memory: ``num_stages`` fp32-sized A and B tiles + 1 KB.

    (fp16 tiles stage the dequantized B in fp32; ``tests/test_gpu_static.py`` checks the bound against
    the compiled kernels.)
    """
    return num_stages * (meta["BLOCK_M"] * meta["BLOCK_K"] + meta["BLOCK_K"] * meta["BLOCK_N"]) * 4 + 1024


def tile_configs(small: bool, block_m: int | None = None) -> list:
    """The tile kernel's autotune configs that fit :data:`SMEM_LIMIT` (``block_m``: the launcher's, small M)."""
    configs = TILE_SMALL_CONFIGS if small else TILE_LARGE_CONFIGS
    return [c for c in configs if tile_smem({"BLOCK_M": block_m, **c.kwargs}, c.num_stages) <= SMEM_LIMIT]


def _prune_small(configs, named_args, **kwargs):  # pruned before anything is compiled
    return tile_configs(True, {**named_args, **kwargs}["BLOCK_M"])


def _prune_large(configs, named_args, **kwargs):
    return tile_configs(False)


_TILE_KEY = ["M_BUCKET", "N", "K1", "K2", "KIND1", "WIDTH1", "KIND2", "WIDTH2"]
_CSR_KEY = ["M_BUCKET", "N", "K", "WIDTH"]
_tile_small = triton.autotune(
    TILE_SMALL_CONFIGS, key=_TILE_KEY, reset_to_zero=["out_ptr"], prune_configs_by={"early_config_prune": _prune_small}
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
    def density(self) -> float:
        return self.indices.numel() / (self.rows * self.cols)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output element is written by a kernel (tests poison this with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    """Smallest power of two >= ``n``; on a symbolic ``n`` this guards only on its bucket."""
    p = 1
    while p < n:
        p *= 2
    return p


def _book_args(f: _Factor | None) -> tuple[Tensor | None, int, int]:
    if f is None or f.raw:
        return None, 1, 1
    return f.book, f.book.numel(), _pow2(f.book.numel())


def decode_into(out: Tensor, f: _Factor, accumulate: bool) -> Tensor:
    """``out [rows, cols] (+)= deq(f)``; a CSR factor always accumulates (``out`` must start at 0)."""
    book, book_len, _ = _book_args(f)
    book = f.codes if book is None else book
    if f.fmt == FMT_DENSE:
        grid = (triton.cdiv(f.rows, DECODE_DENSE["BLOCK_R"]), triton.cdiv(f.cols, DECODE_DENSE["BLOCK_C"]))
        wrap_triton(_decode_dense_kernel)[grid](
            out_ptr=out,
            stride_o=out.stride(0),
            rows=f.rows,
            cols=f.cols,
            words_ptr=f.codes,
            book_ptr=book,
            book_len=book_len,
            WIDTH=f.width,
            ACCUM=accumulate,
            **DECODE_DENSE,
        )
    elif f.fmt == FMT_CSR:
        grid = (triton.cdiv(f.rows, DECODE_CSR["BLOCK_R"]),)
        wrap_triton(_decode_csr_kernel)[grid](
            out_ptr=out,
            stride_o=out.stride(0),
            rows=f.rows,
            cols=f.cols,
            indptr_ptr=f.indptr,
            indices_ptr=f.indices,
            words_ptr=f.codes,
            book_ptr=book,
            book_len=book_len,
            nnz=f.indices.numel(),
            WIDTH=f.width,
            **DECODE_CSR,
        )
    return out


def decode_launch(f: _Factor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense ``[rows, cols]`` of ``f`` in ``dtype``."""
    if f.fmt == FMT_DENSE:
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
    """One :func:`_tile_kernel` launch for ``terms = [(A, _Factor | plain Tensor)]`` (at most two)."""
    M, N = out.shape
    args = {
        "out_ptr": out,
        "stride_om": out.stride(0),
        "M": M,
        "N": N,
        "e_ptr": out if addend is None else addend,
        "stride_em": 0 if addend is None else addend.stride(0),
        "bias_ptr": out if bias is None else bias,
        "M_BUCKET": _pow2(M),
    }
    consts = {"HAS_ADDEND": addend is not None, "HAS_BIAS": bias is not None, "DOT": dot, "BOOK_GATHER": book_gather}
    for s in (1, 2):
        a, b = terms[s - 1] if s <= len(terms) else (None, None)
        kind = KIND_NONE if b is None else KIND_PLAIN if isinstance(b, Tensor) else KIND_CODES
        f = b if kind == KIND_CODES else None
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
        }
        consts |= {
            f"KIND{s}": kind,
            f"WIDTH{s}": 0 if f is None else f.width,
            f"BOOK{s}": book_size if book_gather else 1,
        }
    if small:
        consts["BLOCK_M"] = 16 if M <= 16 else 32
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
    consts |= meta
    grid = (triton.cdiv(M, consts["BLOCK_M"]) * triton.cdiv(N, consts["BLOCK_N"]), consts["SPLIT_K"])
    wrap_triton(_tile_kernel)[grid](**args, **consts)


def _csr_launch(
    out: Tensor,
    a_t: Tensor,
    f: _Factor,
    small: bool,
    config: dict | None,
    init: bool = False,
    addend: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """``out += a deq(f)^T`` for a CSR factor ``f [N, K]`` and ``a_t = a^T [K, M]`` contiguous (``init``:
    ``out = addend + bias + a deq(f)^T``). With ``M`` contiguous, the ``BLOCK_M`` activations one
    nonzero multiplies are one coalesced read."""
    M, N = out.shape
    a_arg, stride_am, stride_ak, block_m = a_t, 1, M, _pow2(M) if small else 64
    book, book_len, _ = _book_args(f)
    args = {
        "out_ptr": out,
        "stride_om": out.stride(0),
        "M": M,
        "N": N,
        "a_ptr": a_arg,
        "stride_am": stride_am,
        "stride_ak": stride_ak,
        "K": f.cols,
        "indptr_ptr": f.indptr,
        "indices_ptr": f.indices,
        "words_ptr": f.codes,
        "book_ptr": f.codes if book is None else book,
        "book_len": book_len,
        "nnz": f.indices.numel(),
        "e_ptr": out if addend is None else addend,
        "stride_em": 0 if addend is None else addend.stride(0),
        "bias_ptr": out if bias is None else bias,
        "M_BUCKET": _pow2(M),
        "WIDTH": f.width,
        "INIT": init,
        "HAS_ADDEND": init and addend is not None,
        "HAS_BIAS": init and bias is not None,
        "BLOCK_M": block_m,
    }
    meta = (config or {}).get("csr")
    if meta is None and out.device.type != "cpu":
        kernel = _csr_narrow if block_m <= 8 else _csr_wide

        def grid(META):
            return (triton.cdiv(N, META["BLOCK_R"]), triton.cdiv(M, block_m))

        wrap_triton(kernel)[grid](**args)
        return
    meta = {**FIXED_CONFIG["csr"], **(meta or {})}
    grid = (triton.cdiv(N, meta["BLOCK_R"]), triton.cdiv(M, block_m))
    wrap_triton(_csr_mm_kernel)[grid](**args, **meta)


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
    densify = cfg.get("densify")
    device = (addend if addend is not None else products[0][0]).device
    tile, sparse = [], []
    for a, f in products:
        if f.fmt == FMT_DENSE:
            tile.append((a, f))
        elif f.fmt == FMT_CSR:
            dense_enough = not small and f.density >= DENSIFY_MIN_DENSITY
            if densify if densify is not None else dense_enough:
                tile.append((a, decode_launch(f, dot_dtype)))
            else:
                sparse.append((a, f))
    if len(tile) == 2 and tile[0][0] is tile[1][0] and not small:  # same activations: one GEMM on the sum
        a, (f1, f2) = tile[0][0], (tile[0][1], tile[1][1])
        merged = f1 if isinstance(f1, Tensor) else decode_launch(f1, dot_dtype)
        if isinstance(f2, Tensor):
            merged = merged + f2
        else:
            merged = decode_into(merged, f2, accumulate=True)
        tile = [(a, merged)]
    dot = _DOT[dot_dtype]
    gather = bool(cfg.get("book_gather", False))
    a_t: dict[int, Tensor] = {}

    def transposed(a: Tensor) -> Tensor:  # one [K, M] copy per activation (x, t), shared by its CSR factors
        if id(a) not in a_t:
            a_t[id(a)] = a.reshape(-1) if M == 1 else a.t().contiguous()
        return a_t[id(a)]

    if small and tile:  # split-K: fp32 atomics into zeros
        out = torch.zeros(M, N, dtype=torch.float32, device=device)
        _tile_launch(out, tile, addend, bias, dot, True, gather, config)
        for a, f in sparse:
            _csr_launch(out, transposed(a), f, small, config)
        return out.to(out_dtype)
    out = _empty((M, N), out_dtype, device)
    if tile or not sparse:  # the tile kernel writes every element (an epilogue-only launch without products)
        fixed = config if tile else {**cfg, "tile": FIXED_CONFIG["tile_large"]}
        _tile_launch(out, tile, addend, bias, dot, False, gather, fixed)
    for i, (a, f) in enumerate(sparse):
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
        )
    return out


def _check_launch(op: str, x: Tensor, bias: Tensor | None) -> None:
    if x.dtype not in _DOT:
        raise ValueError(f"{op}: the Triton kernel takes float16, bfloat16 or float32 x, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous")
    if bias is not None and not bias.is_contiguous():
        raise ValueError(f"{op}: bias must be contiguous")


def linear_launch(
    x: Tensor, bias: Tensor | None, n: int, r: int, identity: int, factors, config: dict | None = None
) -> Tensor:
    """Triton ``atmc_linear`` (``factors = [(fmt, codes, book, indptr, indices)] * 3`` for U, V, C).

    ``config`` overrides tuning for tests: ``{"tile": {...}, "csr": {...}, "densify": bool,
    "book_gather": bool}`` (meta-parameters of the kernels; without it CUDA tensors autotune).
    """
    check_linear("atmc_linear", x, bias, n, r, identity, factors)
    _check_launch("atmc_linear", x, bias)
    M, K = x.shape
    if M == 0:
        return x.new_zeros(0, n)
    U, V, C = (_Factor(f[0], rows, cols, *f[1:]) for f, (rows, cols) in zip(factors, ((n, r), (r, K), (n, K))))
    t = None
    if U.fmt != FMT_EMPTY or identity == IDENTITY_U:
        if V.fmt != FMT_EMPTY:  # t = x V^T (+ x)  [M, r]
            t = _packed_matmul(
                M, r, [(x, V)], x if identity == IDENTITY_V else None, None, torch.float32, x.dtype, config
            )
        elif identity == IDENTITY_V:
            t = x
    products = [(x, C)] + ([(t, U)] if t is not None else [])
    return _packed_matmul(M, n, products, t if identity == IDENTITY_U else None, bias, x.dtype, x.dtype, config)


def atmc_linear_triton(
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
    """Launcher of op ``atmc_linear`` (same signature and result as :func:`atmc_linear_ref`)."""
    factors = (
        (u_fmt, u_codes, u_book, u_indptr, u_indices),
        (v_fmt, v_codes, v_book, v_indptr, v_indices),
        (c_fmt, c_codes, c_book, c_indptr, c_indices),
    )
    if x.device.type == "cpu":  # only reached when tracing a CPU graph: CPU tensors take the reference
        return atmc_linear_ref(x, bias, n, r, identity, *(t for f in factors for t in f))
    return linear_launch(x, bias, n, r, identity, factors)


def atmc_decode_triton(
    fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor
) -> Tensor:
    """Launcher of op ``atmc_decode`` (same signature and result as :func:`atmc_decode_ref`)."""
    if codes.device.type == "cpu":
        return atmc_decode_ref(fmt, rows, cols, codes, book, indptr, indices)
    check_factor("atmc_decode", "W", fmt, rows, cols, codes, book, indptr, indices, codes.device)
    return decode_launch(_Factor(fmt, rows, cols, codes, book, indptr, indices))
