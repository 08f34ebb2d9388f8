"""Exact 1-D k-means with a pinned zero centre (the quantizer's optimum), by dynamic programming.

The quantizer's codebook for a segment is ``K = 2**b`` free centres plus a centre pinned at 0,
over the segment's nonzeros (zeros cost nothing and stay zero). On a line every optimal
assignment is a partition of the sorted nonzeros ``s`` into contiguous runs, and:

* a free cluster never straddles 0 (its centre would have to be exactly 0, the pinned one);
* the zero cluster is a run ``s[i:j]`` with ``i <= z <= j``, ``z`` the number of negatives.

So the problem splits into two independent one-sided problems: the negatives ``s[:z]`` and the
positives ``s[z:]`` (read from the largest down), each ``A[k] = min_i L_k(i) + sum(a[i:]^2)``
where ``L_k(i)`` is the best SSE of the first ``i`` values with at most ``k`` clusters, and the
optimum is ``min_{k1 + k2 = K} A_neg[k1] + A_pos[k2]``. Each ``L_k`` layer is a row-minima
problem of a Monge matrix (``w(j, i)`` = SSE of one cluster, float64 prefix sums of centred
values), solved by divide and conquer on the monotone argmin, every recursion depth vectorized:
O(K n log n) time, O(n) memory per stored layer.

The same DP runs over *atoms* (runs ``[bounds[t], bounds[t+1])`` of the sorted values) with
their exact counts and sums: with one atom per distinct value it is exact; with coarser atoms
it is the best partition whose boundaries are atom boundaries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dp_partition", "optimal_sse"]

_BIG = np.iinfo(np.int64).max


def _layer(
    prev: np.ndarray, P1: np.ndarray, P2: np.ndarray, C: np.ndarray, lo: np.ndarray, hi: np.ndarray, floor: np.ndarray
):
    """One DP layer of independent problems side by side: ``cur[i] = min_{lo_p <= j <= i} prev[j] + w(j, i)``
    for every position ``i`` of problem ``p``, whose positions are ``lo_p..hi_p``.

    ``P1, P2, C`` ``[T]``: prefix sums, sums of squares and counts at the atom boundaries (each
    problem's own, starting at its ``lo``). Returns ``cur [T]`` float64 (untouched outside the
    problems: copied from ``prev``) and the leftmost argmin ``[T]`` int32. Divide and conquer on
    the monotone argmin, one vectorized pass per recursion depth; ``floor [T]`` is a lower bound
    of the argmin (the previous layer's: with one more cluster the last one starts no earlier,
    Knuth-Yao monotonicity of Monge costs).
    """
    cur = prev.copy()
    arg = np.arange(prev.size, dtype=np.int32)
    # nodes of the current recursion depth: target range [l, r], candidate range [ol, orr]
    l, r, ol, orr = lo.copy(), hi.copy(), lo.copy(), hi.copy()
    while l.size:
        mid = (l + r) // 2
        first = np.minimum(np.maximum(ol, floor[mid]), mid)
        cnt = np.minimum(mid, orr) - first + 1  # >= 1
        starts = np.zeros(cnt.size, np.int64)
        np.cumsum(cnt[:-1], out=starts[1:])
        j = np.arange(int(starts[-1] + cnt[-1])) + np.repeat(first - starts, cnt)  # candidate positions
        i = np.repeat(mid, cnt)
        c = C[i] - C[j]
        s1 = P1[i] - P1[j]
        w = (P2[i] - P2[j]) - np.divide(s1 * s1, c, out=np.zeros(c.size), where=c > 0)
        val = prev[j] + np.maximum(w, 0.0)
        best = np.minimum.reduceat(val, starts)
        bj = np.minimum.reduceat(np.where(val == np.repeat(best, cnt), j, _BIG), starts)  # leftmost argmin
        cur[mid] = best
        arg[mid] = bj
        # children in position order: (l, mid - 1, ol, bj) then (mid + 1, r, bj, orr)
        keep = np.stack([l <= mid - 1, mid + 1 <= r], 1).ravel()
        l = np.stack([l, mid + 1], 1).ravel()[keep]
        r = np.stack([mid - 1, r], 1).ravel()[keep]
        ol, orr = np.stack([ol, bj], 1).ravel()[keep], np.stack([bj, orr], 1).ravel()[keep]
    return cur, arg


def _sides(stats: list[tuple[np.ndarray, ...]], K: int):
    """Both one-sided problems over their atom boundaries, side by side.

    ``stats[p] = (P1, P2, C, Q)``: centred prefix sums / sums of squares (cluster costs), counts
    and raw sums of squares (the zero cluster's cost), ``[N_p + 1]`` at the boundaries. Returns per
    side ``A [K + 1]`` (best SSE with at most ``k`` free clusters on a prefix and the zero cluster
    on the rest), the zero-cluster start ``cut [K + 1]`` and the argmins of its useful layers.
    """
    sizes = [s[2].size for s in stats]
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    P1, P2, C, Q = (np.concatenate([s[f] for s in stats]) for f in range(4))
    L = np.full(P1.size, np.inf)
    L[base] = 0.0
    out = [(np.empty(K + 1), np.empty(K + 1, np.int64), []) for _ in stats]
    active = list(range(len(stats)))
    floor = np.repeat(base, sizes)  # previous layer's argmins (global positions)
    for k in range(K + 1):
        if k:
            lo = base[active]
            new, a = _layer(L, P1, P2, C, lo, lo + np.array(sizes)[active] - 1, floor)
            floor = a.astype(np.int64)
            still = []
            for p in active:
                sl = slice(base[p], base[p] + sizes[p])
                if np.array_equal(new[sl], L[sl]):  # one more cluster no longer helps: nor will any later one
                    out[p][0][k:], out[p][1][k:] = out[p][0][k - 1], out[p][1][k - 1]
                else:
                    out[p][2].append(np.subtract(a[sl], base[p], dtype=np.int32))  # (int32: K per value)
                    still.append(p)
            L, active = new, still
        for p in active:
            sl = slice(base[p], base[p] + sizes[p])
            tot = L[sl] + (Q[sl][-1] - Q[sl])  # zero-cluster cost of the suffix from each boundary
            out[p][1][k] = int(np.argmin(tot))
            out[p][0][k] = tot[out[p][1][k]]
        if not active:
            break
    return out


def _stats(a: np.ndarray, bounds: np.ndarray):
    """Centred prefix sums and sums of squares, counts and raw sums of squares at ``bounds`` (float64)."""
    a64 = a.astype(np.float64)
    d = a64 - (float(a64.mean()) if a64.size else 0.0)
    p1 = np.concatenate([[0.0], np.cumsum(d)])
    p2 = np.concatenate([[0.0], np.cumsum(d * d)])
    q = np.concatenate([[0.0], np.cumsum(a64 * a64)])
    return p1[bounds], p2[bounds], bounds.astype(np.float64), q[bounds]


def _backtrack(args: list[np.ndarray], k: int, i: int) -> list[int]:
    """Ascending boundaries of the free clusters of the best ``<= k``-cluster prefix ending at ``i``."""
    out = [i]
    for layer in range(min(k, len(args)) - 1, -1, -1):
        j = int(args[layer][i])
        if j < i:
            out.append(j)
            i = j
    if i != 0:
        raise AssertionError("DP backtrack did not reach position 0")
    return out[::-1] if out[-1] == 0 else [0, *out[::-1]]


def _raw_stats(p1: np.ndarray, p2: np.ndarray, bounds: np.ndarray, top: int | None):
    """Raw (uncentred) stats at ``bounds`` from prefix sums ``p1, p2 [m + 1]`` of the whole sorted
    array; ``top = m`` reads the positions from the top down (the positive side)."""
    if top is None:
        P1, Q = p1[bounds], p2[bounds]
    else:
        P1, Q = p1[top] - p1[top - bounds], p2[top] - p2[top - bounds]
    return P1, Q, bounds.astype(np.float64), Q


def dp_partition(
    s: np.ndarray,
    K: int,
    bounds: np.ndarray | None = None,
    prefix: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, int, float]:
    """Best partition of sorted nonzeros ``s [m]`` into <= ``K`` free clusters plus the zero cluster.

    Args:
        s: ascending float32 nonzeros.
        K: free centres (>= 1).
        bounds: ascending atom boundaries ``[N + 1]`` from 0 to m (default: every position,
            which makes the result exact). The sign change is added when missing.
        prefix: float64 prefix sums ``(p1, p2) [m + 1]`` of ``s`` and ``s**2``: the cluster costs
            then come from them, uncentred, with no pass over ``s`` (the default centres each
            side first, which is more accurate for one-sided data).
    Returns:
        ``(cuts, zero, sse)``: ascending cluster boundaries ``cuts`` (positions in ``0..m``,
        first 0, last m, no empty free cluster), the index ``zero`` such that the zero cluster is
        ``s[cuts[zero]:cuts[zero + 1]]`` (possibly empty), and the partition's float64 SSE with
        float64 means (as computed by the DP).

    Example:
        >>> s = np.array([-3.0, -2.9, 0.1, 5.0, 5.2], np.float32)
        >>> cuts, zero, sse = dp_partition(s, 2)
        >>> cuts.tolist(), zero, round(sse, 4)
        ([0, 2, 3, 5], 1, 0.035)
    """
    m = s.size
    bounds = np.arange(m + 1) if bounds is None else np.asarray(bounds, dtype=np.int64)
    z = int(np.searchsorted(s, 0.0))
    zb = int(np.searchsorted(bounds, z))
    if zb == bounds.size or bounds[zb] != z:  # the sign change must be a boundary
        bounds = np.insert(bounds, zb, z)
    neg_b = bounds[: zb + 1]  # over s[:z], ascending
    pos_b = m - bounds[zb:][::-1]  # over s[z:] read from the top down
    if prefix is None:
        stats = [_stats(s[:z], neg_b), _stats(s[z:][::-1], pos_b)]
    else:
        stats = [_raw_stats(*prefix, neg_b, None), _raw_stats(*prefix, pos_b, m)]
    (An, cn, gn), (Ap, cp, gp) = _sides(stats, K)
    bn, bp = neg_b, pos_b
    tot = An + Ap[::-1]  # k1 negative clusters, K - k1 positive ones
    k1 = int(np.argmin(tot))
    neg = [int(bn[t]) for t in _backtrack(gn, k1, int(cn[k1]))]  # ..., zero-cluster start
    pos = [m - int(bp[t]) for t in _backtrack(gp, K - k1, int(cp[K - k1]))][::-1]  # zero-cluster end, ...
    cuts = np.array(neg + pos, dtype=np.int64)
    return cuts, len(neg) - 1, float(tot[k1])


def optimal_sse(x: np.ndarray, b: int) -> float:
    """The exact optimum's SSE (float64 means) for one segment ``x`` with ``2**b`` free centres."""
    s = np.sort(x[x != 0]).astype(np.float32)
    if s.size == 0:
        return 0.0
    cuts, zero, _ = dp_partition(s, 2**b)
    s64 = s.astype(np.float64)
    sse = 0.0
    for t, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg = s64[lo:hi]
        sse += float((seg**2).sum()) if t == zero else float(((seg - seg.mean()) ** 2).sum()) if seg.size else 0.0
    return sse
