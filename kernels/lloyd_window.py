"""The fast quantizer's init: a windowed dynamic program that refines a partition (numpy, batched).

A codebook of ``K`` free centres plus the pinned zero partitions the sorted nonzeros into
``K + 1`` runs: cluster ``t`` is ``[B[t], B[t+1])`` (positions on an *atom* grid, runs of the
sorted values that never split equal ones), ``B[0] = 0``, ``B[K+1] = G``. Exactly one cluster
is the zero cluster (cost: its raw sum of squares; it must contain the sign change ``za``);
the others cost their SSE about their mean. The exact optimum is a ``K``-layer DP over all
``G`` positions (:mod:`.lloyd_optimal`, O(K G log G)); here every boundary ``B[t]`` only
chooses among ``NC = 2 (2 W + 1)`` *candidates* per pass:

* ``2 W - 1`` atoms around its current position (fine moves), and one atom inside each end of the
  spread below (a one-atom cluster beside a neighbour's boundary: where a run of far outliers
  hands a centre over, which the evenly spread points miss), and
* ``2 W + 1`` points spread evenly over ``[min(B[t-1], B[t]-W), max(B[t+1], B[t]+W)]``
  (moves of up to a whole neighbouring cluster), except that the first free boundary's lowest
  point is atom 1 (not 0) and the last one's highest is atom ``G - 1`` (not ``G``): the end atoms
  alone, a far outlier's own cluster, instead of an empty end cluster (which a segment with more
  than ``K`` distinct nonzeros never needs). Without them, at b = 1 a segment with one far outlier
  each side stayed at centres in the bulk, 12x the optimum: it takes both end boundaries at once.

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
import torch

from .lloyd_batch import unique_ints

__all__ = ["compand_init", "refine_partition"]

COMPAND_CAP = 64.0  # an atom's compand mass: at most this many times its share of the values (or 2 / K), and cnt / K
STEP_BATCH = 8  # Viterbi steps whose cost tiles one round of numpy calls builds (fewer, larger calls)
INF_BITS = np.uint64(0x7FF0000000000000)  # the bit pattern of float64 +inf


def compand_init(
    s: np.ndarray, K: int, grid: int, cap: float | None = None, at: np.ndarray | None = None
) -> np.ndarray:
    """``K`` ascending free centres (float64) spread like the high-rate optimum (density^(1/3)).

    ``s [m]``: ascending nonzeros. The density is estimated on ``min(m, grid)`` equal-count
    atoms, and no atom's mass exceeds ``cap`` (default :data:`COMPAND_CAP`, read at the call, as the
    Triton launcher reads it) times its share of the values or two centres' worth
    (``2 / K`` of the total), whichever is larger, and never more centres than it holds values
    (``cnt / K``): an atom stretched over the empty gap before a far outlier would otherwise draw many
    centres into the gap (with few centres, one or two there are right; with a few values per atom,
    several far outliers each drew ``COMPAND_CAP / m`` of the centres: 1.8x the optimum at b = 8);
    10 % of the mass follows the counts (so ties and point masses get centres).
    ``at`` (fractions of the total mass in ``[0, 1]``, in any order; default ``(k + 1/2) / K``) places
    the points elsewhere on the same measure: the fast path asks for its atom grid's ``j / Q`` and its
    centres in one call (``lloyd.compand_points``).

    Example:
        >>> s = np.linspace(-1.0, 1.0, 1001)
        >>> compand_init(s, 4, 64).round(2).tolist()
        [-0.75, -0.25, 0.25, 0.75]
    """
    m = s.size
    cap = COMPAND_CAP if cap is None else cap
    b = unique_ints((np.arange(min(m, grid) + 1) * m) // min(m, grid))
    lo, hi = b[:-1], b[1:]
    cnt = (hi - lo).astype(np.float64)
    x0 = s[lo].astype(np.float64)
    w = np.maximum(np.append(s[lo[1:]].astype(np.float64), float(s[-1])) - x0, 0.0)
    mass = np.cbrt(cnt) * w ** (2.0 / 3.0)
    total = mass.sum()
    if total > 0:
        mass = np.minimum(mass, np.minimum(np.maximum(cap * cnt / m, 2.0 / K), cnt / K) * total)
    mass = 0.9 * mass / mass.sum() + 0.1 * cnt / m if mass.sum() > 0 else cnt / m
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    t = ((np.arange(K) + 0.5) / K if at is None else at) * cum[-1]
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
    spread[:, 1, 0] = np.minimum(1, G)  # the end atoms (they were 0 and G: empty end clusters)
    spread[:, -2, -1] = np.maximum(G - 1, 0)
    # one atom inside each end of the spread, in place of the window's outermost fine moves: a one-atom
    # cluster next to a neighbour's boundary (three outliers at b = 2 need it: 1.18x the optimum without)
    local[:, :, 0] = np.minimum(spread[:, :, 0] + 1, spread[:, :, -1])
    local[:, :, -1] = np.maximum(spread[:, :, -1] - 1, spread[:, :, 0])
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
    A step computes ``free = max(s2 - s1 * s1 / max(n, 1), 0) + (inf where a > b)`` in float64 and
    ``c = V + free``, then the ``argmin`` (ties and NaN: the first) and the minimum; the Triton kernel
    reproduces these operations bit for bit, so their order and the tie-breaking are fixed. The arrays
    are small (``[S, NC, NC]``), so per-call and per-inner-loop costs dominate: buffers are allocated
    once per pass, the ``free`` tiles of :data:`STEP_BATCH` steps are built by one round of calls (they
    do not depend on ``V``), operands are arrays (not scalars), and the three ops with a broadcast or a reduction
    on the short last axis run in torch on the same buffers (numpy takes 2x as long for the outer
    differences and returns no minimum with its argmin; both give the same bits: exact subtractions
    and additions, the first minimum on ties and the first NaN).
    """
    S, T, NC = win.shape
    rows = np.arange(S)
    X = np.empty((3, T, S, NC))  # counts, sums and squares at every candidate (one step's: X[:, t])
    at = np.ascontiguousarray((win + (rows * C.shape[1])[:, None, None]).transpose(1, 0, 2))  # [T, S, NC]
    for q, P in enumerate((C, P1, P2)):
        np.take(P, at, out=X[q])  # flat indices: 3x faster than a fancy gather
    Xt = torch.from_numpy(X)
    H = min(STEP_BATCH, T - 1)  # the cost tiles of H steps are built together (they do not depend on V)
    D = np.empty((3, H, S, NC, NC))  # n, s1, s2 of every (next, previous) pair, per step of a batch
    Dt = torch.from_numpy(D)
    bad = np.empty((H, S, NC, NC))  # 0, or inf where a > b (a boundary before its predecessor)
    ones = np.ones((H, S, NC, NC))  # np.maximum vectorises with an array operand, not with a scalar
    infeasible = np.empty((H, S, NC, NC), bool)
    c0t, c1t = torch.empty((S, NC, NC), dtype=torch.float64), torch.empty((S, NC, NC), dtype=torch.float64)  # V + free
    cz = np.empty((S, NC, 2 * NC))  # [V1 + free | V0 + zero] where cluster t may be the zero cluster
    czt = torch.from_numpy(cz)
    a1t = torch.empty((S, NC), dtype=torch.int64)  # argmins over [V1 + free | V0 + zero]
    a1 = a1t.numpy()
    # a > b <=> n = C[b] - C[a] < 0 where the counts rise strictly up to the last candidate (counts of
    # nonempty atoms always do): a compare on n instead of a broadcast one on the positions (7x dearer)
    last = win.max((1, 2))[:, None]  # [S, 1]
    rising = bool(np.all((np.diff(C, axis=1) > 0) | (np.arange(C.shape[1] - 1) >= last)))
    # the state lives in torch buffers that the minima write in place (numpy views of the same memory): no
    # allocation per step, and the argmins go straight into their step's rows (views split off once)
    V0t, V1t = torch.zeros((S, NC), dtype=torch.float64), torch.full((S, NC), np.inf, dtype=torch.float64)
    V0, V1 = V0t.numpy(), V1t.numpy()  # best cost with the zero cluster not yet placed / already placed
    V0b, V1b = V0t[:, None, :], V1t[:, None, :]  # [S, 1, NC] (views: they follow the buffers)
    A0t, A1t = torch.zeros((T, S, NC), dtype=torch.int64), torch.zeros((T, S, NC), dtype=torch.int64)  # argmins
    A0, A1, A0s, A1s = A0t.numpy(), A1t.numpy(), A0t.unbind(0), A1t.unbind(0)  # a step writes one [S, NC] block
    frees = Dt[1].unbind(0)  # [H] x [S, NC, NC]: a step's free costs
    Z = np.zeros((T, S, NC), bool)
    zc = za[:, None, None]
    lo_t, hi_t = win.min(2), win.max(2)  # [S, T]
    # V0 matters while the zero cluster may still start (a candidate at or before za); V1 once it may exist
    need0 = (lo_t[:, 1:] <= za[:, None]).any(0).tolist()  # [T - 1], step t: boundary t + 1
    may_zero = ((lo_t[:, :-1] <= za[:, None]) & (za[:, None] <= hi_t[:, 1:])).any(0).tolist()
    add, tmin = torch.add, torch.min

    for t in range(T - 1):
        j = t % H
        if j == 0:  # the tiles of steps t .. t + h - 1, elementwise as one step's (the same bits)
            h = min(H, T - 1 - t)
            n, s1, s2 = D[:, :h]
            free, inf_h, bad_h = s1, infeasible[:h], bad[:h]  # free overwrites s1 (s2 stays for the zero cluster)
            torch.sub(Xt[:, t + 1 : t + 1 + h, :, :, None], Xt[:, t : t + h, :, None, :], out=Dt[:, :h])
            if rising:
                np.less(n, 0.0, out=inf_h)
            else:
                wh = win[:, t : t + 1 + h].transpose(1, 0, 2)  # [h + 1, S, NC]
                np.greater(wh[:-1, :, None, :], wh[1:, :, :, None], out=inf_h)
            np.multiply(inf_h, INF_BITS, out=bad_h.view(np.uint64))  # +0.0 or +inf (cheaper than a putmask)
            np.maximum(n, ones[:h], out=n)  # (n = 0 has s1 = 0)
            np.multiply(s1, s1, out=s1)
            np.divide(s1, n, out=s1)
            np.subtract(s2, s1, out=free)
            # max(x, bad) = max(x, 0) + bad for bad in {0, inf}, NaN included (np.maximum propagates it);
            # where x = -0 it may keep -0, which V + free turns into the same value (V >= +0 or inf or NaN)
            np.maximum(free, bad_h, out=free)
        freet = frees[j]  # [S, NC, NC] this step's free costs
        if need0[t]:
            add(V0b, freet, out=c0t)
        if may_zero[t]:  # cluster t may be the zero cluster
            a, b = win[:, t][:, None, :], win[:, t + 1][:, :, None]  # [S, 1, NC] previous, [S, NC, 1] next
            zero = D[2, j] + np.where((a <= zc) & (zc <= b), bad[j], np.inf)  # it holds the sign change
            np.add(V1[:, None, :], D[1, j], out=cz[:, :, :NC])
            np.add(V0[:, None, :], zero, out=cz[:, :, NC:])
            tmin(czt, 2, out=(V1t, a1t))  # (the first minimum, or the first NaN)
            use_z = a1 >= NC
            A1[t + 1], Z[t + 1] = a1 - NC * use_z, use_z
        elif np.isfinite(V1).any():
            add(V1b, freet, out=c1t)
            tmin(c1t, 2, out=(V1t, A1s[t + 1]))
        if need0[t]:
            tmin(c0t, 2, out=(V0t, A0s[t + 1]))
        else:
            V0.fill(np.inf)
    x = V1.argmin(1)  # every last candidate is G
    cost = V1[rows, x]
    flag = np.ones(S, bool)
    B = np.empty((S, T), np.int64)
    zero_at = np.zeros(S, np.int64)
    for t in range(T - 1, 0, -1):
        B[:, t] = win[rows, t, x]
        z_here = flag & Z[t, rows, x]
        zero_at[z_here] = t - 1
        # (a row's backpointer is A1's until its zero cluster is met, A0's after: one gather while all agree)
        if flag.all():
            x = A1[t, rows, x]
        elif flag.any():
            x = np.where(flag, A1[t, rows, x], A0[t, rows, x])
        else:
            x = A0[t, rows, x]
        flag &= ~z_here
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
        W: half window (>= 1); max_passes: cap on the passes; rtol: a problem stops once a pass
            lowers its cost by at most ``rtol`` times the cost (0: once nothing moves).
    Returns:
        Refined ``B`` and ``zc`` and the number of passes run.
    Raises:
        ValueError: ``C``, ``P1``, ``P2`` not of one 2-D shape with ``B``'s rows, or ``W < 1``; TypeError: not
        float64.

    Example:
        >>> s = np.array([-2.0, -1.9, 0.5, 3.0, 3.1, 3.2])
        >>> P = [np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones(6), s, s * s)]
        >>> B, zc, _ = refine_partition(*[p[None] for p in P], np.array([6]), np.array([2]),
        ...                             np.array([[0, 1, 4, 6]]), np.array([1]))
        >>> B.tolist(), zc.tolist()
        ([[0, 2, 3, 6]], [1])
    """
    if not (C.ndim == 2 and C.shape == P1.shape == P2.shape and C.shape[0] == B.shape[0]):
        raise ValueError(
            f"C, P1, P2 must be [S, Gmax + 1] each, B [S, K + 2]: got {C.shape}, {P1.shape}, {P2.shape}, {B.shape}"
        )
    if not C.dtype == P1.dtype == P2.dtype == np.float64:
        raise TypeError(f"C, P1, P2 must be float64, got {C.dtype}, {P1.dtype}, {P2.dtype}")
    if isinstance(W, bool) or not isinstance(W, (int, np.integer)) or W < 1:
        raise ValueError(f"W must be an int >= 1 (the spread's 2 W + 1 points need two ends), got {W!r}")
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
