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
it is the best partition whose boundaries are atom boundaries (the fast path's init).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dp_partition", "optimal_sse"]

_BIG = np.iinfo(np.int64).max


def _layer(prev: np.ndarray, P1: np.ndarray, P2: np.ndarray, C: np.ndarray, want_arg: bool):
    """One DP layer over ``N + 1`` prefix positions: ``cur[i] = min_{j <= i} prev[j] + w(j, i)``.

    ``P1, P2, C`` ``[N + 1]``: prefix sums, sums of squares and counts at the atom boundaries.
    Returns ``cur [N + 1]`` float64 and (if ``want_arg``) the leftmost argmin ``[N + 1]`` int32.
    """
    N1 = prev.size
    cur = np.empty(N1)
    arg = np.empty(N1, dtype=np.int32) if want_arg else None
    # nodes of the current recursion depth: target range [l, r], candidate range [ol, or]
    l = np.zeros(1, np.int64)
    r = np.full(1, N1 - 1, np.int64)
    ol = np.zeros(1, np.int64)
    orr = np.full(1, N1 - 1, np.int64)
    while l.size:
        mid = (l + r) // 2
        hi = np.minimum(mid, orr)
        cnt = hi - ol + 1  # >= 1: ol <= mid always holds
        starts = np.zeros(cnt.size, np.int64)
        np.cumsum(cnt[:-1], out=starts[1:])
        total = int(starts[-1] + cnt[-1])
        node = np.repeat(np.arange(cnt.size), cnt)
        j = np.arange(total) - starts[node] + ol[node]  # [total] candidate positions
        i = mid[node]
        c = C[i] - C[j]
        s1 = P1[i] - P1[j]
        w = (P2[i] - P2[j]) - np.divide(s1 * s1, c, out=np.zeros(total), where=c > 0)
        val = prev[j] + np.maximum(w, 0.0)
        best = np.minimum.reduceat(val, starts)
        pos = np.where(val == best[node], j, _BIG)
        bj = np.minimum.reduceat(pos, starts)  # leftmost argmin
        cur[mid] = best
        if want_arg:
            arg[mid] = bj
        left = l <= mid - 1
        right = mid + 1 <= r
        l = np.concatenate([l[left], (mid + 1)[right]])
        r = np.concatenate([(mid - 1)[left], r[right]])
        ol = np.concatenate([ol[left], bj[right]])
        orr = np.concatenate([bj[left], orr[right]])
        order = np.argsort(l, kind="stable")
        l, r, ol, orr = l[order], r[order], ol[order], orr[order]
    return cur, arg


def _side(P1: np.ndarray, P2: np.ndarray, C: np.ndarray, Q: np.ndarray, K: int):
    """One side over atom boundaries ``0..N``: ``A [K + 1]``, the best SSE with at most ``k`` free
    clusters on a prefix and the zero cluster on the rest, its zero-cluster start ``cut [K + 1]``,
    and each layer's argmin (for backtracking).

    ``P1, P2`` are centred prefix sums / sums of squares (cluster costs), ``Q`` raw sums of squares
    (the zero cluster's cost), ``C`` counts, all ``[N + 1]`` at the boundaries.
    """
    tail = Q[-1] - Q  # [N + 1] zero-cluster cost of the suffix from each boundary
    L = np.full(C.size, np.inf)
    L[0] = 0.0
    A = np.empty(K + 1)
    cut = np.empty(K + 1, np.int64)
    args: list[np.ndarray] = []
    for k in range(K + 1):
        if k:
            new, a = _layer(L, P1, P2, C, True)
            if np.array_equal(new, L):  # one more cluster no longer helps anywhere: nor will any later one
                A[k:], cut[k:] = A[k - 1], cut[k - 1]
                break
            L = new
            args.append(a)
        tot = L + tail
        cut[k] = int(np.argmin(tot))
        A[k] = tot[cut[k]]
    return A, cut, args


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


def dp_partition(s: np.ndarray, K: int, bounds: np.ndarray | None = None) -> tuple[np.ndarray, int, float]:
    """Best partition of sorted nonzeros ``s [m]`` into <= ``K`` free clusters plus the zero cluster.

    Args:
        s: ascending float32 nonzeros.
        K: free centres (>= 1).
        bounds: ascending atom boundaries ``[N + 1]`` from 0 to m (default: every position,
            which makes the result exact). The sign change is added when missing.
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
    sides = []
    for vals, b in ((s[:z], neg_b), (s[z:][::-1], pos_b)):
        A, cut, args = _side(*_stats(vals, b), K)
        sides.append((A, cut, args, b))
    (An, cn, gn, bn), (Ap, cp, gp, bp) = sides
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
