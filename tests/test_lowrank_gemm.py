"""Packed factors and the dequantize-sparse-lowrank kernels against float64 dense math.

The oracle dequantizes every factor densely and computes ``x (U V + C)^T + bias`` in float64.
CPU tensors run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set by conftest
without a GPU); the same checks run as ``gpu`` tests on CUDA tensors with compiled kernels.
"""

import os

import pytest
import torch
from atmc_triton.kernels.lowrank_gemm import (
    IDENTITY_NONE,
    IDENTITY_U,
    IDENTITY_V,
    PACKED_M,
    PATHS,
    SMALL_M_PATH,
    atmc_decode,
    atmc_decode_ref,
    atmc_linear,
    atmc_linear_ref,
    dense_crossover,
    linear_path,
    predicted_us,
)
from atmc_triton.kernels.packed_format import (
    BITMAP_GROUP,
    FMT_BITMAP,
    FMT_CSR,
    FMT_DENSE,
    FMT_EMPTY,
    SIZE_FORMATS,
    choose_format,
    code_width,
    decode_factor_ref,
    encode_factor,
    factor_bytes_breakdown,
    factor_nbytes,
    pack_bits,
    packed_words,
    unpack_bits,
)
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from atmc_triton.kernels import lowrank_gemm_triton as lt
except ImportError:  # no Triton: the codec and reference tests still run
    lt = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(lt is None, reason="needs triton")
DEVICES = [
    pytest.param(
        "cpu", marks=[needs_triton, pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")]
    ),
    pytest.param("cuda", marks=[needs_triton, pytest.mark.gpu]),
]
FMTS = (FMT_EMPTY, FMT_DENSE, FMT_CSR, FMT_BITMAP)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Outputs the kernels must fully write start as NaN: an unwritten element shows."""
    if lt is not None:
        monkeypatch.setattr(
            lt, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
        )


# --- helpers ---------------------------------------------------------------------------------------------------------


def make_factor(
    rows: int, cols: int, density: float, levels: int, *, raw: bool = False, empty_rows: int = 0, seed: int = 0
) -> torch.Tensor:
    """``[rows, cols]`` float32 with about ``density`` nonzeros over ``levels`` distinct values (any values if raw)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=g) < density
    if empty_rows:
        keep[torch.randperm(rows, generator=g)[:empty_rows]] = False
    if raw:
        return torch.where(keep, torch.randn(rows, cols, generator=g), 0.0)
    book = torch.randn(levels, generator=g)
    book = book + torch.sign(book) * 0.05  # nonzero levels
    code = torch.randint(0, levels, (rows, cols), generator=g).view(-1)
    nz = torch.nonzero(keep.view(-1)).view(-1)
    cover = min(levels, nz.numel())  # use as many distinct levels as there are nonzeros
    code[nz[torch.randperm(nz.numel(), generator=g)[:cover]]] = torch.arange(cover)
    return torch.where(keep, book[code.view(rows, cols)], 0.0)


def pack(w: torch.Tensor, raw: bool, fmt: int | None, device) -> tuple:
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in encode_factor(w, raw, fmt))


def oracle(x, bias, n, r, identity, factors):
    """float64 ``y = x W^T + bias`` from densely dequantized factors, and the scale ``|x| |W|^T + |bias|``."""
    K = x.shape[1]
    dense = [
        decode_factor_ref(f[0], rows, cols, *(t.cpu() for t in f[1:])).double()
        for f, (rows, cols) in zip(factors, ((n, r), (r, K), (n, K)))
    ]
    U, V, C = dense
    absw = U.abs() @ V.abs() + C.abs()
    if identity == IDENTITY_U:
        U, absw = U + torch.eye(n, dtype=U.dtype), absw + V.abs()
    W = U @ V + C
    if identity == IDENTITY_V:
        W, absw = W + dense[0], absw + dense[0].abs()
    x64 = x.cpu().double()
    y = x64 @ W.T
    scale = x64.abs() @ absw.T
    if bias is not None:
        y, scale = y + bias.cpu().double(), scale + bias.cpu().double().abs()
    return y, scale


def assert_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: max error <= 1e-5 of max |y| (the interpreter computes in float32); float16: <= 4 units of
    2^-11 of ``|x| |W|^T + |bias|`` per element (rounded operands); float32 on a GPU (tf32 tensor cores, like
    ``F.linear`` under ``allow_tf32``, which truncate rather than round: up to four truncated operands in the
    low-rank product x V^T U^T): <= 8 units."""
    tf32 = got.device.type == "cuda" and dtype == torch.float32
    got = got.detach().cpu().double()
    assert not torch.isnan(got).any(), "unwritten (NaN) output elements"
    err = (got - want).abs()
    if dtype == torch.float32 and not tf32:
        top = float(want.abs().max()) if want.numel() else 0.0
        assert float(err.max()) <= 1e-5 * top if top > 0 else float(err.max()) == 0.0, float(err.max()) / top
    else:
        units = 8 if tf32 else 4
        assert bool((err <= units * 2.0**-11 * scale + 1e-6).all()), float((err / (scale + 1e-30)).max())


def run_kernel(x, bias, n, r, identity, factors, config=None):
    """The Triton launcher with fixed tiles (one compile per specialization on a GPU; the autotuned
    path runs in ``test_op_dispatches_to_triton_on_cuda_and_matches_cpu`` and the packed-model tests)."""
    regime = "tile_small" if x.shape[0] <= lt.SMALL_M else "tile_large"
    fixed = {"tile": dict(lt.FIXED_CONFIG[regime]), "csr": dict(lt.FIXED_CONFIG["csr"])}
    return lt.linear_launch(x, bias, n, r, identity, factors, {**fixed, **(config or {})})


def layer_case(
    M,
    N,
    K,
    r,
    identity,
    fmts,
    *,
    bits=4,
    raw=False,
    density=0.3,
    empty_rows=0,
    seed=0,
    dtype=torch.float32,
    device="cpu",
    bias=True,
):
    """Random packed factors with the given formats, ``x [M, K]`` and bias."""
    if identity == IDENTITY_U:
        r = N
    elif identity == IDENTITY_V:
        r = K
    g = torch.Generator().manual_seed(seed)
    factors = []
    for i, ((rows, cols), fmt) in enumerate(zip(((N, r), (r, K), (N, K)), fmts)):
        w = make_factor(
            rows,
            cols,
            0.0 if fmt == FMT_EMPTY else density,
            2**bits,
            raw=raw,
            empty_rows=min(empty_rows, rows - 1),
            seed=seed * 7 + i,
        )
        if fmt != FMT_EMPTY and not bool((w != 0).any()):
            w[rows // 2, cols // 2] = 0.5
        factors.append(pack(w, raw, fmt, device))
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device) if bias else None
    return x, b, N, r, factors


# --- the codec -------------------------------------------------------------------------------------------------------


@given(width=st.integers(1, 32), n=st.sampled_from([0, 1, 7, 31, 32, 33, 63, 1000, 1031]), seed=st.integers(0, 99))
def test_bits_round_trip(width, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**width, (n,), generator=g, dtype=torch.int64)
    words = pack_bits(codes, width)
    assert words.dtype == torch.int32 and words.numel() == packed_words(n, width)
    assert int(words[-1]) == 0  # the pad word
    assert torch.equal(unpack_bits(words, n, width), codes)


def test_bits_layout_is_little_endian_stream():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001, 0]
    w = pack_bits(torch.tensor([0x1FF] * 4), 9)  # the 4th code straddles words 0 and 1
    assert w.tolist() == [-1, 0b1111, 0]


@given(
    rows=st.sampled_from([1, 7, 63]),
    cols=st.sampled_from([1, 7, 130]),
    density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    levels=st.integers(1, 256),
    raw=st.booleans(),
    empty_rows=st.integers(0, 3),
    seed=st.integers(0, 99),
)
def test_encode_decode_is_exact_in_every_format(rows, cols, density, levels, raw, empty_rows, seed):
    w = make_factor(rows, cols, density, levels, raw=raw, empty_rows=min(empty_rows, rows), seed=seed)
    nnz = int((w != 0).sum())
    lv = 0 if raw else int(torch.unique(w[w != 0]).numel())
    best = choose_format(rows, cols, nnz, lv, raw)
    for fmt in (None, FMT_DENSE, FMT_CSR, FMT_BITMAP, "size"):
        enc = encode_factor(w, raw, None, SIZE_FORMATS) if fmt == "size" else encode_factor(w, raw, fmt)
        got_fmt = enc[0]
        if fmt == "size":
            assert got_fmt == (FMT_EMPTY if nnz == 0 else choose_format(rows, cols, nnz, lv, raw, SIZE_FORMATS))
        else:
            assert got_fmt == (FMT_EMPTY if nnz == 0 else best if fmt is None else fmt)
        back = decode_factor_ref(got_fmt, rows, cols, *enc[1:])
        assert torch.equal(back.view(torch.int32), w.view(torch.int32))  # bit-exact
        assert sum(t.nbytes for t in enc[1:]) == factor_nbytes(got_fmt, rows, cols, nnz, lv, raw)
        assert sum(factor_bytes_breakdown(got_fmt, rows, cols, nnz, lv, raw).values()) == sum(t.nbytes for t in enc[1:])
        if got_fmt != FMT_EMPTY:
            assert enc[1].numel() == packed_words(
                rows * cols if got_fmt == FMT_DENSE else nnz, code_width(got_fmt, lv, raw)
            )
    if nnz:
        sizes = {f: factor_nbytes(f, rows, cols, nnz, lv, raw) for f in (FMT_DENSE, FMT_CSR, FMT_BITMAP)}
        assert sizes[best] == min(sizes[FMT_DENSE], sizes[FMT_CSR])
        assert sizes[choose_format(rows, cols, nnz, lv, raw, SIZE_FORMATS)] == min(sizes.values())


def test_on_disk_format_is_pinned():
    """The saved words of a dense, a CSR and a bitmap factor, bit for bit: code i at bits [i w, (i + 1) w) of
    a little-endian stream of int32 words plus one zero pad word; dense code 0 is the zero, CSR and bitmap
    code c is level c + 1; int16 column indices; int32 row pointers; bitmap bit j of a row's word i is
    column 32 i + j, one pointer per row and 256 columns. Changing any of these breaks saved files."""
    w = torch.tensor([[0.0, 0.5, -1.0, 0.0, 2.0], [2.0, 0.0, 0.0, -1.0, 0.5]])
    fmt, codes, book, indptr, indices = encode_factor(w, raw=False, fmt=FMT_DENSE)
    assert fmt == FMT_DENSE and book.tolist() == [0.0, -1.0, 0.5, 2.0]  # 3 levels: 2-bit dense codes
    # codes 0 2 1 0 3 | 3 0 0 1 2 -> bits (LSB first) 00 01 10 00 11 11 00 00 10 01
    assert codes.tolist() == [0b10_01_00_00_11_11_00_01_10_00, 0] and codes.dtype == torch.int32
    fmt, codes, book, indptr, indices = encode_factor(w, raw=False, fmt=FMT_CSR)
    assert indptr.tolist() == [0, 3, 6] and indptr.dtype == torch.int32
    assert indices.tolist() == [1, 2, 4, 0, 3, 4] and indices.dtype == torch.int16
    assert codes.tolist() == [0b01_00_10_10_00_01, 0]  # levels 2 1 3 3 1 2 -> codes 1 0 2 2 0 1, 2 bits each
    fmt, codes, book, indptr, indices = encode_factor(w, raw=False, fmt=FMT_BITMAP)
    assert indices.tolist() == [0b10110, 0b11001] and indices.dtype == torch.int32  # bit j = column j
    assert indptr.tolist() == [0, 3, 6] and indptr.dtype == torch.int32  # nonzeros before each row's 256-col group
    assert codes.tolist() == [0b01_00_10_10_00_01, 0]  # the CSR codes, in the same row-major order
    wide = torch.zeros(2, 300)
    wide[0, [0, 255, 256, 299]] = 1.0
    wide[1, 31] = 1.0
    fmt, codes, book, indptr, indices = encode_factor(wide, raw=False, fmt=FMT_BITMAP)
    assert BITMAP_GROUP == 256 and indptr.tolist() == [0, 2, 4, 5, 5]  # row 0: groups [0, 256), [256, 300)
    assert [int(v) & 0xFFFFFFFF for v in indices] == [1, 0, 0, 0, 0, 0, 0, 1 << 31, 1, 1 << 11] + [1 << 31] + [0] * 9
    nine = pack_bits(torch.tensor([0x155, 0x0AA, 0x1FF, 0x1E1]), 9)  # the 4th 9-bit code straddles words 0, 1
    assert [int(v) & 0xFFFFFFFF for v in nine] == [0x0FFD5555, 0xF, 0]
    assert unpack_bits(nine, 4, 9).tolist() == [0x155, 0x0AA, 0x1FF, 0x1E1]


def test_code_widths():
    assert [code_width(FMT_DENSE, L, False) for L in (1, 2, 3, 4, 255, 256)] == [1, 2, 2, 3, 8, 9]
    assert [code_width(FMT_CSR, L, False) for L in (1, 2, 3, 4, 255, 256)] == [1, 1, 2, 2, 8, 8]
    assert [code_width(FMT_BITMAP, L, False) for L in (1, 2, 3, 4, 255, 256)] == [1, 1, 2, 2, 8, 8]
    assert code_width(FMT_CSR, 0, True) == code_width(FMT_DENSE, 0, True) == code_width(FMT_BITMAP, 0, True) == 32


def test_encode_refuses_more_than_256_levels():
    with pytest.raises(ValueError, match="at most 256"):
        encode_factor(torch.arange(1, 300, dtype=torch.float32).view(1, -1), raw=False)


def test_wide_factor_uses_int32_column_indices():
    w = torch.zeros(2, 40000)
    w[1, 39999] = 2.0
    fmt, codes, book, indptr, indices = encode_factor(w, raw=False)
    assert fmt == FMT_CSR and indices.dtype == torch.int32 and indices.tolist() == [39999]
    assert torch.equal(decode_factor_ref(fmt, 2, 40000, codes, book, indptr, indices), w)


# --- the reference ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [IDENTITY_NONE, IDENTITY_U, IDENTITY_V])
def test_reference_matches_dense_float64(identity):
    x, b, n, r, facs = layer_case(5, 9, 11, 4, identity, (FMT_DENSE, FMT_CSR, FMT_CSR), bits=3)
    flat = [t for f in facs for t in f]
    want, scale = oracle(x, b, n, r, identity, facs)
    assert_close(atmc_linear_ref(x, b, n, r, identity, *flat), want, scale, torch.float32)
    got64 = atmc_linear_ref(x.double(), b.double(), n, r, identity, *flat)
    assert got64.dtype == torch.float64 and float((got64 - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_gradients_match_dense_autograd():
    for identity in (IDENTITY_NONE, IDENTITY_U, IDENTITY_V):
        x, b, n, r, facs = layer_case(4, 6, 5, 3, identity, (FMT_CSR, FMT_DENSE, FMT_DENSE), bits=2, seed=3)
        flat = [t for f in facs for t in f]
        x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
        torch.autograd.gradcheck(
            lambda xx, bb, n=n, r=r, i=identity, f=flat: atmc_linear(xx, bb, n, r, i, *f), (x64, b64)
        )
        xf, bf = x.clone().requires_grad_(), b.clone().requires_grad_()
        g = torch.randn(4, n)
        (atmc_linear(xf, bf, n, r, identity, *flat) * g).sum().backward()
        U, V, C = (
            decode_factor_ref(f[0], rows, cols, *f[1:]).double()
            for f, (rows, cols) in zip(facs, ((n, r), (r, 5), (n, 5)))
        )
        W = (U + (torch.eye(n) if identity == IDENTITY_U else 0)) @ (
            V + (torch.eye(5) if identity == IDENTITY_V else 0)
        ) + C
        torch.testing.assert_close(xf.grad.double(), g.double() @ W, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bf.grad, g.sum(0))


# --- validation ------------------------------------------------------------------------------------------------------


def _valid():
    x, b, n, r, facs = layer_case(3, 6, 5, 2, IDENTITY_NONE, (FMT_DENSE, FMT_CSR, FMT_DENSE))
    return x, b, n, r, [list(f) for f in facs]


def _call(x, b, n, r, identity, facs):
    return atmc_linear_ref(x, b, n, r, identity, *(t for f in facs for t in f))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "2-D float"),
        (lambda a: a.__setitem__(0, a[0].long()), "2-D float"),
        (lambda a: a.__setitem__(1, torch.zeros(7)), "bias must be"),
        (lambda a: a.__setitem__(4, 3), "identity must be"),
        (lambda a: a.__setitem__(4, IDENTITY_U), "needs r == N"),
        (lambda a: a.__setitem__(4, IDENTITY_V), "needs r == K"),
        (lambda a: a.__setitem__(2, 0), "need N, K >= 1 and r >= 0"),
        (lambda a: a.__setitem__(3, -1), "need N, K >= 1 and r >= 0"),
        (lambda a: a.__setitem__(3, 0), r"r = 0 \(W = C\) needs empty U and V"),  # init="sparse": only C
        (lambda a: a[5][0].__setitem__(0, 5), "fmt must be"),
        (lambda a: a[5][0].__setitem__(1, a[5][0][1][:-1]), "codes must hold"),
        (lambda a: a[5][0].__setitem__(1, a[5][0][1].long()), "codes must be a 1-D"),
        (lambda a: a[5][0].__setitem__(2, a[5][0][2].double()), "book must be a 1-D"),
        (lambda a: a[5][0].__setitem__(2, torch.zeros(1)), "book must hold"),
        (lambda a: a[5][0].__setitem__(2, torch.zeros(300)), "book must hold"),
        (lambda a: a[5][0].__setitem__(3, torch.zeros(3, dtype=torch.int32)), "dense factor has empty"),
        (lambda a: a[5][1].__setitem__(3, a[5][1][3][:-1]), "indptr must have"),
        (lambda a: a[5][1].__setitem__(4, a[5][1][4].float()), "indices must be a 1-D"),
        (lambda a: a[5][1].__setitem__(1, a[5][1][1][:-1]), "codes must hold"),
        (lambda a: a[5][2].__setitem__(1, a[5][2][1].view(1, -1)), "codes must be a 1-D"),
        (lambda a: a[5][2].__setitem__(1, torch.zeros(8, dtype=torch.int32)[::2]), "contiguous"),
        (lambda a: a[5].__setitem__(2, [FMT_EMPTY] + list(a[5][2][1:])), "empty factor has empty"),
    ],
)
def test_bad_arguments_raise(breakage, message):
    x, b, n, r, facs = _valid()
    args = [x, b, n, r, IDENTITY_NONE, facs]
    breakage(args)
    with pytest.raises(ValueError, match=message):
        _call(*args)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f[0][1].fill_(-1), "code 7 past its 4 levels"),  # dense U: 3-bit codes
        (lambda f: f[1][4].fill_(30000), r"column indices outside \[0, 5\)"),
        (lambda f: f[1][4].fill_(-2), "column indices outside"),
        (lambda f: f[1][4].zero_(), "ascend within each row"),
        (lambda f: f[1][3].__setitem__(-1, 10**6), "indptr must rise"),
        (lambda f: (f[1].__setitem__(2, f[1][2][:4]), f[1][1].fill_(-1)), "codes past its 3 levels"),
        (lambda f: f[1][2].__setitem__(2, float("nan")), r"codebook levels must be finite, got \[nan\]"),
        (lambda f: f[1][2].__setitem__(1, -float("inf")), r"codebook levels must be finite, got \[-inf\]"),
    ],
)
def test_reference_refuses_corrupt_values(corrupt, message):
    """On CPU the op (its reference) checks index values before decoding; so does atmc_decode."""
    x, b, n, r, facs = layer_case(3, 6, 5, 2, IDENTITY_NONE, (FMT_DENSE, FMT_CSR, FMT_DENSE), bits=2, density=0.6)
    facs = [[t.clone() if torch.is_tensor(t) else t for t in f] for f in facs]
    corrupt(facs)
    with pytest.raises(ValueError, match=message):
        atmc_linear(x, b, n, r, IDENTITY_NONE, *(t for f in facs for t in f))
    bad = facs[0] if "levels" in message and "code 7" in message else facs[1]
    rows, cols = (n, r) if bad is facs[0] else (r, 5)
    with pytest.raises(ValueError, match=message):
        atmc_decode(bad[0], rows, cols, *bad[1:])


def test_int16_indices_for_too_many_columns_raise():
    w = torch.zeros(1, 40000)
    w[0, 3] = 1.0
    fmt, codes, book, indptr, indices = encode_factor(w, raw=False, fmt=FMT_CSR)
    with pytest.raises(ValueError, match="int16 column indices"):
        atmc_decode_ref(fmt, 1, 40000, codes, book, indptr, indices.short())


# --- the kernels (interpreter on CPU, compiled on CUDA) ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("identity", [IDENTITY_NONE, IDENTITY_U, IDENTITY_V])
@pytest.mark.parametrize("M", [3, 40])
def test_every_storage_combination(device, identity, M):
    """All 27 (U, V, C) format combinations, both regimes, every identity."""
    for i, fmts in enumerate((u, v, c) for u in FMTS for v in FMTS for c in FMTS):
        x, b, n, r, facs = layer_case(M, 19, 21, 5, identity, fmts, seed=i, empty_rows=2, device=device)
        want, scale = oracle(x, b, n, r, identity, facs)
        assert_close(run_kernel(x, b, n, r, identity, facs), want, scale, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_codebook_width(device, bits):
    """b = 1..8 with 2^b levels: dense codes of b + 1 bits, CSR codes of b bits, straddling words."""
    for M, fmts in ((2, (FMT_DENSE, FMT_CSR, FMT_DENSE)), (37, (FMT_CSR, FMT_DENSE, FMT_CSR))):
        x, b, n, r, facs = layer_case(
            M, 23, 70, 23, IDENTITY_NONE, fmts, bits=bits, density=0.6, seed=bits, device=device
        )
        assert all(f[2].numel() - 1 == 2**bits for f in facs)  # every level used
        want, scale = oracle(x, b, n, r, IDENTITY_NONE, facs)
        assert_close(run_kernel(x, b, n, r, IDENTITY_NONE, facs), want, scale, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=max(4, settings.default.max_examples // 2))  # follows the profile: 12 in ci, 150 thorough
@given(
    M=st.sampled_from([1, 7, 16, 17, 33, 63]),
    N=st.sampled_from([1, 7, 63]),
    K=st.sampled_from([1, 7, 63, 130]),
    r=st.integers(1, 7),
    identity=st.sampled_from([IDENTITY_NONE, IDENTITY_U, IDENTITY_V]),
    fmts=st.tuples(*[st.sampled_from(FMTS)] * 3),
    bits=st.integers(1, 8),
    raw=st.booleans(),
    density=st.sampled_from([0.02, 0.3, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 999),
    data=st.data(),
)
def test_odd_shapes_and_configs(device, M, N, K, r, identity, fmts, bits, raw, density, bias, seed, data):
    r = min(r, N, K)
    x, b, n, r, facs = layer_case(
        M,
        N,
        K,
        r,
        identity,
        fmts,
        bits=bits,
        raw=raw,
        density=density,
        seed=seed,
        device=device,
        bias=bias,
        empty_rows=1,
    )
    small = M <= lt.SMALL_M
    block = st.sampled_from([16, 32, 64])  # BLOCK_K <= 32: at most 16 decoded codes per thread (no spills on GPUs)
    tile = {
        "BLOCK_N": data.draw(block),
        "BLOCK_K": data.draw(st.sampled_from([16, 32])),
        "GROUP_M": data.draw(st.sampled_from([1, 4])),
    }
    tile |= (
        {"SPLIT_K": data.draw(st.sampled_from([1, 2, 3, 8]))} if small else {"BLOCK_M": data.draw(block), "SPLIT_K": 1}
    )
    # (BLOCK_J 4: one 4-slot group per row and iteration, the kernel's smallest)
    csr = {"BLOCK_R": data.draw(st.sampled_from([1, 4, 16])), "BLOCK_J": data.draw(st.sampled_from([4, 8, 32]))}
    config = {
        "tile": tile,
        "csr": csr,
        "densify": data.draw(st.sampled_from([None, True, False])),
        "book_gather": data.draw(st.booleans()),
    }
    want, scale = oracle(x, b, n, r, identity, facs)
    assert_close(run_kernel(x, b, n, r, identity, facs, config), want, scale, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 5, 48])
@pytest.mark.parametrize("identity", [IDENTITY_NONE, IDENTITY_U, IDENTITY_V])
def test_float16_activations(device, M, identity):
    for i, fmts in enumerate(
        [(FMT_DENSE, FMT_DENSE, FMT_CSR), (FMT_CSR, FMT_EMPTY, FMT_DENSE), (FMT_CSR, FMT_CSR, FMT_CSR)]
    ):
        x, b, n, r, facs = layer_case(M, 24, 40, 8, identity, fmts, bits=6, dtype=torch.float16, device=device, seed=i)
        for densify in (None, True):
            got = run_kernel(x, b.half(), n, r, identity, facs, {"densify": densify})
            assert got.dtype == torch.float16
            assert_close(got, *oracle(x, b.half(), n, r, identity, facs), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_large_layer_over_1000(device):
    for M in (2, 34):
        x, b, n, r, facs = layer_case(
            M, 1030, 1100, 6, IDENTITY_NONE, (FMT_DENSE, FMT_DENSE, FMT_CSR), bits=8, density=0.05, device=device
        )
        cfg = {
            "tile": {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 1}
            if M <= lt.SMALL_M
            else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8},
            "csr": {"BLOCK_R": 4, "BLOCK_J": 32},
        }
        assert_close(
            run_kernel(x, b, n, r, IDENTITY_NONE, facs, cfg), *oracle(x, b, n, r, IDENTITY_NONE, facs), torch.float32
        )


@pytest.mark.parametrize("device", DEVICES)
def test_csr_rows_past_the_grid_limit_run_as_several_launches(device, monkeypatch):
    """CUDA allows 65,535 programs on grid axis 1, where the CSR kernel puts the row blocks of x: a call with more
    (over 2.1M rows) runs row ranges one launch each. With the limit set to 2 blocks here: 3, 40 and 64 rows take
    one launch per factor, 100 and 70 rows two (a short last range), with the first product's addend and bias (all
    three factors CSR, U's identity) and without them (a tile factor first), against the reference."""
    monkeypatch.setattr(lt, "GRID_Y_MAX", 2)
    grids, wrap = [], lt.wrap_triton

    def record(kernel):
        launch = wrap(kernel)
        if kernel is not lt._csr_mm_kernel:
            return launch
        return type("G", (), {"__getitem__": lambda _, g: grids.append(g) or launch[g]})()

    monkeypatch.setattr(lt, "wrap_triton", record)
    for M, fmts, launches in (
        (3, (FMT_CSR,) * 3, 3),  # a launch per CSR factor (V for t, then C and U)
        (40, (FMT_CSR,) * 3, 3),
        (64, (FMT_CSR,) * 3, 3),
        (100, (FMT_CSR,) * 3, 6),  # 4 blocks of 32 rows: two ranges
        (70, (FMT_DENSE, FMT_CSR, FMT_CSR), 4),  # U dense: its tile launch writes first, C's ranges add
    ):
        grids.clear()
        x, b, n, r, facs = layer_case(M, 37, 45, 37, IDENTITY_U, fmts, bits=4, density=0.2, device=device, seed=M)
        assert_close(run_kernel(x, b, n, r, IDENTITY_U, facs), *oracle(x, b, n, r, IDENTITY_U, facs), torch.float32)
        assert len(grids) == launches and all(g[1] <= 2 for g in grids), (M, grids)


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_layer_gives_bias(device):
    for M in (3, 40):
        x, b, n, r, facs = layer_case(M, 7, 9, 3, IDENTITY_NONE, (FMT_EMPTY,) * 3, device=device)
        got = run_kernel(x, b, n, r, IDENTITY_NONE, facs)
        assert torch.equal(got.cpu(), b.cpu().expand(M, n))
        got = run_kernel(x, None, n, r, IDENTITY_NONE, facs)
        assert torch.equal(got.cpu(), torch.zeros(M, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("raw", [False, True])
def test_decode_kernel_is_exact(device, raw):
    for fmt, density in ((FMT_DENSE, 0.5), (FMT_CSR, 0.1), (FMT_EMPTY, 0.0)):
        w = make_factor(37, 300, density, 200, raw=raw, empty_rows=3, seed=fmt)
        enc = pack(w, raw, fmt, device)
        got = lt.decode_launch(lt._Factor(enc[0], 37, 300, *enc[1:]))
        assert torch.equal(got.cpu().view(torch.int32), w.view(torch.int32))
        assert torch.equal(lt.atmc_decode_triton(enc[0], 37, 300, *enc[1:]).cpu(), w)


def _sanitized(fmt, rows, cols, codes, book, indptr, indices, levels):
    """Dense float64 factor the kernels must compute from corrupt data: codes past the codebook read its
    last level, CSR entries with a column outside ``[0, cols)`` contribute nothing."""
    book = book[: levels + 1].cpu().double()
    if fmt == FMT_DENSE:
        c = unpack_bits(codes.cpu(), rows * cols, code_width(fmt, levels, False)).clamp_max(levels)
        return book[c].view(rows, cols)
    nnz = indices.numel()
    slot = unpack_bits(codes.cpu(), nnz, code_width(fmt, levels, False)).clamp_max(levels - 1) + 1
    ip = indptr.cpu().long()
    row = torch.repeat_interleave(torch.arange(rows), ip[1:] - ip[:-1])
    col = indices.cpu().long()
    ok = (col >= 0) & (col < cols)
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out.index_put_((row[ok], col[ok]), book[slot[ok]], accumulate=True)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 3, 6, 9, 40])  # CSR BLOCK_M 1 (masked gather), 4, 8, 16, 32 (zero-row gather)
def test_corrupt_data_is_clamped_and_masked_in_the_kernels(device, M):
    """The kernels' second line of defence, pinned by value. Codebooks and ``x`` are prefixes of larger
    buffers holding large values, so an unclamped code or an unmasked column reads them and shows."""
    K, n, r, bits = 16, 8, 4, 2
    x0, b, n, r, facs = layer_case(M, n, K, r, IDENTITY_NONE, (FMT_DENSE, FMT_CSR, FMT_CSR), bits=bits, seed=5)
    facs = [list(f) for f in facs]
    facs[2][2] = facs[2][2][:4]  # C: 3 levels, so its 2-bit CSR codes can point past the codebook
    levels = [f[2].numel() - 1 for f in facs]
    for f in facs:  # each codebook a prefix of a buffer whose tail is 1000s (on the device: .to() copies a prefix)
        f[2] = torch.cat([f[2], torch.full((8,), 1000.0)]).to(device)[: f[2].numel()]
    facs[0][1] = torch.full_like(facs[0][1], -1)  # dense U: every 3-bit code 7 > 4 levels (tile path clamp)
    facs[2][1] = torch.full_like(facs[2][1], -1)  # CSR C: every 2-bit code 3 -> slot 4 > 3 (CSR path clamp)
    ind = facs[1][4]  # CSR V: every other column just past K (in bounds of x's buffer) or negative
    facs[1][4] = torch.where(torch.arange(ind.numel()) % 2 == 0, ind, torch.where(ind % 3 == 0, -1, K + 1).short())
    big = torch.full((M * K + 4 * K + 8,), 1000.0)
    big[: M * K] = x0.reshape(-1)
    x = big.to(device)[: M * K].view(M, K)  # contiguous; its buffer continues with 1000s
    facs = [tuple(t.to(device) if torch.is_tensor(t) else t for t in f) for f in facs]
    x, b = x.to(device), b.to(device)
    U, V, C = (
        _sanitized(f[0], rows, cols, *f[1:], lv) for f, (rows, cols), lv in zip(facs, ((n, r), (r, K), (n, K)), levels)
    )
    want = x.cpu().double() @ (U @ V + C).T + b.cpu().double()
    got = run_kernel(x, b, n, r, IDENTITY_NONE, facs)
    assert torch.isfinite(got).all()
    if got.device.type == "cuda":  # tf32 tiles: judged per element against |x| |W|^T + |b|
        scale = x.cpu().double().abs() @ (U.abs() @ V.abs() + C.abs()).T + b.cpu().double().abs()
        assert_close(got, want, scale, torch.float32)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def _clamped_csr(rows, cols, codes, book, indptr, indices, width):
    """Dense float64 CSR factor from corrupt row pointers: row ``i`` holds the stored entries
    ``[max(p[i], 0), min(p[i + 1], nnz))`` (empty when that range is), nothing past the streams."""
    nnz = indices.numel()
    slot = unpack_bits(codes.cpu(), nnz, width) + 1
    p, col, book = indptr.cpu().long().tolist(), indices.cpu().long().tolist(), book.cpu().double()
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(max(p[i], 0), min(p[i + 1], nnz)):
            out[i, col[j]] += book[slot[j]]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 8])  # 2: codes shifted out of words; 8: one byte load per code
def test_corrupt_row_pointers_are_clamped_to_the_streams(device, bits):
    """Row pointers before 0, past the stored nonzeros, decreasing or overlapping never read outside the index
    and code streams, pinned by value in the CSR product (M = 1 and 40) and the decode kernel. Both streams are
    prefixes of buffers that continue with valid columns and nonzero codes, so a read past them shows. Every
    stored column is distinct, so overlapping rows still have distinct columns (the decode kernel's contract)."""
    K, n, nnz = 16, 8, 12
    g = torch.Generator().manual_seed(bits)
    book = torch.cat([torch.zeros(1), torch.randn(2**bits, generator=g)])  # 2^bits levels: CSR width = bits
    width = code_width(FMT_CSR, 2**bits, False)
    assert width == bits
    words = pack_bits(torch.randint(0, 2**bits, (nnz,), generator=g), width)
    # (the buffers on the device before slicing: .to() would copy only the prefix)
    codes = torch.cat([words, torch.full((64,), -1, dtype=words.dtype)]).to(device)[: words.numel()]  # then all ones
    cols = torch.randperm(K, generator=g)[:nnz].to(torch.int16)
    indices = torch.cat([cols, torch.zeros(64, dtype=cols.dtype)]).to(device)[:nnz]  # then column 0
    # row 0 starts before the stream, rows 2 and 6 are decreasing (empty), row 3 overlaps row 1's entries,
    # row 7 runs past the stream
    p = torch.tensor([-5, 2, 5, 3, 7, 9, 11, 10, nnz + 7], dtype=torch.int32)
    C = _clamped_csr(n, K, codes, book, p, indices, width)
    assert (C[0] != 0).any() and (C[[2, 6]] == 0).all() and (C[3] != 0).sum() == 4 and (C[7] != 0).sum() == 2
    f = lt._Factor(FMT_CSR, n, K, codes.to(device), book.to(device), p.to(device), indices.to(device))
    torch.testing.assert_close(lt.decode_launch(f).cpu().double(), C, rtol=1e-6, atol=1e-6)
    _, b, _, r, facs = layer_case(1, n, K, 4, IDENTITY_NONE, (FMT_EMPTY, FMT_EMPTY, FMT_EMPTY), seed=11)
    facs = [*facs[:2], (FMT_CSR, codes, book, p, indices)]
    facs = [tuple(t.to(device) if torch.is_tensor(t) else t for t in fa) for fa in facs]
    for M in (1, 3, 6, 9, 40):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        want = x.double() @ C.T + b.double()
        got = run_kernel(x.to(device), b.to(device), n, r, IDENTITY_NONE, facs).cpu().double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_csr_operand_layout_and_launch_check(dtype):
    """The CSR kernel's activations: ``x^T`` padded with zero columns to a multiple of ``csr_block_m(M)`` and a
    zero row ``K`` (where masked slots point); ``M = 1`` is ``x`` itself. A plain transpose is refused."""
    for M, mp in ((1, None), (2, 2), (3, 4), (5, 8), (9, 16), (16, 16), (17, 32), (40, 64)):
        x = torch.randn(M, 7).to(dtype)
        a_t = lt.csr_operand(x)
        if mp is None:
            assert a_t.shape == (7,) and torch.equal(a_t, x[0])
            continue
        assert a_t.shape == (8, mp) and a_t.is_contiguous() and torch.equal(a_t[:7, :M], x.t())
        assert not a_t[:, M:].any() and not a_t[7].any()
    x, b, n, r, facs = layer_case(3, 5, 7, 2, IDENTITY_NONE, (FMT_EMPTY, FMT_EMPTY, FMT_CSR))
    f = lt._Factor(*facs[2][:1], n, 7, *facs[2][1:])
    with pytest.raises(ValueError, match="csr_operand"):
        lt._csr_launch(torch.zeros(3, n), x.t().contiguous(), f, True, {"csr": lt.FIXED_CONFIG["csr"]})
    with pytest.raises(ValueError, match="multiple of 4"):
        lt._csr_launch(torch.zeros(3, n), lt.csr_operand(x), f, True, {"csr": {"BLOCK_R": 4, "BLOCK_J": 6}})


@pytest.mark.parametrize("device", DEVICES)
def test_split_k_reduction_is_deterministic(device):
    """No float atomics: the split-K partials are summed in a fixed order, so two runs give the same bits."""
    x, b, n, r, facs = layer_case(5, 40, 300, 8, IDENTITY_V, (FMT_DENSE, FMT_EMPTY, FMT_CSR), bits=5, device=device)
    cfg = {"tile": {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 7, "GROUP_M": 1}}
    first = run_kernel(x, b, n, r, IDENTITY_V, facs, cfg)
    assert torch.equal(first.view(torch.int32), run_kernel(x, b, n, r, IDENTITY_V, facs, cfg).view(torch.int32))
    assert_close(first, *oracle(x, b, n, r, IDENTITY_V, facs), torch.float32)
    assert lt.split_k(1, 4096, 4096) * 64 >= lt.TARGET_PROGRAMS  # enough programs for the SMs at M = 1
    for M in (17, 32):  # one 32-row tile (the launcher's BLOCK_M past 16): 64 tiles x 5 splits, not 64 x 3
        assert lt.split_k(M, 4096, 4096) * 64 >= lt.TARGET_PROGRAMS
    assert lt.split_k(16, 64, 10) == 1 and lt.split_k(16, 64, 10**6) == lt.MAX_SPLIT_K


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_validates_inputs(device):
    x, b, n, r, facs = layer_case(3, 8, 16, 4, IDENTITY_NONE, (FMT_DENSE, FMT_CSR, FMT_CSR), device=device)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        run_kernel(x.double(), b, n, r, IDENTITY_NONE, facs)
    xt, bt = torch.randn(16, 3, device=device).t(), torch.randn(n, 2, device=device)[:, 0]  # strided views
    for fs in (facs, layer_case(3, 8, 16, 4, IDENTITY_NONE, (FMT_EMPTY, FMT_EMPTY, FMT_DENSE), device=device)[4]):
        got = run_kernel(xt, bt, n, r, IDENTITY_NONE, fs)  # (dense C: x reaches the tile kernel unchanged)
        assert torch.equal(got, run_kernel(xt.contiguous(), bt.clone(), n, r, IDENTITY_NONE, fs))
    with pytest.raises(ValueError, match="SPLIT_K must be 1"):  # the large-M tiles store their output
        run_kernel(
            torch.randn(40, 16, device=device), b, n, r, IDENTITY_NONE, facs, {"tile": {"SPLIT_K": 2}, "densify": True}
        )
    other = "cpu" if device == "cuda" else "meta"
    with pytest.raises(ValueError, match="is on"):
        run_kernel(x, b.to(other), n, r, IDENTITY_NONE, facs)
    assert run_kernel(x[:0], b, n, r, IDENTITY_NONE, facs).shape == (0, n)


def test_every_m_takes_exactly_one_path():
    """The path is a pure function of M and the layer's crossover: checked for every M in 1..4096."""
    for crossover in (1, 2, 17, SMALL_M_PATH, SMALL_M_PATH + 1, 100, 1024, 4097, 1 << 20):
        paths = [linear_path(m, crossover) for m in range(1, 4097)]
        assert set(paths) <= set(PATHS)
        assert paths == sorted(paths, key=PATHS.index)  # split_k, then tile, then dense: one crossing each
        for m, p in enumerate(paths, 1):
            assert (p == "dense") == (m >= crossover)
            assert p == "dense" or (p == "split_k") == (m <= SMALL_M_PATH)
    with pytest.raises(ValueError, match="M must be"):
        linear_path(-1, 100)
    with pytest.raises(ValueError, match="crossover must be"):
        linear_path(1, 0)


def test_crossover_is_where_the_model_prefers_cublas():
    N = K = 4096
    crossovers = {}
    for ratio, bits in ((0.05, 8), (0.01, 8), (0.002, 8), (0.05, 4)):
        nnz = int(ratio * 32 * N * K / bits)
        args = (N, K, nnz * (2 + bits / 8), nnz, 0)
        m = dense_crossover(*args)
        assert PACKED_M < m <= 1 << 20
        at = [predicted_us(p, m, *args) for p in ("dense", "tile")]
        assert at[0] <= at[1] or m == 1 << 20
        if m > PACKED_M + 1:
            below = [predicted_us(p, m - 1, *args) for p in ("dense", "tile")]
            assert below[0] > below[1]
        if m <= SMALL_M_PATH:  # cuBLAS wins at every M from the crossover up to the split-K limit
            assert all(predicted_us("dense", k, *args) <= predicted_us("tile", k, *args) for k in range(m, 34))
        crossovers[ratio, bits] = m
    assert crossovers[0.05, 4] == PACKED_M + 1  # 40 % density stored as CSR: cuBLAS from the first M it may
    assert crossovers[0.002, 8] == 1 << 20  # 0.25 % density: the packed kernels at every M
    with pytest.raises(ValueError, match="path must be"):
        predicted_us("gemv", 1, N, K, 0, 0, 0)


@pytest.mark.gpu
def test_op_dispatches_to_triton_on_cuda_and_matches_cpu():
    x, b, n, r, facs = layer_case(17, 64, 96, 8, IDENTITY_V, (FMT_CSR, FMT_CSR, FMT_DENSE), device="cuda")
    flat = [t for f in facs for t in f]
    got = atmc_linear(x, b, n, r, IDENTITY_V, *flat)
    want = atmc_linear(x.cpu(), b.cpu(), n, r, IDENTITY_V, *(t.cpu() if torch.is_tensor(t) else t for t in flat))
    assert_close(got, want.double(), oracle(x, b, n, r, IDENTITY_V, facs)[1], torch.float32)  # tf32 on the GPU
    assert torch.equal(
        atmc_decode(*facs[2][:1], n, 96, *facs[2][1:]).cpu(),
        atmc_decode(*facs[2][:1], n, 96, *(t.cpu() for t in facs[2][1:])),
    )


@pytest.mark.gpu
def test_float64_on_gpu_takes_the_reference_as_on_cpu():
    """The op serves float64 activations on CUDA through the reference (the kernels take 16- and 32-bit floats):
    the same result as on CPU, where it used to raise 'the Triton kernel takes float16, bfloat16 or float32 x'."""
    x, b, n, r, facs = layer_case(3, 64, 96, 8, IDENTITY_V, (FMT_CSR, FMT_CSR, FMT_DENSE), device="cuda")
    flat = [t for f in facs for t in f]
    got = atmc_linear(x.double(), b, n, r, IDENTITY_V, *flat)
    want = atmc_linear(
        x.double().cpu(), b.cpu(), n, r, IDENTITY_V, *(t.cpu() if torch.is_tensor(t) else t for t in flat)
    )
    assert got.dtype == torch.float64 and torch.allclose(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_bfloat16_on_gpu():
    for M in (4, 64):
        x, b, n, r, facs = layer_case(
            M, 48, 64, 8, IDENTITY_U, (FMT_DENSE, FMT_CSR, FMT_CSR), dtype=torch.bfloat16, device="cuda"
        )
        got = run_kernel(x, b.bfloat16(), n, r, IDENTITY_U, facs)
        want, scale = oracle(x, b.bfloat16(), n, r, IDENTITY_U, facs)
        err = (got.cpu().double() - want).abs()
        assert got.dtype == torch.bfloat16 and bool((err <= 4 * 2.0**-8 * scale + 1e-4).all())


@needs_triton
def test_fake_propagation_on_cuda_chooses_no_path(monkeypatch):
    """``torch.export`` (and dynamo) run the launcher on fake CUDA tensors for the output's metadata only: no path
    is chosen there, so a dynamic batch is not guarded into one path's range (export refused ``Dim("batch")``). An
    AOT (functionalizing) trace still goes through the launch, which records the kernels into the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def launch(*args):
        raise AssertionError("a path was chosen")

    monkeypatch.setattr(lt, "_packed_matmul", launch)  # (every path of linear_launch goes through it)
    _, _, n, r, facs = layer_case(7, 5, 40, 2, IDENTITY_NONE, (FMT_DENSE, FMT_CSR, FMT_CSR))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = torch.empty(7, 40, device="cuda", dtype=torch.float16)
        facs = [tuple(mode.from_tensor(t).to("cuda") if torch.is_tensor(t) else t for t in f) for f in facs]
        y = lt.atmc_linear_triton(x, None, n, r, IDENTITY_NONE, *(t for f in facs for t in f))
        assert (y.shape, y.dtype, y.device.type) == ((7, n), torch.float16, "cuda")
        for bad in (x.to(torch.int32), x.view(7, 2, 20)):  # still validated while tracing
            with pytest.raises(ValueError, match="atmc_linear"):
                lt.atmc_linear_triton(bad, None, n, r, IDENTITY_NONE, *(t for f in facs for t in f))
        with FunctionalTensorMode():
            xf = FunctionalTensor.to_functional(x)
            with pytest.raises(AssertionError, match="a path was chosen"):
                lt.atmc_linear_triton(xf, None, n, r, IDENTITY_NONE, *(t for f in facs for t in f))
