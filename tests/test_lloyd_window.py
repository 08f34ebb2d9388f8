"""The fast quantizer's windowed-DP refinement (``kernels/lloyd_window.py``)."""

import collections

import numpy as np
import pytest
from atmc_triton.kernels.lloyd_optimal import dp_partition
from atmc_triton.kernels.lloyd_window import _candidates, _pass, compand_init, refine_partition
from hypothesis import example, given, settings
from hypothesis import strategies as st


def problem(s: np.ndarray, K: int, seed: int):
    """Prefix stats over every position of ascending nonzeros ``s`` and a random valid start partition."""
    s64 = s.astype(np.float64)
    C, P1, P2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones(s.size), s64, s64 * s64))
    m, za = s.size, int(np.searchsorted(s, 0.0))
    rng = np.random.default_rng(seed)
    zc = int(rng.integers(0, K + 1))
    inner = np.sort(rng.integers(0, m + 1, K))
    inner[:zc] = np.minimum(inner[:zc], za)
    inner[zc:] = np.maximum(inner[zc:], za)
    B = np.concatenate([[0], np.sort(inner), [m]])
    return C, P1, P2, za, B, zc


def cost(s: np.ndarray, B: np.ndarray, zc: int) -> float:
    s64, tot = s.astype(np.float64), 0.0
    for t in range(B.size - 1):
        v = s64[B[t] : B[t + 1]]
        tot += float((v**2).sum()) if t == zc else float(((v - v.mean()) ** 2).sum()) if v.size else 0.0
    return tot


values = st.lists(st.integers(-40, 40).filter(bool), min_size=1, max_size=30).map(
    lambda v: np.sort(np.array(v, np.float32) / 8)
)


@settings(max_examples=60, deadline=None)
@given(s=values, K=st.integers(1, 6), seed=st.integers(0, 2**16))
@example(s=np.array([-2.0, -1.9, 0.5, 3.0, 3.1, 3.2], np.float32), K=2, seed=0)
@example(s=np.array([1.0] * 5, np.float32), K=1, seed=1)  # all equal, one-sided
@example(s=np.array([-3.0, -2.0, -1.0], np.float32), K=3, seed=2)  # negatives only
def test_a_window_covering_everything_is_the_exact_dp(s, K, seed):
    """With the local window as wide as the segment, one Viterbi pass is the exact optimum (any start)."""
    C, P1, P2, za, B, zc = problem(s, K, seed)
    m = s.size
    Bn, zn, _ = refine_partition(C[None], P1[None], P2[None], np.array([m]), np.array([za]), B[None], np.array([zc]), m)
    assert Bn[0, 0] == 0 and Bn[0, -1] == m and np.all(np.diff(Bn[0]) >= 0)
    assert Bn[0, zn[0]] <= za <= Bn[0, zn[0] + 1]  # the zero cluster holds the sign change
    want = dp_partition(s, K)[2]
    assert cost(s, Bn[0], int(zn[0])) == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(s=values, K=st.integers(1, 6), seed=st.integers(0, 2**16), W=st.integers(1, 3))
def test_passes_never_increase_the_cost_and_batches_are_independent(s, K, seed, W):
    """A narrow window: never worse than the start, and a problem's result does not depend on its batch."""
    C, P1, P2, za, B, zc = problem(s, K, seed)
    m = s.size
    alone = refine_partition(C[None], P1[None], P2[None], np.array([m]), np.array([za]), B[None], np.array([zc]), W)
    assert cost(s, alone[0][0], int(alone[1][0])) <= cost(s, B, zc) * (1 + 1e-12) + 1e-12
    # side by side with a longer problem (this one padded past its end)
    s2 = np.sort(np.random.default_rng(seed).standard_normal(m + 17).astype(np.float32))
    C2, Q1, Q2, za2, B2, zc2 = problem(s2, K, seed + 1)
    pad = [np.concatenate([v, np.full(17, v[-1])]) for v in (C, P1, P2)]
    both = refine_partition(
        np.stack([pad[0], C2]), np.stack([pad[1], Q1]), np.stack([pad[2], Q2]), np.array([m, m + 17]),
        np.array([za, za2]), np.stack([B, B2]), np.array([zc, zc2]), W,
    )  # fmt: skip
    assert np.array_equal(both[0][0], alone[0][0]) and both[1][0] == alone[1][0]


def test_compand_init_is_ascending_and_within_the_range():
    s = np.sort(np.random.default_rng(0).standard_t(3, 5000).astype(np.float32))
    c = compand_init(s, 64, 1024)
    assert c.shape == (64,) and np.all(np.diff(c) >= 0) and s[0] <= c[0] and c[-1] <= s[-1]
    tail = np.mean(np.abs(c) > 2.0) - np.mean(np.abs(s) > 2.0)
    assert tail > 0.05  # density^(1/3): more centres in the tails than the data's share


def plain_pass(C, P1, P2, za, win, seen):
    """``_pass`` as first written (a temporary per operation, a second reduction for the minimum): the oracle
    of its exact arithmetic, which the Triton kernel reproduces. Records the edges it meets in ``seen``."""
    S, T, NC = win.shape
    rows = np.arange(S)[:, None]
    Cw, S1w, S2w = (X[rows[:, :, None], win] for X in (C, P1, P2))
    V0, V1 = np.zeros((S, NC)), np.full((S, NC), np.inf)
    A0, A1, Z = np.zeros((S, T, NC), int), np.zeros((S, T, NC), int), np.zeros((S, T, NC), bool)
    zc, lo, hi = za[:, None, None], win.min(2), win.max(2)

    def reduce(c):
        m = c.min(2)
        seen.update({"tie at a minimum"} if ((c == m[:, :, None]).sum(2)[np.isfinite(m)] > 1).any() else set())
        return c.argmin(2), m

    for t in range(T - 1):
        a, b = win[:, t][:, None, :], win[:, t + 1][:, :, None]
        n = Cw[:, t + 1][:, :, None] - Cw[:, t][:, None, :]
        s1 = S1w[:, t + 1][:, :, None] - S1w[:, t][:, None, :]
        s2 = S2w[:, t + 1][:, :, None] - S2w[:, t][:, None, :]
        bad = np.where(a <= b, 0.0, np.inf)
        free = np.maximum(s2 - s1 * s1 / np.maximum(n, 1.0), 0.0) + bad
        seen.update({"NaN where a > b"} if (np.isnan(free) & (a > b)).any() else set())
        need0 = bool(np.any(lo[:, t + 1] <= za))
        if need0:
            A0[:, t + 1], v0 = reduce(V0[:, None, :] + free)
        if np.any((lo[:, t] <= za) & (za <= hi[:, t + 1])):
            zero = s2 + np.where((a <= zc) & (zc <= b), bad, np.inf)
            a1, V1 = reduce(np.concatenate([V1[:, None, :] + free, V0[:, None, :] + zero], 2))
            A1[:, t + 1], Z[:, t + 1] = a1 % NC, a1 >= NC
        elif np.isfinite(V1).any():
            A1[:, t + 1], V1 = reduce(V1[:, None, :] + free)
        V0 = v0 if need0 else np.full((S, NC), np.inf)
    x, flag = V1.argmin(1), np.ones(S, bool)
    cost, B, zero_at = V1[rows[:, 0], x], np.zeros((S, T), int), np.zeros(S, int)
    for t in range(T - 1, 0, -1):
        B[:, t] = win[rows[:, 0], t, x]
        z_here = flag & Z[rows[:, 0], t, x]
        zero_at = np.where(z_here, t - 1, zero_at)
        x = np.where(flag, A1[rows[:, 0], t, x], A0[rows[:, 0], t, x])
        flag &= ~z_here
    return B, zero_at, cost


reached = collections.Counter()  # edges met by the test below (read by the test after it)
EDGES = {"counts rise", "counts flat (empty atoms)", "tie at a minimum", "NaN where a > b"}
tied = st.lists(st.integers(-6, 6).filter(bool), min_size=1, max_size=60).map(lambda v: np.sort(np.array(v) / 4))


@settings(max_examples=80, deadline=None)
@given(s=st.one_of(values, tied), K=st.integers(1, 9), seed=st.integers(0, 2**16), W=st.integers(1, 4),
       empty=st.booleans(), nan_in=st.sampled_from([None, 1, 2]))  # fmt: skip
@example(s=np.array([-1.7, -1.5, -1.4, -1.1, -0.8, -0.7, -0.4, 0.05, 0.2, 0.3, 1.2]), K=5, seed=36, W=4, empty=False,
         nan_in=1)  # fmt: skip  # a NaN inside P1 that an a > b pair's argmin must see
@example(s=np.array([-1.0, -0.5, -0.5, 0.25, 0.25, 0.25, 1.0] * 3), K=4, seed=1, W=2, empty=True, nan_in=None)
@example(s=np.array([-3.0, -2.0, -1.0]), K=3, seed=2, W=1, empty=False, nan_in=None)  # negatives only
def test_pass_is_the_plain_formulation_bit_for_bit(s, K, seed, W, empty, nan_in):
    """``_pass`` (buffers, masks, the minimum read at the argmin) gives the plain formulation's boundaries, zero
    cluster and cost bit for bit: ties to the first minimum, NaN wherever it propagated, on rising and flat counts."""
    C, P1, P2, za, B, zc = problem(s, K, seed)
    rng = np.random.default_rng(seed)
    if empty:  # repeat some atom boundaries: empty atoms, counts that do not rise strictly
        idx = np.sort(np.concatenate([np.arange(C.size), rng.integers(0, C.size, 3)]))
        C, P1, P2, B, za = C[idx], P1[idx], P2[idx], np.searchsorted(idx, B), int(np.searchsorted(idx, za))
    if nan_in:  # a NaN inside a prefix array (a NaN value would sit at the end of the sorted values)
        (P1, P2)[nan_in - 1][rng.integers(1, C.size)] = np.nan
    G = np.array([C.size - 1])
    win = _candidates(B[None], G, W)
    seen = {"counts rise" if np.all(np.diff(C) > 0) else "counts flat (empty atoms)"}
    with np.errstate(all="ignore"):
        got, want = (
            _pass(C[None], P1[None], P2[None], np.array([za]), win),
            plain_pass(C[None], P1[None], P2[None], np.array([za]), win, seen),
        )
    reached.update(seen | {"cases"})
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), "boundaries or zero cluster differ"
    assert np.array_equal(got[2], want[2], equal_nan=True) and got[2].dtype == want[2].dtype
    assert got[2].view(np.int64)[0] == want[2].view(np.int64)[0] or np.isnan(want[2][0]), "cost bits differ"


def test_plain_formulation_cases_reach_every_edge():
    """The test above met each edge (rising and flat counts, a tie at a step's minimum, a NaN at an a > b pair)."""
    if not reached["cases"]:  # run alone (-k): draw the test's cases here
        test_pass_is_the_plain_formulation_bit_for_bit()
    assert EDGES <= set(reached), f"edges not reached: {EDGES - set(reached)}"


@pytest.mark.parametrize("empty", [False, True])
def test_pass_is_the_plain_formulation_on_a_batch(empty):
    """Problems of different sizes side by side, padded as ``_fast_inits`` pads them (the flat gather's row
    offsets, one ``rising`` flag for all rows; ``empty``: one row with empty atoms turns it off)."""
    rng = np.random.default_rng(7)
    probs = []
    for n, seed in ((40, 1), (200, 2), (13, 3), (90, 4)):
        s = np.sort(rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
        probs.append(problem(s[s != 0], 5, seed))
    if empty:  # row 2: two atom boundaries repeated
        C, P1, P2, za, B, zc = probs[2]
        idx = np.sort(np.concatenate([np.arange(C.size), [3, 7]]))
        probs[2] = (C[idx], P1[idx], P2[idx], int(np.searchsorted(idx, za)), np.searchsorted(idx, B), zc)
    Gmax = max(p[0].size for p in probs)
    C, P1, P2 = (np.stack([np.append(p[i], np.full(Gmax - p[i].size, p[i][-1])) for p in probs]) for i in range(3))
    za, G = np.array([p[3] for p in probs]), np.array([p[0].size - 1 for p in probs])
    win = _candidates(np.stack([p[4] for p in probs]), G, 3)
    got, want = _pass(C, P1, P2, za, win), plain_pass(C, P1, P2, za, win, set())
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(got[2].view(np.int64), want[2].view(np.int64))


def test_refine_partition_rejects_bad_prefix_arrays():
    """Prefix arrays of another dtype or of unequal shapes are refused with a message, not misread."""
    C, P1, P2, za, B, zc = problem(np.array([-2.0, -1.0, 1.0, 3.0], np.float32), 2, 0)
    args = (np.array([4]), np.array([za]), B[None], np.array([zc]))
    with pytest.raises(TypeError, match="C, P1, P2 must be float64"):
        refine_partition(C[None].astype(np.float32), P1[None], P2[None], *args)
    with pytest.raises(ValueError, match=r"\[S, Gmax \+ 1\]"):
        refine_partition(C[None], P1[None, :-1], P2[None], *args)
    with pytest.raises(ValueError, match=r"\[S, Gmax \+ 1\]"):
        refine_partition(C, P1, P2, *args)  # 1-D
