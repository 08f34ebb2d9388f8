"""Lloyd fits of many segments side by side on CPU (numpy): the reference's ``_fit`` batched.

:func:`fit_many` runs the iteration of :func:`atmc_triton.kernels.lloyd._fit` (assign by the
rounded-down midpoints, move the free centres to their cluster means in float64 rounded to float32,
stop at a fixed point or once the relative drop of the squared error is ``<= tol``) for ``S``
segments at once: one numpy operation on ``[S, F + 1]`` per step instead of one torch call per
segment, which is what a fit of a mid-size segment costs (~50 us per iteration, nearly all call
overhead). Rows with fewer free centres are padded with ``+inf`` centres that are never free and
stay empty. Every float operation is the one ``_fit`` does, and each row's squared-error terms are
summed by torch alone (the same association), so results and errors are the same bits. The
assignment rule both use, :func:`round_down_midpoints`, lives here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["fit_many", "round_down_midpoints", "unique_ints"]


def unique_ints(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of an integer array by one sort (numpy 2's hash-based ``unique`` costs ~20x more on the
    few thousand atom bounds of a segment).

    Example:
        >>> unique_ints(np.array([3, 1, 3, 0])).tolist()
        [0, 1, 3]
    """
    a = np.sort(a)
    if a.size == 0:
        return a
    return a[np.concatenate([[True], a[1:] != a[:-1]])]


def round_down_midpoints(c: Tensor) -> Tensor:
    """Largest float32 ``<= (c[..., i] + c[..., i + 1]) / 2`` for float32 centres ``c [..., K + 1]`` ascending
    along the last axis.

    For float32 ``x``: ``x <= mid`` exactly when ``x <= round_down_midpoints(c)[..., i]``, so the
    boundary search can run on float32 values without rounding surprises (the reference's assignment rule,
    here so that both :func:`fit_many` and ``lloyd`` use it).

    Example:
        >>> round_down_midpoints(torch.tensor([0.0, 1.0, 2.0])).tolist()
        [0.5, 1.5]
    """
    mid64 = (c[..., :-1].double() + c[..., 1:].double()) * 0.5  # exact for float32 inputs
    mid32 = mid64.float()
    too_big = mid32.double() > mid64
    return torch.where(too_big, torch.nextafter(mid32, torch.full_like(mid32, -float("inf"))), mid32)


def fit_many(
    s: list[np.ndarray], p1: list[np.ndarray], total_sq: np.ndarray, free: list[np.ndarray], max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd from ``free[r]`` (ascending float32 free centres) on every sorted finite segment ``s[r]``.

    Args:
        s: ``S`` arrays ``[m_r]`` float32, ascending, finite, nonzero; p1: their float64 prefix sums
            ``[m_r + 1]``; total_sq: ``[S]`` float64 sums of squares; free: ``S`` arrays ``[F_r]``.
    Returns:
        ``c [S, Fmax + 1]`` float32 (row ``r``: its ``F_r + 1`` centres ascending with the pinned zero
        at ``nneg[r]``, then ``+inf`` padding), ``nneg [S]``, ``F [S]`` and ``err [S]`` float64.

    Example:
        >>> s = [np.array([-2.0, 1.0, 1.2, 3.0], np.float32)]
        >>> p1 = [np.concatenate([[0.0], np.cumsum(s[0], dtype=np.float64)])]
        >>> c, nneg, F, err = fit_many(s, p1, np.array([15.44]), [np.array([1.0], np.float32)], 20, 0.0)
        >>> c[0].tolist(), int(nneg[0])
        ([0.0, 1.7333333492279053], 0)
    """
    S = len(s)
    F = np.array([f.size for f in free], np.int64)
    nneg = np.array([int(np.count_nonzero(f < 0)) for f in free], np.int64)
    W = int(F.max()) + 1
    col = np.arange(W)
    is_free = (col != nneg[:, None]) & (col <= F[:, None])  # [S, W]
    c = np.full((S, W), np.inf, np.float32)
    for r, f in enumerate(free):
        c[r, is_free[r]] = f
    c[np.arange(S), nneg] = 0.0
    m = np.array([x.size for x in s], np.int64)

    def assign(c: np.ndarray, rows: np.ndarray, hi: np.ndarray, s1: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows ``rows`` of ``hi``, ``s1`` (in place; the others keep their values) for centres ``c``."""
        mids = round_down_midpoints(torch.from_numpy(c[rows])).numpy()  # [len(rows), W - 1]
        for i, r in enumerate(rows.tolist()):  # (ragged rows: no copy of the prefix sums into one array)
            hi[r, :-1] = np.searchsorted(s[r], mids[i], side="right")
            hi[r, -1] = m[r]  # cluster i is s[lo_i:hi_i]
            p = p1[r][hi[r]]
            s1[r, 0], s1[r, 1:] = p[0], p[1:] - p[:-1]
        lo = np.concatenate([np.zeros((S, 1), np.int64), hi[:, :-1]], 1)
        return hi, hi - lo, s1

    def sse(c: np.ndarray, cnt: np.ndarray, s1: np.ndarray, rows: np.ndarray) -> np.ndarray:  # [S], NaN off rows
        cd = c.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf padding: masked out
            gain = torch.from_numpy(np.where(is_free & (cnt > 0), 2 * cd * s1 - cnt * cd * cd, 0.0))
        # each row's F + 1 terms summed alone by torch, as `_fit` sums one segment's: the same association,
        # so the same bits (the error decides the tol stop, and can be all rounding noise: huge values)
        err = np.full(S, np.nan)
        for r in rows.tolist():
            err[r] = total_sq[r] - float(gain[r, : F[r] + 1].sum())
        return err

    prev_err = np.full(S, np.inf)
    hi, s1 = np.full((S, W), -1, np.int64), np.zeros((S, W))
    done = np.zeros(S, bool)
    for _ in range(max_iter):
        live = np.flatnonzero(~done)  # frozen rows change nothing: their assignment is not redone
        if live.size == 0:
            break
        prev_hi = hi.copy()
        hi, cnt, s1 = assign(c, live, hi, s1)
        mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), c.astype(np.float64)).astype(np.float32)
        new_c = np.where(is_free, mean, c)
        err = sse(new_c, cnt, s1, live)
        fixed = (hi == prev_hi).all(1)
        with np.errstate(invalid="ignore"):  # tol * inf before the first error; NaN on frozen rows
            small = np.isfinite(prev_err) & ((prev_err - err) <= tol * prev_err)
        c = np.where(done[:, None], c, new_c)
        done = done | fixed | small
        prev_err = np.where(done, prev_err, err)
    everyone = np.arange(S)
    hi, cnt, s1 = assign(c, everyone, hi, s1)
    return c, nneg, F, sse(c, cnt, s1, everyone)
