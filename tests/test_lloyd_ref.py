"""The reference Lloyd quantizer: semantics, invariants and an independent brute-force oracle."""

import numpy as np
import pytest
import torch
from atmc_triton.kernels import NUM_SLOTS, lloyd_quantize, lloyd_quantize_ref
from atmc_triton.kernels.lloyd import errors_for_bits, errors_for_bits_ref
from helpers import segment
from hypothesis import given
from hypothesis import strategies as st


def brute_force_lloyd(x: np.ndarray, b: int, max_iter: int):
    """Dense-distance Lloyd in numpy with the documented init, pinned zero and tie rules (tol = 0)."""
    K = 2**b
    nz = np.sort(x[x != 0])
    m = nz.size
    if m <= K:
        return np.unique(nz), x.copy()
    free = nz[((2 * np.arange(K) + 1) * m) // (2 * K)].astype(np.float32)

    def assign(free):
        cents = np.sort(np.concatenate([free, [np.float32(0)]]))  # ascending: argmin picks the lower on ties
        d = (x[:, None].astype(np.float64) - cents[None, :].astype(np.float64)) ** 2
        return cents, d.argmin(1)

    prev = None
    for _ in range(max_iter):
        cents, a = assign(free)
        if prev is not None and np.array_equal(a, prev):
            break
        new = cents.copy()
        for j, c in enumerate(cents):
            members = x[a == j]
            if c != 0 and members.size:
                new[j] = np.float32(members.astype(np.float64).mean())
        free = new[cents != 0] if np.count_nonzero(cents == 0) == 1 else np.delete(new, np.where(cents == 0)[0][0])
        prev = a
    cents, a = assign(free)
    return np.sort(free), cents[a]


def run(values, offsets, bits, max_iter=20, tol=0.0, method="fast"):
    return lloyd_quantize_ref(
        torch.as_tensor(values, dtype=torch.float32),
        torch.as_tensor(offsets, dtype=torch.int64),
        torch.as_tensor(bits, dtype=torch.int32),
        max_iter,
        tol,
        method,
    )


@given(x=segment(), b=st.integers(1, 5), max_iter=st.sampled_from([0, 1, 3, 20]))
def test_matches_brute_force(x, b, max_iter):
    """The legacy method against an independent dense-distance Lloyd."""
    book, codes, q, err = run(x, [0, x.size], [b], max_iter, method="lloyd")
    centres, q_bf = brute_force_lloyd(x, b, max_iter)
    np.testing.assert_array_equal(q.numpy(), q_bf)
    used = book[0, 1 : 1 + centres.size].numpy()
    np.testing.assert_allclose(used, centres, rtol=1e-6)
    np.testing.assert_allclose(float(err[0]), float(((x.astype(np.float64) - q_bf) ** 2).sum()), rtol=1e-5, atol=1e-6)


@given(xs=st.lists(segment(max_len=200), min_size=1, max_size=6), data=st.data())
def test_invariants(xs, data):
    bits = [data.draw(st.integers(1, 8)) for _ in xs]
    offsets = np.cumsum([0] + [x.size for x in xs])
    values = np.concatenate(xs) if xs else np.zeros(0, np.float32)
    book, codes, q, err = run(values, offsets, bits)
    assert book.shape == (len(xs), NUM_SLOTS) and codes.dtype == torch.int16
    assert torch.all(book[:, 0] == 0)
    for s, x in enumerate(xs):
        a, e = offsets[s], offsets[s + 1]
        qs, cs = q[a:e], codes[a:e].long()
        assert torch.equal(qs, book[s][cs])  # codes decode to q
        zero = torch.from_numpy(x) == 0
        assert torch.all(qs[zero] == 0) and torch.all(cs[zero] == 0)  # zeros stay zero
        assert torch.unique(qs).numel() <= 2 ** bits[s] + 1
        assert torch.all(cs <= 2 ** bits[s])
        if np.unique(x[x != 0]).size <= 2 ** bits[s]:  # kept exactly (<= 2^b distinct nonzeros)
            assert torch.equal(qs, torch.from_numpy(x)) and float(err[s]) == 0.0
        direct = float(((torch.from_numpy(x).double() - qs.double()) ** 2).sum())
        assert float(err[s]) == pytest.approx(direct, rel=1e-5, abs=1e-6)


@given(x=segment(max_len=400), b=st.integers(1, 6))
def test_error_never_increases_across_iterations(x, b):
    errs = [float(run(x, [0, x.size], [b], t)[3][0]) for t in range(0, 12)]
    for before, after in zip(errs, errs[1:]):
        assert after <= before * (1 + 1e-9) + 1e-12, errs


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1000])  # 2^b - 1, 2^b, 2^b + 1 for b = 2
def test_boundary_lengths(n):
    x = torch.arange(1, n + 1, dtype=torch.float32) * 0.37 - 0.1 * n
    book, codes, q, err = run(x, [0, n], [2])
    nnz = int((x != 0).sum())
    if nnz <= 4:
        assert torch.equal(q, x)
    else:
        assert torch.unique(q).numel() <= 5 and float(err[0]) > 0


def test_all_zero_and_constant_segments():
    x = torch.cat([torch.zeros(50), torch.full((50,), 0.5), torch.tensor([1.0, -1.0] * 20)])
    book, codes, q, err = run(x, [0, 50, 100, 140], [3, 1, 1])
    assert torch.all(q[:50] == 0) and float(err[0]) == 0
    assert torch.all(q[50:100] == 0.5) and float(err[1]) == 0  # duplicates: one level
    assert set(q[100:].tolist()) == {1.0, -1.0} and float(err[2]) == 0


def test_empty_cluster_keeps_its_centre():
    # two tight groups, 4 free centres: two centres start inside one group, one ends empty
    x = torch.tensor([1.0] * 30 + [1.0001] * 30 + [5.0] * 40)
    book, codes, q, err = run(x, [0, 100], [2])
    assert torch.unique(q).numel() <= 4 and float(err[0]) < 1e-5


def test_tolerance_stops_early():
    x = torch.randn(5000)
    e_loose = float(run(x, [0, 5000], [4], 50, tol=0.5)[3][0])
    e_tight = float(run(x, [0, 5000], [4], 50, tol=0.0)[3][0])
    assert e_tight < e_loose


def test_op_dispatches_to_reference_on_cpu():
    x = torch.randn(300)
    args = (x, torch.tensor([0, 100, 300]), torch.tensor([3, 5], dtype=torch.int32), 20, 1e-5)
    for a, b in zip(lloyd_quantize(*args), lloyd_quantize_ref(*args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "values, offsets, bits, needle",
    [
        (torch.zeros(4, dtype=torch.float64), [0, 4], [2], "float32"),
        (torch.zeros(4), [0, 3], [2], "offsets"),
        (torch.zeros(4), [0, 2, 4], [2], "bits"),
        (torch.zeros(4), [0, 4], [9], "bits"),
        (torch.zeros(4), [0, 4], [0], "bits"),
        (torch.zeros(4), [0, 5, 4], [1, 1], "offsets"),
    ],
)
def test_bad_inputs(values, offsets, bits, needle):
    with pytest.raises(ValueError, match=needle):
        lloyd_quantize_ref(values, torch.tensor(offsets), torch.tensor(bits, dtype=torch.int32), 20, 0.0)


@given(xs=st.lists(segment(max_len=300), min_size=1, max_size=4), tol=st.sampled_from([0.0, 1e-4]))
def test_errors_for_bits_columns_are_the_quantizer_errors(xs, tol):
    offsets = np.cumsum([0] + [x.size for x in xs])
    values = torch.from_numpy(np.concatenate(xs))
    table = errors_for_bits_ref(values, torch.from_numpy(offsets), 20, tol)
    assert table.shape == (len(xs), 8) and table.dtype == torch.float32
    for b in range(1, 9):
        assert torch.equal(table[:, b - 1], run(values, offsets, [b] * len(xs), 20, tol)[3])
    assert torch.equal(errors_for_bits(values, torch.from_numpy(offsets), 20, tol), table)  # CPU op = reference


def test_errors_for_bits_rejects_bad_inputs():
    with pytest.raises(ValueError, match="offsets"):
        errors_for_bits_ref(torch.zeros(4), torch.tensor([0, 3]), 20, 0.0)
    with pytest.raises(ValueError, match="tol"):
        errors_for_bits_ref(torch.zeros(4), torch.tensor([0, 4]), 20, -1.0)


@pytest.mark.parametrize("case", ["plain", "duplicate_mids", "far_outlier_mid", "few_mids"])
def test_cpu_bucketing_equals_torch_bucketize(case):
    """The CPU lookup-table bucketing of the codes pass equals ``torch.bucketize`` exactly (ties, values past
    both ends, neighbours one ulp above a midpoint, many equal midpoints that force the fallback)."""
    from atmc_triton.kernels.lloyd import _bucket

    g = torch.Generator().manual_seed(len(case))
    M = {"few_mids": 2}.get(case, 200)
    mids = torch.sort(torch.randn(M, generator=g))[0]
    if case == "duplicate_mids":
        mids[M // 2 :] = mids[M // 2]
    if case == "far_outlier_mid":
        mids[-1] = 1e3
    x = torch.randn(20000, generator=g) * 2
    x[:500] = mids[torch.randint(0, M, (500,), generator=g)]  # exact ties go to the lower bucket
    x[500:600] = torch.nextafter(x[:100], torch.full((100,), float("inf")))
    x[600:700], x[700:800], x[800:900] = 0.0, 1e4, -1e4
    assert torch.equal(_bucket(x, mids), torch.bucketize(x, mids, out_int32=True))


def _fit_item(x: torch.Tensor):
    s = torch.sort(x[x != 0])[0]
    return s, torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s.double(), 0)]), s.double().square().sum()


@pytest.mark.parametrize("max_iter,tol", [(0, 0.0), (3, 0.0), (20, 1e-5), (20, 1e-2), (60, 0.0)])
def test_batched_fits_equal_one_segment_fits(max_iter, tol):
    """``_fits`` runs ragged segments side by side in numpy (padded to the most centres); each must equal
    ``_fit`` alone: centres, zero slot and error bit for bit.
    The batch mixes sizes 7..5000, 1..256 free centres, one-sided and tied segments, an exact fit (error
    0, the directly summed fallback), a NaN segment (not batched) and rows that stop at different steps."""
    import atmc_triton.kernels.lloyd as L

    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(7, generator=g),
        torch.randn(63, generator=g).abs() + 0.1,  # one-sided: the zero is slot 0
        torch.randn(1000, generator=g) ** 3,
        torch.distributions.Laplace(0.0, 1.0).sample((5000,)),
        -torch.rand(300, generator=g) - 0.5,  # all negative: the zero is the last slot
        torch.tensor([-1.13, 0.37, 2.71]).repeat(200),  # ties, fitted exactly (total - gain: -2e-13)
        torch.randn(2000, generator=g),
        torch.cat([torch.randn(50, generator=g), torch.tensor([float("nan")])]),
    ]
    items = [_fit_item(x) for x in xs]
    frees = []
    for (s, _, _), F in zip(items, (3, 1, 16, 256, 5, 3, 40, 4)):
        pick = torch.randperm(s.numel(), generator=g)[:F] if F != 3 or s.numel() != 600 else None
        frees.append(torch.unique(s) if pick is None else torch.unique(s[pick]))
    # huge values: the error is all rounding noise of total - gain, and the tol stop follows its bits
    huge = torch.tensor([-3.4e38, 1.0, 3.3e38, 3.4e38]).repeat_interleave(torch.tensor([83, 91, 62, 74]))
    items.append(_fit_item(huge))
    frees.append(L._quantile_init(items[-1][0], 16))
    got = L._fits(items, frees, max_iter, tol)
    for item, free, (c, nneg, err) in zip(items, frees, got):
        ref_c, ref_nneg, ref_err = L._fit(*item, free, max_iter, tol)
        torch.testing.assert_close(c, ref_c, rtol=0, atol=0, equal_nan=True)  # bit for bit
        assert nneg == ref_nneg
        torch.testing.assert_close(err, ref_err, rtol=0, atol=0, equal_nan=True)
    assert float(got[5][2]) == 0.0 and bool(got[7][2].isnan())
    if max_iter == 60:  # the finite rows froze at different steps (rows still moving while others are done)
        stops = set()
        for it, f, (c, *_) in list(zip(items, frees, got))[:7]:
            stops.add(next(k for k in range(61) if torch.equal(L._fit(*it, f, k, tol)[0], c)))
        assert len(stops) >= 4, stops


def test_round_down_midpoints_is_the_largest_float32_at_or_below_the_midpoint():
    """For float32 ``x``, ``x <= (a + b) / 2`` exactly when ``x <= mid``: ``mid`` is at or below the exact
    midpoint and the next float32 up is above it; rows of a 2-D input are midpoints of their own."""
    from atmc_triton.kernels.lloyd import round_down_midpoints

    g = torch.Generator().manual_seed(11)
    c = torch.sort(torch.randn(64, 33, generator=g) * 10.0 ** torch.randint(-3, 4, (64, 1), generator=g), 1)[0]
    mid = round_down_midpoints(c)  # [64, 32]
    exact = (c[:, :-1].double() + c[:, 1:].double()) / 2
    up = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    assert mid.dtype == torch.float32 and bool((mid.double() <= exact).all()) and bool((up.double() > exact).all())
    assert bool((mid.double() < exact).any())  # the rounding-down case is reached
    assert torch.equal(mid[5], round_down_midpoints(c[5]))
