"""The bitmap factor format (``FMT_BITMAP``): codec, validation, and its tile-kernel path against the reference.

Outputs the kernels must write start as NaN (``_poison_outputs``, shared with ``test_lowrank_gemm``). CPU
tensors run the kernels in Triton's interpreter; the same tests run compiled on CUDA as ``gpu`` tests.
"""

import pytest
import torch
from atmc_triton.kernels import packed_format
from atmc_triton.kernels.lowrank_gemm import IDENTITY_NONE, IDENTITY_V, atmc_decode, atmc_linear
from atmc_triton.kernels.packed_format import (
    BITMAP_GROUP,
    FMT_BITMAP,
    FMT_CSR,
    FMT_EMPTY,
    SIZE_FORMATS,
    bitmap_encode,
    bitmap_mask,
    choose_format,
    decode_factor_ref,
    encode_factor,
    factor_nbytes,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_lowrank_gemm import (  # noqa: F401 (_poison_outputs: the autouse NaN fixture)
    DEVICES,
    _poison_outputs,
    assert_close,
    layer_case,
    lt,
    make_factor,
    needs_triton,
    oracle,
    pack,
    run_kernel,
)

# --- the codec -------------------------------------------------------------------------------------------------------


def test_bitmap_is_chosen_where_it_is_smallest():
    """4096^2 at 17 % density and 8-bit codes: bitmap 5.2 MB against CSR 8.6 MB; below ~7 % CSR wins. Only
    the size objective considers it (the default keeps the faster CSR)."""
    n = 4096
    for density, want in ((0.17, FMT_BITMAP), (0.34, FMT_BITMAP), (0.05, FMT_CSR), (0.01, FMT_CSR)):
        nnz = int(density * n * n)
        assert choose_format(n, n, nnz, 256, False, SIZE_FORMATS) == want
        assert choose_format(n, n, nnz, 256, False) == FMT_CSR
    with pytest.raises(ValueError, match="formats must be"):
        choose_format(n, n, 5, 256, False, (FMT_BITMAP, 7))
    nnz = int(0.17 * n * n)
    assert (
        factor_nbytes(FMT_BITMAP, n, n, nnz, 256, False)
        == 4 * (n * 16 + 1) + 4 * n * 128 + 4 * ((nnz * 8 + 31) // 32 + 1) + 4 * 257
    )


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 63), (3, 257), (2, 1031)])
def test_bitmap_encode_and_mask_invert(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    nz = torch.rand(rows, cols, generator=g) < 0.4
    nz[0] = False  # an empty row
    indptr, words = bitmap_encode(nz)
    assert torch.equal(bitmap_mask(words, rows, cols), nz)
    groups = -(-cols // BITMAP_GROUP)
    assert indptr.numel() == rows * groups + 1 and int(indptr[-1]) == int(nz.sum())
    counts = torch.nn.functional.pad(nz, (0, groups * BITMAP_GROUP - cols)).view(rows, groups, -1).sum(2).view(-1)
    assert torch.equal(indptr[1:] - indptr[:-1], counts.int())


# --- validation before any kernel ------------------------------------------------------------------------------------


def _bitmap_layer():
    x, b, n, r, facs = layer_case(3, 6, 40, 2, IDENTITY_NONE, (FMT_BITMAP, FMT_BITMAP, FMT_BITMAP), bits=2, density=0.6)
    return x, b, n, r, [[t.clone() if torch.is_tensor(t) else t for t in f] for f in facs]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f[2][4].__setitem__(1, -1), "bits set past column 40"),  # C [6, 40]: word 1 holds columns 32..39
        (lambda f: f[2][4].__setitem__(0, f[2][4][0] ^ 1), "indptr must count"),  # a bit flipped: counts disagree
        (lambda f: f[2][3].__setitem__(2, f[2][3][2] + 1), "indptr must count"),
        (lambda f: f[2].__setitem__(1, f[2][1][:-1]), "codes must hold"),
        (lambda f: (f[2].__setitem__(2, f[2][2][:4]), f[2][1].fill_(-1)), "codes past its 3 levels"),
        (lambda f: f[2].__setitem__(3, f[2][3][:-1]), "indptr must have"),
        (lambda f: f[2].__setitem__(4, f[2][4].short()), "must be int32"),
        (lambda f: f[2].__setitem__(4, f[2][4][:-1]), "indices must have"),
    ],
)
def test_corrupt_bitmap_is_refused(corrupt, message):
    """The op's reference (CPU) and atmc_decode check a bitmap factor's words, pointers and codes first."""
    x, b, n, r, facs = _bitmap_layer()
    corrupt(facs)
    with pytest.raises(ValueError, match=message):
        atmc_linear(x, b, n, r, IDENTITY_NONE, *(t for f in facs for t in f))
    with pytest.raises(ValueError, match=message):
        atmc_decode(facs[2][0], n, 40, *facs[2][1:])


# --- the kernels -----------------------------------------------------------------------------------------------------

# (M, N, K, bits, raw, density, BLOCK_K, SPLIT_K, seed): only C is a bitmap factor, so the split starts are exact
EXAMPLES = [
    (1, 7, 1, 3, False, 1.0, 16, 1, 0),  # K = 1, 3-bit codes straddling words, M = 1
    (7, 63, 257, 5, False, 0.3, 32, 3, 1),  # two groups, a partial last word, splits starting mid-group
    (16, 1, 1031, 8, False, 0.5, 64, 8, 2),  # K > 1000, one output row
    (17, 7, 63, 1, True, 1.0, 32, 2, 3),  # raw float32 values, every bit set
    (63, 7, 300, 7, False, 0.05, 32, 1, 4),  # large tiles (M > 32)
    (1, 63, 1000, 2, False, 0.3, 64, 5, 5),
]
EDGES = {"K = 1", "partial word", "several groups", "K > 1000", "M = 1", "M > 32", "raw", "straddling codes"}
EDGES |= {"split starts mid-group", "full words"}


def bitmap_edges(M, N, K, bits, raw, density, block_k, split_k, seed) -> set[str]:
    steps = -(-K // block_k)
    per = -(-steps // split_k)
    starts = [s * per * block_k for s in range(split_k) if s * per < steps] if M <= lt.SMALL_M else [0]
    e = {"K = 1"} if K == 1 else set()
    e |= {"partial word"} if K % 32 else set()
    e |= {"several groups"} if K > BITMAP_GROUP else set()
    e |= {"K > 1000"} if K > 1000 else set()
    e |= {"M = 1"} if M == 1 else {"M > 32"} if M > lt.SMALL_M else set()
    e |= {"raw"} if raw else {"straddling codes"} if 32 % bits else set()
    e |= {"split starts mid-group"} if any(s % BITMAP_GROUP for s in starts) else set()
    e |= {"full words"} if density == 1.0 and K >= 32 else set()
    return e


def test_bitmap_examples_reach_every_edge():
    """The explicit examples below reach every edge of the bitmap decode (so no edge depends on luck)."""
    assert set().union(*(bitmap_edges(*c) for c in EXAMPLES)) == EDGES


def _check(device, M, N, K, bits, raw, density, block_k, split_k, seed):
    x, b, n, r, facs = layer_case(
        M, N, K, 1, IDENTITY_NONE, (FMT_EMPTY, FMT_EMPTY, FMT_BITMAP), bits=bits, raw=raw, density=density,
        seed=seed, empty_rows=1, device=device,
    )  # fmt: skip
    assert facs[2][0] == FMT_BITMAP
    if M <= lt.SMALL_M:
        tile = {"BLOCK_N": 32, "BLOCK_K": block_k, "GROUP_M": 1, "SPLIT_K": split_k}
    else:
        tile = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 1, "GROUP_M": 1}
    got = run_kernel(x, b, n, r, IDENTITY_NONE, facs, {"tile": tile})
    assert_close(got, *oracle(x, b, n, r, IDENTITY_NONE, facs), torch.float32)
    again = run_kernel(x, b, n, r, IDENTITY_NONE, facs, {"tile": tile})
    assert torch.equal(got.view(torch.int32), again.view(torch.int32))  # the same bits every run


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=max(3, settings.default.max_examples // 4), deadline=None)
@given(
    M=st.sampled_from([1, 7, 16, 17, 40]),
    N=st.sampled_from([1, 7, 63]),
    K=st.sampled_from([1, 7, 63, 256, 257, 1000]),
    bits=st.integers(1, 8),
    raw=st.booleans(),
    density=st.sampled_from([0.05, 0.3, 1.0]),
    block_k=st.sampled_from([16, 32, 64]),
    split_k=st.sampled_from([1, 2, 3, 8]),
    seed=st.integers(0, 99),
)
@example(*EXAMPLES[0])
@example(*EXAMPLES[1])
@example(*EXAMPLES[2])
@example(*EXAMPLES[3])
@example(*EXAMPLES[4])
@example(*EXAMPLES[5])
def test_bitmap_tiles_match_the_reference(device, M, N, K, bits, raw, density, block_k, split_k, seed):
    _check(device, M, N, K, bits, raw, density, block_k, split_k, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("raw", [False, True])
def test_bitmap_decode_kernel_is_exact(device, raw):
    w = make_factor(37, 300, 0.4, 200, raw=raw, empty_rows=3, seed=11)
    enc = pack(w, raw, FMT_BITMAP, device)
    got = lt.decode_launch(lt._Factor(enc[0], 37, 300, *enc[1:]))
    assert torch.equal(got.cpu().view(torch.int32), w.view(torch.int32))
    half = lt.decode_launch(lt._Factor(enc[0], 37, 300, *enc[1:]), torch.float16)
    assert torch.equal(half.cpu(), w.half())


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_bitmap_kernel_guards_corrupt_data(device):
    """Second line of defence, pinned by value: codes past the codebook read its last level, and pointers
    that run past the code stream read nothing beyond it (the codebook is a prefix of a buffer of 1000s)."""
    K, n = 40, 6
    x, b, n, r, facs = layer_case(2, n, K, 1, IDENTITY_V, (FMT_BITMAP, FMT_EMPTY, FMT_BITMAP), bits=2, density=0.6)
    facs = [list(f) for f in facs]
    c = facs[2]
    assert c[2].numel() == 5  # 4 levels: 2-bit codes
    c[2] = torch.cat([c[2][:4], torch.full((8,), 1000.0)])[:4]  # 3 levels, still 2-bit codes: code 3 is past them
    c[1] = torch.full_like(c[1], -1)  # every code 3 -> slot 4, clamped to the last level
    c[3] = c[3] + torch.where(torch.arange(c[3].numel()) >= n - 1, 10**6, 0).int()  # the last row runs past the codes
    dense_c = torch.where(bitmap_mask(c[4], n, K), c[2][-1], 0.0).double()
    dense_c[n - 1] = 0.0  # ranks past the code stream: masked
    U = decode_factor_ref(facs[0][0], n, K, *facs[0][1:]).double()
    want = x.double() @ (U + dense_c).T + b.double()
    facs = [tuple(t.to(device) if torch.is_tensor(t) else t for t in f) for f in facs]
    x, b = x.to(device), b.to(device)
    got = run_kernel(x, b, n, r, IDENTITY_V, facs).cpu().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_bitmap_with_every_other_format_in_both_stages(device):
    """U and V bitmap (two stages), C CSR; identity on V; the split-K sum and CSR pass on top of bitmap tiles."""
    for M in (1, 5, 33):
        x, b, n, r, facs = layer_case(
            M, 40, 300, 6, IDENTITY_NONE, (FMT_BITMAP, FMT_BITMAP, FMT_CSR), bits=8, density=0.3
        )
        facs = [tuple(t.to(device) if torch.is_tensor(t) else t for t in f) for f in facs]
        x, b = x.to(device), b.to(device)
        assert_close(
            run_kernel(x, b, n, r, IDENTITY_NONE, facs), *oracle(x, b, n, r, IDENTITY_NONE, facs), torch.float32
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [3, 40])
def test_bitmap_tiles_with_the_codebook_in_registers(device, M):
    """``book_gather=True`` (split-K and large tiles): a bitmap's zeros read code 0, which is a level (slot 1),
    not the zero, so the gathered value must be masked; dense codes beside it read their own zero level."""
    fmts = (FMT_BITMAP, packed_format.FMT_DENSE, FMT_BITMAP)
    x, b, n, r, facs = layer_case(M, 40, 300, 6, IDENTITY_NONE, fmts, bits=4, density=0.3, device=device)
    assert tuple(f[0] for f in facs) == fmts
    got = run_kernel(x, b, n, r, IDENTITY_NONE, facs, {"book_gather": True})
    assert_close(got, *oracle(x, b, n, r, IDENTITY_NONE, facs), torch.float32)


def test_encode_refuses_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        encode_factor(torch.ones(2, 2), raw=False, fmt=7)


def test_model_charges_instruction_issue():
    """The roofline model bounds each packed call by the warp instructions its hot loops issue (SASS counts):
    a bitmap factor decodes every element, CSR only its nonzeros, so at 17 % density and M <= 16 the CSR
    layer is predicted faster although it moves 1.5x the bytes (why the bitmap is opt-in)."""
    from atmc_triton.kernels.lowrank_gemm import H100, ISSUE, issue_instructions, predicted_us

    n = 4096
    main, c = 2_850_000, 503_000  # 85 % / 15 % of ratio 0.05, b = 8
    fmt_bytes = {f: factor_nbytes(f, n, n, main, 256, False) for f in (FMT_CSR, FMT_BITMAP)}
    c_bytes = factor_nbytes(FMT_CSR, n, n, c, 256, False)
    for M in (1, 4, 16):
        csr = predicted_us("split_k", M, n, n, fmt_bytes[FMT_CSR] + c_bytes, main + c, 0)
        bitmap = predicted_us("split_k", M, n, n, fmt_bytes[FMT_BITMAP] + c_bytes, c, 0, bitmap_elems=n * n)
        assert csr < bitmap
        assert bitmap >= 1e6 * n * n * ISSUE["bitmap"][16] / H100["issue"]
    assert issue_instructions(40, 0, 0, 100) == pytest.approx(
        100 * min(2 * ISSUE["bitmap"][32], ISSUE["bitmap"][64], ISSUE["bitmap"][128])
    )  # (issue_instructions rounds to 6 decimals)
    assert issue_instructions(3, 10, 0) == pytest.approx(10 * ISSUE["csr"][4])  # the CSR kernel's BLOCK_M is pow2(M)


def test_model_counts_per_triton():
    """Triton 3.6's counts (torch 2.11's, the lent H200's) are used when asked; its dense tiles cost more than 3.8's
    (its CSR loop, since a thread owns whole nonzeros, about the same)."""
    from atmc_triton.kernels.lowrank_gemm import ISSUE, ISSUE_COUNTS, issue_instructions, predicted_us

    assert ISSUE is ISSUE_COUNTS["3.8"]
    assert issue_instructions(1, 10, 0, triton="3.6") == pytest.approx(10 * ISSUE_COUNTS["3.6"]["csr"][1])
    assert issue_instructions(16, 0, 100, triton="3.6") == pytest.approx(100 * ISSUE_COUNTS["3.6"]["dense"][16])
    args = ("split_k", 16, 4096, 4096, 10_000_000, 0, 4096 * 4096)  # dense-coded tiles, issue-bound
    assert predicted_us(*args, triton="3.6") > predicted_us(*args) == predicted_us(*args, triton="3.8")
    assert issue_instructions(16, 10, 0, triton="3.9") == pytest.approx(10 * ISSUE_COUNTS["3.9"]["csr"][16])
    with pytest.raises(ValueError, match=r"triton must be one of \['3.6', '3.8', '3.9'\], got '3.7'"):
        issue_instructions(1, 10, 0, triton="3.7")
