"""The fast quantizer's windowed-DP refinement (``kernels/lloyd_window.py``)."""

import numpy as np
import pytest
from atmc_triton.kernels.lloyd_optimal import dp_partition
from atmc_triton.kernels.lloyd_window import compand_init, refine_partition
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
