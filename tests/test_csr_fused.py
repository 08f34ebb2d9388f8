"""One CSR launch for the CSR factors of a stage that share an activation (issue 15, packed GEMM at small batch).

The usual identity-initialized layer has ``t = x`` (identity on V, V empty) or ``y = x V^T + x C^T`` (identity on
U, U empty), so its two ``[N, K]`` CSR factors multiply the same activation into the same output: the launcher
pairs them (``csr_groups``) and ``_csr_mm_kernel`` walks both (``HAS_SECOND``) into the same accumulators, writing
each output element once. Checked here against the float64 oracle and ``atmc_linear_ref`` in Triton's interpreter
(outputs poisoned with NaN: every element must be written), with the launches counted.
"""

import os

import pytest
import torch
from atmc_triton.kernels.lowrank_gemm import IDENTITY_NONE, IDENTITY_U, IDENTITY_V, atmc_linear_ref
from atmc_triton.kernels.packed_format import FMT_CSR, FMT_DENSE, FMT_EMPTY, code_width, encode_factor, pack_bits
from test_lowrank_gemm import _poison_outputs, assert_close, layer_case, make_factor, oracle, run_kernel  # noqa: F401

lt = pytest.importorskip("atmc_triton.kernels.lowrank_gemm_triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")

N, K = 37, 29  # odd sizes; identity on V: r = K, on U: r = N; C, U (or V) all [N, K]


@pytest.fixture
def csr_launches(monkeypatch):
    """The ``_csr_mm_kernel`` launches of a call: ``(grid, HAS_SECOND, WIDTH, WIDTH2, INIT)`` each; other kernels'
    names go to ``others``."""
    got = {"csr": [], "others": []}
    wrap = lt.wrap_triton

    def record(kernel):
        launch = wrap(kernel)
        if kernel is not lt._csr_mm_kernel:
            got["others"].append(getattr(kernel, "__name__", kernel))
            return launch

        class Grid:
            def __getitem__(self, grid):
                def run(**kw):
                    got["csr"].append((grid, kw["HAS_SECOND"], kw["WIDTH"], kw["WIDTH2"], kw["INIT"]))
                    return launch[grid](**kw)

                return run

        return Grid()

    monkeypatch.setattr(lt, "wrap_triton", record)
    return got


def identity_layer(M, identity, *, dtype=torch.float32, bias=True, bits=(4, 4), raw=(False, False), seed=0, **kw):
    """An identity-init layer, all CSR: ``(U, empty, C)`` with identity on V, ``(empty, V, C)`` with identity on U;
    the main factor (U or V) and C with their own code widths (``bits``, ``raw``)."""
    fmts = (FMT_CSR, FMT_EMPTY, FMT_CSR) if identity == IDENTITY_V else (FMT_EMPTY, FMT_CSR, FMT_CSR)
    x, b, n, r, facs = layer_case(M, N, K, 0, identity, fmts, bits=bits[1], raw=raw[1], dtype=dtype, seed=seed, **kw)
    main = 0 if identity == IDENTITY_V else 1
    w = make_factor(N, K, kw.get("density", 0.3), 2 ** bits[0], raw=raw[0], seed=seed * 7 + 11)
    facs[main] = encode_factor(w, raw[0], FMT_CSR)
    return x, (b.to(dtype) if bias else None), n, r, facs


def check(x, b, n, r, identity, facs, config=None):
    got = run_kernel(x, b, n, r, identity, facs, config)
    assert got.dtype == x.dtype
    assert_close(got, *oracle(x, b, n, r, identity, facs), torch.float32 if x.dtype == torch.float32 else x.dtype)
    ref = atmc_linear_ref(x, b, n, r, identity, *(t for f in facs for t in f))
    tol = 1e-5 if x.dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max().float()) + tol)
    return got


@pytest.mark.parametrize("M", [1, 7, 63])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("identity", [IDENTITY_V, IDENTITY_U])
def test_fused_launch_equals_the_reference(M, dtype, identity, csr_launches):
    for bias in (True, False):
        x, b, n, r, facs = identity_layer(M, identity, dtype=dtype, bias=bias, bits=(8, 4), seed=M)
        csr_launches["csr"].clear()
        csr_launches["others"].clear()
        check(x, b, n, r, identity, facs)
        # one CSR launch for both factors (M = 63: two 32-row blocks on grid axis 1), writing the output (INIT):
        # C first, then the main factor (8-bit codes) with its own width
        main = facs[0 if identity == IDENTITY_V else 1]
        widths = tuple(code_width(FMT_CSR, f[2].numel() - 1, False) for f in (facs[2], main))
        assert widths == (4, 8)
        assert [c[1:] for c in csr_launches["csr"]] == [(True, *widths, True)], csr_launches["csr"]
        # no tile / epilogue / fill launch: at M > 1 only csr_operand's padded x^T (one launch)
        assert csr_launches["others"] == (["_transpose_pad_kernel"] if M > 1 else []), csr_launches["others"]


def test_identity_init_layer_is_one_csr_launch_at_m1(csr_launches):
    """The launch count the prediction model charges: one kernel launch in all at ``M = 1`` (no zero fill, no
    ``csr_operand`` copy, no second pass), on either identity."""
    for identity in (IDENTITY_V, IDENTITY_U):
        csr_launches["csr"].clear()
        x, b, n, r, facs = identity_layer(1, identity, bits=(8, 8))
        check(x, b, n, r, identity, facs)
        assert len(csr_launches["csr"]) == 1 and csr_launches["csr"][0][1], csr_launches
        assert not csr_launches["others"]


@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize(
    "bits, raw",
    [((8, 3), (False, False)), ((5, 8), (False, False)), ((8, 8), (True, False)), ((2, 8), (False, True))],
)
def test_mixed_code_widths(M, bits, raw, csr_launches):
    """Each factor keeps its own width in the same launch: 8-bit byte codes with 4- or 6-bit ones, raw float32
    with 8-bit codes, either first."""
    x, b, n, r, facs = identity_layer(M, IDENTITY_V, bits=bits, raw=raw, seed=M + bits[0])
    check(x, b, n, r, IDENTITY_V, facs)
    widths = tuple(code_width(FMT_CSR, f[2].numel() - 1, f[2].numel() == 0) for f in (facs[2], facs[0]))
    assert [c[1:4] for c in csr_launches["csr"]] == [(True, *widths)]
    assert len(set(widths)) == 2


@pytest.mark.parametrize("M", [1, 7, 63])
def test_empty_rows_and_tail_only_factors(M, csr_launches):
    """Rows without nonzeros in either factor, and factors whose few nonzeros (< 4) are all in the kernel's tail."""
    x, b, n, r, facs = identity_layer(M, IDENTITY_V, empty_rows=20, bits=(8, 4), seed=3)
    check(x, b, n, r, IDENTITY_V, facs)
    for few in (1, 3, 5):  # 5: one whole group of 4 and a tail of 1
        for main_few in (True, False):
            w = torch.zeros(N, K)
            w.view(-1)[torch.randperm(N * K, generator=torch.Generator().manual_seed(few))[:few]] = 0.75
            x, b, n, r, facs = identity_layer(M, IDENTITY_V, bits=(8, 4), seed=few)
            facs[0 if main_few else 2] = encode_factor(w, False, FMT_CSR)
            check(x, b, n, r, IDENTITY_V, facs)
    assert all(c[1] for c in csr_launches["csr"])


def _zero_csr(rows, cols):
    """A CSR factor with no nonzeros (valid: ``encode_factor`` would make it ``FMT_EMPTY``)."""
    return (
        FMT_CSR,
        pack_bits(torch.zeros(0, dtype=torch.int64), 2),
        torch.tensor([0.0, 1.0]),
        torch.zeros(rows + 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int16),
    )


@pytest.mark.parametrize("M", [1, 7])
def test_one_factor_without_nonzeros(M, csr_launches):
    for which in (0, 2):  # the main factor, or C
        x, b, n, r, facs = identity_layer(M, IDENTITY_V, bits=(8, 4), seed=which)
        facs[which] = _zero_csr(N, K)
        check(x, b, n, r, IDENTITY_V, facs)
    assert [c[1] for c in csr_launches["csr"]] == [True, True]
    # an EMPTY factor is no product: C alone, one single-factor launch
    x, b, n, r, facs = identity_layer(M, IDENTITY_V, bits=(8, 4))
    facs[0] = encode_factor(torch.zeros(N, K), False)
    assert facs[0][0] == FMT_EMPTY
    csr_launches["csr"].clear()
    check(x, b, n, r, IDENTITY_V, facs)
    assert [c[1] for c in csr_launches["csr"]] == [False]


@pytest.mark.parametrize("M", [3, 100])
def test_fused_rows_past_the_grid_limit(M, csr_launches, monkeypatch):
    """With ``GRID_Y_MAX`` 2 row blocks, 100 rows (4 blocks of 32) run as two fused launches over row ranges."""
    monkeypatch.setattr(lt, "GRID_Y_MAX", 2)
    x, b, n, r, facs = identity_layer(M, IDENTITY_V, bits=(8, 4), seed=M)
    check(x, b, n, r, IDENTITY_V, facs)
    assert [c[1] for c in csr_launches["csr"]] == [True] * (1 if M == 3 else 2)
    assert all(c[0][1] <= 2 for c in csr_launches["csr"])


@pytest.mark.parametrize("M", [1, 7, 40])
def test_fused_launch_adds_into_a_written_output(M):
    """``init=False`` (a stage whose tile launch wrote first): ``out += x C^T + x U^T``, read-modify-write once."""
    _, _, _, _, facs = identity_layer(M, IDENTITY_V, bits=(8, 3), seed=5)
    f1, f2 = (lt._Factor(f[0], N, K, *f[1:]) for f in (facs[2], facs[0]))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    prev = torch.randn(M, N, generator=torch.Generator().manual_seed(M + 1))
    out = prev.clone()
    lt._csr_launch(out, lt.csr_operand(x), f1, M <= lt.SMALL_M, {"csr": lt.FIXED_CONFIG["csr"]}, second=f2)
    dense = [lt.atmc_decode_ref(f[0], N, K, *f[1:]).double() for f in (facs[2], facs[0])]
    want = prev.double() + x.double() @ (dense[0] + dense[1]).T
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_second_factor_must_be_csr_of_the_same_shape():
    _, _, _, _, facs = identity_layer(3, IDENTITY_V)
    f = lt._Factor(facs[2][0], N, K, *facs[2][1:])
    wrong = lt._Factor(facs[0][0], N, K - 1, *facs[0][1:])
    with pytest.raises(ValueError, match="second factor"):
        lt._csr_launch(torch.zeros(3, N), lt.csr_operand(torch.randn(3, K)), f, True, None, second=wrong)
    dense = encode_factor(make_factor(N, K, 0.3, 8), False, FMT_DENSE)
    with pytest.raises(ValueError, match="second factor"):
        lt._csr_launch(
            torch.zeros(3, N),
            lt.csr_operand(torch.randn(3, K)),
            f,
            True,
            None,
            second=lt._Factor(dense[0], N, K, *dense[1:]),
        )


def test_csr_groups_pair_factors_by_activation():
    x, t = torch.zeros(2, 3), torch.zeros(2, 3)
    a, b, c = object(), object(), object()
    assert lt.csr_groups([(x, a), (x, b)]) == [(x, a, b)]
    assert lt.csr_groups([(x, a), (t, b)]) == [(x, a, None), (t, b, None)]
    assert lt.csr_groups([(x, a), (t, b), (x, c)]) == [(x, a, c), (t, b, None)]
    assert lt.csr_groups([(x, a), (x, b), (x, c)]) == [(x, a, b), (x, c, None)]
    assert lt.csr_groups([]) == []


def test_different_activations_are_not_fused(csr_launches):
    """Identity on U with U stored: ``y = x C^T + t U^T + t`` has C on ``x`` and U on ``t``: two launches, and V's
    stage its own (3 in all), as before."""
    x, b, n, r, facs = layer_case(5, N, K, 0, IDENTITY_U, (FMT_CSR, FMT_CSR, FMT_CSR), bits=4)
    check(x, b, n, r, IDENTITY_U, facs)
    assert [c[1] for c in csr_launches["csr"]] == [False, False, False]
    csr_launches["csr"].clear()
    x, b, n, r, facs = layer_case(5, N, K, 6, IDENTITY_NONE, (FMT_CSR, FMT_CSR, FMT_CSR), bits=4)
    check(x, b, n, r, IDENTITY_NONE, facs)
    assert [c[1] for c in csr_launches["csr"]] == [False, False, False]
