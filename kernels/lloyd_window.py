"""The fast quantizer's init: a windowed dynamic program that refines a partition (numpy, batched).

A codebook of ``K`` free centres plus the pinned zero partitions the sorted nonzeros into
``K + 1`` runs: cluster ``t`` is ``[B[t], B[t+1])`` (positions on an *atom* grid, runs of the
sorted values that never split equal ones), ``B[0] = 0``, ``B[K+1] = G``. Exactly one cluster
is the zero cluster (cost: its raw sum of squares; it must contain the sign change ``za``);
the others cost their SSE about their mean. The exact optimum is a ``K``-layer DP over all
``G`` positions (:mod:`.lloyd_optimal`, O(K G log G)); here every boundary ``B[t]`` only
chooses among ``NC = 2 (2 W + 1)`` *candidates* per pass:

* ``2 W + 1`` atoms around its current position (fine moves), and
* ``2 W + 1`` points spread evenly over ``[min(B[t-1], B[t]-W), max(B[t+1], B[t]+W)]``
  (moves of up to a whole neighbouring cluster).

The best choice of all boundaries at once is a chain (Viterbi) DP over the ``K + 1`` clusters
with ``NC`` states per boundary plus one flag (zero cluster passed or not, so the zero cluster
may become any cluster): O(K NC^2) per pass, whatever the segment's size. Every boundary's
current position is a candidate, so a pass never increases the DP cost; passes repeat until
nothing moves (or ``max_passes``). Unlike Lloyd, one pass can shift every boundary by up to a
cluster, which moves centres between distant parts of the distribution (Lloyd moves them one
cluster per iteration, which is why its midpoint-quantile init stays far from the optimum at
high ``b``). Many independent problems (segments) with the same ``K`` run side by side.
"""

from __future__ import annotations

import numpy as np

__all__ = ["compand_init", "refine_partition"]


def compand_init(s: np.ndarray, K: int, grid: int) -> np.ndarray:
    """``K`` ascending free centres (float64) spread like the high-rate optimum (density^(1/3)).

    ``s [m]``: ascending nonzeros. The density is estimated on ``min(m, grid)`` equal-count
    atoms; 10 % of the mass follows the counts (so ties and point masses get centres).
    """
    m = s.size
    b = np.unique((np.arange(min(m, grid) + 1) * m) // min(m, grid))
    lo, hi = b[:-1], b[1:]
    cnt = (hi - lo).astype(np.float64)
    x0 = s[lo].astype(np.float64)
    w = np.maximum(np.append(s[lo[1:]].astype(np.float64), float(s[-1])) - x0, 0.0)
    mass = np.cbrt(cnt) * w ** (2.0 / 3.0)
    mass = 0.9 * mass / mass.sum() + 0.1 * cnt / m if mass.sum() > 0 else cnt / m
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    t = (np.arange(K) + 0.5) / K * cum[-1]
    i = np.clip(np.searchsorted(cum, t, side="right") - 1, 0, lo.size - 1)
    frac = np.clip((t - cum[i]) / np.maximum(mass[i], 1e-300), 0.0, 1.0)
    return x0[i] + frac * w[i]


def _candidates(B: np.ndarray, G: np.ndarray, W: int) -> np.ndarray:
    """``[S, T, NC]`` candidate positions of every boundary (the ends pinned to 0 and G)."""
    off = np.arange(-W, W + 1)
    Gc = G[:, None, None]
    local = np.clip(B[:, :, None] + off, 0, Gc)
    prev = np.concatenate([B[:, :1], B[:, :-2], B[:, -1:]], 1)  # neighbours (ends: themselves)
    nxt = np.concatenate([B[:, :1], B[:, 2:], B[:, -1:]], 1)
    lo = np.clip(np.minimum(prev, B - W), 0, None)[:, :, None]
    hi = np.minimum(np.maximum(nxt, B + W)[:, :, None], Gc)
    spread = np.rint(lo + (off + W) / (2 * W) * (hi - lo)).astype(np.int64)
    win = np.concatenate([local, spread], 2)
    win[:, 0] = 0
    win[:, -1] = G[:, None]
    return win


def _pass(
    C: np.ndarray, P1: np.ndarray, P2: np.ndarray, za: np.ndarray, win: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Viterbi pass over the candidates ``win [S, T, NC]``: best boundaries ``[S, T]``, zero cluster
    and cost ``[S]``.

    Cost matrices are laid out ``[S, next candidate, previous candidate]`` (reductions on the last axis).
    """
    S, T, NC = win.shape
    rows = np.arange(S)[:, None]
    Cw, S1w, S2w = (X[rows[:, :, None], win] for X in (C, P1, P2))  # [S, T, NC] each
    V0 = np.zeros((S, NC))  # best cost with the zero cluster not yet placed
    V1 = np.full((S, NC), np.inf)  # ... and already placed
    A0 = np.zeros((S, T, NC), np.int32)
    A1 = np.zeros((S, T, NC), np.int32)
    Z = np.zeros((S, T, NC), bool)
    zc = za[:, None, None]
    lo_t, hi_t = win.min(2), win.max(2)  # [S, T]
    for t in range(T - 1):
        a, b = win[:, t][:, None, :], win[:, t + 1][:, :, None]  # [S, 1, NC] previous, [S, NC, 1] next
        n = Cw[:, t + 1][:, :, None] - Cw[:, t][:, None, :]  # [S, NC, NC]
        s1 = S1w[:, t + 1][:, :, None] - S1w[:, t][:, None, :]
        s2 = S2w[:, t + 1][:, :, None] - S2w[:, t][:, None, :]
        bad = np.where(a <= b, 0.0, np.inf)  # a boundary before its predecessor
        free = np.maximum(s2 - s1 * s1 / np.maximum(n, 1.0), 0.0) + bad  # (n = 0 has s1 = 0)
        # V0 matters while the zero cluster may still start (a candidate at or before za); V1 once it may exist
        need0 = bool(np.any(lo_t[:, t + 1] <= za))
        if need0:
            c0 = V0[:, None, :] + free
            A0[:, t + 1] = c0.argmin(2)  # [S, NC]
        if np.any((lo_t[:, t] <= za) & (za <= hi_t[:, t + 1])):  # cluster t may be the zero cluster
            zero = s2 + np.where((a <= zc) & (zc <= b), bad, np.inf)  # it holds the sign change
            c1 = np.concatenate([V1[:, None, :] + free, V0[:, None, :] + zero], 2)  # [S, NC, 2 NC]
            a1 = c1.argmin(2)
            use_z = a1 >= NC
            A1[:, t + 1], Z[:, t + 1] = a1 - NC * use_z, use_z
            V1 = c1.min(2)
        elif np.isfinite(V1).any():
            c1 = V1[:, None, :] + free
            A1[:, t + 1] = c1.argmin(2)
            V1 = c1.min(2)
        V0 = c0.min(2) if need0 else np.full((S, NC), np.inf)
    x = V1.argmin(1)  # every last candidate is G
    cost = V1[rows[:, 0], x]
    flag = np.ones(S, bool)
    B = np.empty((S, T), np.int64)
    zero_at = np.zeros(S, np.int64)
    for t in range(T - 1, 0, -1):
        B[:, t] = win[rows[:, 0], t, x]
        z_here = flag & Z[rows[:, 0], t, x]
        zero_at = np.where(z_here, t - 1, zero_at)
        x = np.where(flag, A1[rows[:, 0], t, x], A0[rows[:, 0], t, x])
        flag = flag & ~z_here
    B[:, 0] = 0
    return B, zero_at, cost


def refine_partition(
    C: np.ndarray,
    P1: np.ndarray,
    P2: np.ndarray,
    G: np.ndarray,
    za: np.ndarray,
    B: np.ndarray,
    zc: np.ndarray,
    W: int = 6,
    max_passes: int = 32,
    rtol: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Refine ``S`` partitions side by side (see the module docstring).

    Args:
        C, P1, P2: ``[S, Gmax + 1]`` float64 counts, sums and sums of squares of the sorted
            nonzeros before each atom boundary (rows padded past their ``G`` with the last value).
        G: ``[S]`` atoms per problem; za: ``[S]`` the atom boundary at the sign change.
        B: ``[S, K + 2]`` int64 ascending boundaries, ``B[:, 0] = 0``, ``B[:, -1] = G``;
            zc: ``[S]`` the zero cluster's index (``B[zc] <= za <= B[zc + 1]``).
        W: half window; max_passes: cap on the passes; rtol: a problem stops once a pass
            lowers its cost by at most ``rtol`` times the cost (0: once nothing moves).
    Returns:
        Refined ``B`` and ``zc`` and the number of passes run.

    Example:
        >>> s = np.array([-2.0, -1.9, 0.5, 3.0, 3.1, 3.2])
        >>> P = [np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones(6), s, s * s)]
        >>> B, zc, _ = refine_partition(*[p[None] for p in P], np.array([6]), np.array([2]),
        ...                             np.array([[0, 1, 4, 6]]), np.array([1]))
        >>> B.tolist(), zc.tolist()
        ([[0, 2, 3, 6]], [1])
    """
    B, zc = B.copy(), zc.copy()
    active = np.arange(B.shape[0])
    prev = np.full(B.shape[0], np.inf)
    passes = 0
    while active.size and passes < max_passes:
        passes += 1
        sub = (C[active], P1[active], P2[active])
        newB, newz, cost = _pass(*sub, za[active], _candidates(B[active], G[active], W))
        moved = (newB != B[active]).any(1) | (newz != zc[active])
        B[active], zc[active] = newB, newz
        keep = moved & (prev[active] - cost > rtol * cost)
        prev[active] = cost
        active = active[keep]
    return B, zc, passes
