"""Segmented 1-D quantizer with a pinned zero centre (Lloyd codebooks): the PyTorch reference.

Every factor (U, V or C of a layer) is one *segment* of a flat value buffer. A segment with
bits ``b`` gets ``K = 2**b`` free centres plus a centre pinned at exactly 0:

* zeros stay zero (code 0); a nonzero may still be assigned to the zero centre;
* a segment with ``<= K`` nonzeros is kept exactly (its distinct nonzeros are the centres);
* otherwise ``method`` chooses the free centres, then Lloyd iterates from them: assign every
  value to its nearest centre (ties go to the lower centre), move every free centre to the
  mean of its cluster (an empty cluster keeps its centre), stop after ``max_iter`` iterations,
  at a fixed point, or once the relative drop of the squared error is ``<= tol``.

Methods (:data:`METHODS`):

* ``"fast"`` (default): a partition of the sorted nonzeros on at most
  ``max(MIN_ATOMS, GRID_PER_CENTRE * K)`` *atoms* (runs that never split equal values), started
  from a density^(1/3) spread of the centres (no atom drawing more than ``COMPAND_CAP`` times its
  share of the values or two centres, so a far outlier does not pull centres into the empty gap
  before it) and refined by the windowed DP of
  :mod:`.lloyd_window` (every boundary moves among ``2 (2 WINDOW + 1)`` candidates per pass, all
  at once, until a pass gains less than ``PASS_RTOL``), then Lloyd from its centres. Segments
  with the same ``b`` are refined side by side. A segment with ``<= K`` distinct nonzeros keeps
  them as its centres (exact). The legacy result (below) is computed too and kept when its error
  is lower, so ``"fast"`` is never worse than ``"lloyd"``.
* ``"optimal"``: the exact DP over every distinct value (O(K n log n)); no Lloyd iterations.
* ``"lloyd"``: the legacy init, the midpoint quantiles ``c_j = s[((2j + 1) m) // (2K)]``.

Centres are kept as float32 values (means are taken in float64 and rounded), so the
assignment step is exact and the error never increases from one iteration to the next.
Data is one dimensional, so each segment is sorted once; an iteration is then a boundary
search over the sorted values plus prefix-sum differences: O(K log n), never an n x K
distance matrix, and no host synchronisation (converged segments are frozen with masks). On CPU
the fits of a batch's segments run side by side (:mod:`.lloyd_batch`, numpy), since per segment
an iteration of torch calls costs more than its arithmetic.

Non-finite values (every method, the reference and the Triton kernel alike): a segment holding a NaN or
an infinity gets ``err = NaN`` (for every ``b`` in :func:`errors_for_bits`); its codebook row, codes and
``q`` are unspecified (whatever the fit produced), but nothing raises and the other segments are
computed as if it were absent.

Output layout, shared with the Triton kernel: ``codebook [S, 257]`` float32 with the zero
centre in slot 0 and the free centres ascending in slots ``1..K`` (unused slots are 0);
``codes [n]`` int16 slot indices (2**8 free centres plus the zero are 257 symbols, one more
than uint8 holds); ``q = codebook[seg, codes]``; ``err [S]`` float32 squared error.

The op ``atmc::lloyd_quantize`` runs this reference on CPU and the Triton launcher
(:mod:`.lloyd_triton`: one segmented sort, one Lloyd launch for all segments) on CUDA.
``atmc::lloyd_errors_for_bits`` (:func:`errors_for_bits_ref`) tabulates every segment's error
for b = 1..8 from one sort, the input of a per-layer bit allocation.
"""

import numpy as np
import torch
from torch import Tensor

from ._registry import HAS_TRITON, register_op
from .lloyd_batch import fit_many, round_down_midpoints, unique_ints
from .lloyd_optimal import dp_partition
from .lloyd_window import compand_init, refine_partition

__all__ = [
    "MAX_BITS",
    "METHODS",
    "atom_bounds",
    "check_method",
    "NUM_SLOTS",
    "errors_for_bits",
    "errors_for_bits_ref",
    "lloyd_quantize",
    "lloyd_quantize_ref",
    "round_down_midpoints",
]

MAX_BITS = 8
NUM_SLOTS = 2**MAX_BITS + 1
METHODS = ("fast", "optimal", "lloyd")
MIN_ATOMS = 512  # the fast path's partition lives on at least this many atoms ...
GRID_PER_CENTRE = 16  # ... and at least this many per free centre
WINDOW = 6  # the fast path's refinement: half window (2 (2 W + 1) candidates per boundary) ...
MAX_PASSES = 32  # ... its cap on passes ...
PASS_RTOL = 3e-3  # ... and the relative gain below which a segment stops (1e-3 until 2026-11-30: 1.2x the
# CPU time at 2M/30, b = 8, for a slightly better worst ratio to the optimum: README, "Codebook quality")
CHUNK_VALUES = 1 << 24  # the fast path batches segments up to this many values at a time
LUT_PER_MID = 16  # CPU bucketing: lookup-table bins per midpoint ...
LUT_MAX_STEPS = 8  # ... and the most midpoints a bin window may hold (else a binary search)
Stats = tuple[Tensor, Tensor, Tensor]  # sorted nonzeros [m], float64 prefix sums [m + 1], sum of squares []


def check_method(method: str, name: str = "lloyd_quantize") -> None:
    """Raise a ``ValueError`` unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")


def check_arguments(
    values: Tensor, offsets: Tensor, bits: Tensor | None, max_iter: int, tol: float, name: str = "lloyd_quantize"
) -> None:
    """The checks that read no tensor back (shapes, dtypes, ``max_iter``, ``tol``), shared by the reference and
    the Triton launchers (:func:`.lloyd_triton._check`); messages start with ``name``, the entry point called."""
    if values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError(f"{name}: values must be 1-D float32, got {values.dtype} {tuple(values.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
        raise ValueError(f"{name}: offsets must be a 1-D int64 tensor [S + 1]")
    if bits is not None and (
        bits.dim() != 1 or bits.numel() != offsets.numel() - 1 or bits.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"{name}: bits must be a 1-D int32/int64 tensor [S]")
    if max_iter < 0 or not (tol >= 0):
        raise ValueError(f"{name}: need max_iter >= 0 and tol >= 0, got {max_iter}, {tol}")


def check_values(values: Tensor, offsets: Tensor, bits: Tensor | None, name: str = "lloyd_quantize") -> list[int]:
    """The checks that read ``offsets`` and ``bits`` back (a host sync on CUDA); returns the offsets as a list."""
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != values.numel() or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name}: offsets must rise from 0 to values.numel()")
    if bits is not None and any(not 1 <= b <= MAX_BITS for b in bits.tolist()):
        raise ValueError(f"{name}: bits must lie in 1..{MAX_BITS}, got {bits.tolist()}")
    return bounds


def _check_inputs(
    values: Tensor,
    offsets: Tensor,
    bits: Tensor | None,
    max_iter: int,
    tol: float,
    method: str = "fast",
    name: str = "lloyd_quantize",
) -> list[int]:
    """Validate the arguments (reading offsets and bits back); return the offsets as a list. Messages start
    with ``name``, the entry point called."""
    check_method(method, name)
    check_arguments(values, offsets, bits, max_iter, tol, name)
    return check_values(values, offsets, bits, name)


def _sorted_nonzeros(x: Tensor) -> Tensor:
    """Sorted nonzeros of ``x`` (numpy's SIMD sort on CPU is ~3x faster than torch.sort)."""
    if x.device.type == "cpu":
        xn = x.numpy()
        return torch.from_numpy(np.sort(xn[xn != 0]))
    return torch.sort(x[x != 0])[0]


def _prefix_sum(s: Tensor) -> Tensor:
    """float64 prefix sums ``[m + 1]`` of ``s``, starting at 0."""
    if s.device.type == "cpu":
        p = np.zeros(s.numel() + 1)
        np.cumsum(s.numpy().astype(np.float64), out=p[1:])  # same sums; a casting cumsum is ~5x slower
        return torch.from_numpy(p)
    return torch.cat([s.new_zeros(1, dtype=torch.float64), torch.cumsum(s.double(), 0)])


def _sorted_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted nonzeros ``s [m]``, their float64 prefix sums ``[m + 1]`` and float64 sum of squares."""
    s = _sorted_nonzeros(x)
    if s.device.type == "cpu":  # one float64 copy for both (numpy: a casting cumsum is ~5x slower)
        s64 = s.numpy().astype(np.float64)
        p = np.zeros(s64.size + 1)
        np.cumsum(s64, out=p[1:])
        sq = float(np.square(s64, out=s64).sum())  # (not np.dot: BLAS threads cost more than they save here)
        return s, torch.from_numpy(p), torch.tensor(sq, dtype=torch.float64)
    return s, _prefix_sum(s), s.double().square().sum()


def _count_le(s: Tensor, v: Tensor) -> Tensor:
    """``searchsorted(s, v, right=True)`` as int64 (numpy on CPU: torch's CPU kernel costs ~20 ms per call)."""
    if s.device.type == "cpu":
        return torch.from_numpy(np.searchsorted(s.numpy(), v.numpy(), side="right").astype(np.int64))
    return torch.searchsorted(s, v, right=True)


def _bucket(x: Tensor, mids: Tensor) -> Tensor:
    """``torch.bucketize(x, mids)`` (the count of ``mids < x``) as int32, exactly.

    On CPU a lookup table replaces the per-value binary search (about 2x faster here): ``x`` is
    binned on a uniform grid over ``[mids[0], mids[-1]]``, each bin starts from the count below
    the bin two to its left (slack for rounding), and a few vectorized compare-and-step rounds
    finish the count. Falls back to ``torch.bucketize`` when a bin window holds many midpoints or
    ``x`` is not finite.
    """
    M = mids.numel()
    if x.device.type != "cpu" or M < 2 or x.numel() < 4096:
        return torch.bucketize(x, mids, out_int32=True)
    m, xn = mids.numpy(), x.numpy()
    lo, hi = float(m[0]), float(m[-1])
    nb = LUT_PER_MID * M
    if not hi > lo or not np.isfinite(xn).all():
        return torch.bucketize(x, mids, out_int32=True)
    scale = nb / (hi - lo)
    edges = lo + (np.arange(nb + 4) - 2) / scale  # bin j (x in [lo + j/scale, ...)) starts below edges[j]
    start = np.searchsorted(m, edges.astype(np.float32), side="left").astype(np.int32)
    start = np.append(start, np.int32(M))  # [nb + 5]: past the last edge every midpoint is below
    if int((start[4:] - start[:-4]).max()) > LUT_MAX_STEPS:  # midpoints a bin's x may still have to pass
        return torch.bucketize(x, mids, out_int32=True)
    t = xn.astype(np.float64)  # the bin of each value, in place (n-sized temporaries are the cost here)
    np.subtract(t, lo, out=t)
    np.multiply(t, scale, out=t)
    np.clip(t, 0, nb, out=t)
    k = start[t.astype(np.int32)]  # (nb < 2^31)
    del t
    mp = np.append(m, np.float32(np.inf))  # a sentinel past the last midpoint
    for _ in range(LUT_MAX_STEPS + 2):
        step = mp[k] < xn
        if not step.any():
            break
        k += step
    return torch.from_numpy(k)


def _fit(
    s: Tensor, p1: Tensor, total_sq: Tensor, free: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, int, Tensor]:
    """Lloyd on sorted nonzeros ``s [m]`` from the ascending free centres ``free [F]``: all centres
    ``c [F+1]`` ascending, the index ``nneg`` of the pinned zero among them, and the final squared
    error (float64)."""
    m, F = s.numel(), free.numel()
    nneg = int((free < 0).sum())  # the pinned zero sits between negatives and positives
    is_free = torch.ones(F + 1, dtype=torch.bool, device=s.device)
    is_free[nneg] = False
    c = torch.zeros(F + 1, dtype=torch.float32, device=s.device)  # all centres, ascending
    c[is_free] = free

    def assign(c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hi = _count_le(s, round_down_midpoints(c))  # [F] sorted counts
        hi = torch.cat([hi, hi.new_full((1,), m)])  # [F+1]: cluster i is s[lo_i:hi_i]
        lo = torch.cat([hi.new_zeros(1), hi[:-1]])
        return hi, hi - lo, p1[hi] - p1[lo]

    def sse(c: Tensor, cnt: Tensor, s1: Tensor) -> Tensor:  # sum over clusters of sum (x - c)^2
        cd = c.double()
        return total_sq - torch.where(is_free & (cnt > 0), 2 * cd * s1 - cnt * cd * cd, 0.0).sum()

    prev_err = torch.full((), float("inf"), dtype=torch.float64, device=s.device)
    prev_hi = torch.full((F + 1,), -1, dtype=torch.int64, device=s.device)
    done = torch.zeros((), dtype=torch.bool, device=s.device)
    for _ in range(max_iter):
        hi, cnt, s1 = assign(c)
        mean = torch.where(cnt > 0, s1 / cnt.clamp(min=1), c.double()).float()
        new_c = torch.where(is_free, mean, c)
        err = sse(new_c, cnt, s1)
        fixed = (hi == prev_hi).all()
        small = torch.isfinite(prev_err) & ((prev_err - err) <= tol * prev_err)
        c = torch.where(done, c, new_c)
        done = done | fixed | small
        prev_err = torch.where(done, prev_err, err)
        prev_hi = hi
    _, cnt, s1 = assign(c)
    return c, nneg, _uncancelled(s, c, sse(c, cnt, s1), total_sq)


def _uncancelled(s: Tensor, c: Tensor, err: Tensor, total_sq: Tensor) -> Tensor:
    """``err`` (``total - gain``), or where that cancels (``<= 1e-9`` of the total) the squares of ``s`` about
    its nearest centres in ``c`` summed directly."""
    if float(err) <= 1e-9 * float(total_sq):
        return (s.double() - c[torch.bucketize(s, round_down_midpoints(c))].double()).square().sum()
    return err


def _finite(total_sq: Tensor) -> bool:
    """Whether a segment is finite, from its float64 sum of squares (finite for any finite float32 values:
    at most 2^31 of them, each square <= 1.2e77): a NaN or an infinity in the segment makes it NaN or inf."""
    return bool(torch.isfinite(total_sq))


def _quantile_init(s: Tensor, K: int) -> Tensor:
    """The legacy init: midpoint quantiles ``s[((2j + 1) m) // (2K)]`` of the sorted nonzeros ``[K]``."""
    j = torch.arange(K, device=s.device)
    return s[((2 * j + 1) * s.numel()) // (2 * K)]


def compand_points(s: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """The compand points of the atom grid ``[G/4 - 1]`` (masses ``j / (G/4)``) and the ``K`` compand
    centres (masses ``(k + 1/2) / K``) over sorted nonzeros ``s [m]``: one measure, one
    :func:`.lloyd_window.compand_init` call, ``G = max(MIN_ATOMS, GRID_PER_CENTRE * K)``."""
    G = max(MIN_ATOMS, GRID_PER_CENTRE * K)
    Q = G // 4
    at = np.concatenate([np.arange(1, Q) / Q, (np.arange(K) + 0.5) / K])
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values: no refinement to speak of
        pts = compand_init(s, K, G, at=at)
    return pts[: Q - 1], pts[Q - 1 :]


def atom_bounds(s: np.ndarray, K: int, comp: np.ndarray | None = None) -> np.ndarray:
    """Atom boundaries ``[N + 1]`` (ascending, 0 to m) over sorted nonzeros ``s [m]`` for ``K`` free centres.

    With at most ``GRID_PER_CENTRE * K`` (and at least ``MIN_ATOMS``) distinct values every distinct
    value is its own atom, so the DP over atoms is exact. Otherwise the union of three grids,
    none of which splits a run of equal values: ``G/2`` equal-count quantiles (snapped to the
    start of their run), ``G/4`` points at equal steps of the compand measure that places the
    centres (:func:`.lloyd_window.compand_init`: density^(1/3), each atom capped, so about 4 atoms
    per centre wherever centres go, a far outlier's empty gap included but not filled) and ``G/4``
    uniform in the cube root of the value (for heavy tails), ``G = max(MIN_ATOMS, GRID_PER_CENTRE * K)``.
    The compand points replaced ``G/4`` points uniform in value on 2026-11-30, which a far outlier
    stretches over its gap (1.0215x the optimum on a 1e4-value outlier segment at b = 7, 1.002 now).
    ``comp``: those ``G/4 - 1`` compand points (:func:`compand_points`), when the caller has them.
    """
    m = s.size
    G = max(MIN_ATOMS, GRID_PER_CENTRE * K)
    change = s[1:] != s[:-1]
    if np.count_nonzero(change) + 1 <= G:  # one atom per run of equal values
        return np.concatenate([[0], np.flatnonzero(change) + 1, [m]])
    q = np.searchsorted(s, s[(np.arange(1, G // 2) * m) // (G // 2)], side="left")
    lo, hi = float(s[0]), float(s[-1])
    if comp is None:
        comp = compand_points(s, K)[0]
    cub = np.linspace(np.cbrt(lo), np.cbrt(hi), G // 4 + 1)[1:-1] ** 3
    grid = np.searchsorted(s, np.concatenate([comp, cub]).astype(np.float32), side="right")
    return unique_ints(np.concatenate([[0, m], q, grid]))


def _dp_init(s: Tensor, p1: Tensor, K: int) -> Tensor:
    """Free centres ``[F <= K]`` (ascending float32 means) of the exact optimum (``p1 [m + 1]``:
    float64 prefix sums of ``s``)."""
    sn, p = s.cpu().numpy(), p1.cpu().numpy()
    bounds = np.concatenate([[0], np.flatnonzero(sn[1:] != sn[:-1]) + 1, [sn.size]])
    cuts, zero, _ = dp_partition(sn, K, bounds)
    lo, hi = cuts[:-1], cuts[1:]
    keep = (hi > lo) & (np.arange(lo.size) != zero)
    means = (p[hi[keep]] - p[lo[keep]]) / (hi[keep] - lo[keep])
    return torch.from_numpy(means.astype(np.float32)).to(s.device)


def _fits(items: list[Stats], frees: list[Tensor], max_iter: int, tol: float) -> list[tuple[Tensor, int, Tensor]]:
    """:func:`_fit` of every ``(stats, free)`` pair; on CPU the finite segments run side by side
    (:func:`~.lloyd_batch.fit_many`: one numpy call per step for all of them)."""
    out: list = [None] * len(items)
    batch = []
    for j, (s, _, _) in enumerate(items):
        if s.device.type == "cpu" and bool(s[[0, -1]].isfinite().all()):
            batch.append(j)
        else:  # non-finite (NaN errors) or not on CPU
            out[j] = _fit(*items[j], frees[j], max_iter, tol)
    if batch:
        c, nneg, F, err = fit_many(
            [items[j][0].numpy() for j in batch],
            [items[j][1].numpy() for j in batch],
            np.array([float(items[j][2]) for j in batch]),
            [frees[j].numpy() for j in batch],
            max_iter,
            tol,
        )
        for r, j in enumerate(batch):
            s, _, total_sq = items[j]
            cr = torch.from_numpy(c[r, : F[r] + 1].copy())
            out[j] = (cr, int(nneg[r]), _uncancelled(s, cr, torch.tensor(err[r], dtype=torch.float64), total_sq))
    return out


def _quantize_many(
    items: list[Stats], K: int, max_iter: int, tol: float, method: str, inits: list[Tensor] | None = None
) -> list[tuple[Tensor, int, Tensor]]:
    """Centres ``c [F+1]``, zero index and error of every segment's stats in ``items`` (each with
    ``m > K``) by ``method``, the Lloyd fits side by side (:func:`_fits`); ``inits``: the fast path's,
    from :func:`_fast_inits`."""
    if method == "lloyd":
        return _fits(items, [_quantile_init(s, K) for s, _, _ in items], max_iter, tol)
    if method == "optimal":  # (the DP needs finite values: a non-finite segment's error is NaN whatever its init)
        inits = [_dp_init(s, p1, K) if _finite(tsq) else _quantile_init(s, K) for s, p1, tsq in items]
        return _fits(items, inits, 0, tol)
    if inits is None:
        raise ValueError("_quantize_many: the fast method needs its inits")
    out: list = [None] * len(items)
    exact = [j for j, init in enumerate(inits) if init.numel() == 0]  # <= K distinct nonzeros: all centres
    for j, res in zip(exact, _fits([items[j] for j in exact], [torch.unique(items[j][0]) for j in exact], 0, tol)):
        out[j] = res
    rest = [j for j, init in enumerate(inits) if init.numel() > 0]
    sub = [items[j] for j in rest]
    both = _fits(sub + sub, [inits[j] for j in rest] + [_quantile_init(s, K) for s, _, _ in sub], max_iter, tol)
    for j, a, b in zip(rest, both[: len(rest)], both[len(rest) :]):  # the refined init's fit, the legacy one's
        out[j] = a if float(a[2]) <= float(b[2]) else b  # never worse than the legacy quantizer
    return out


def _fast_inits(items: list[tuple[Tensor, Tensor]], K: int) -> list[Tensor]:
    """Free centres (ascending float32) of the fast path for every ``(s, p1)`` (sorted nonzeros with
    ``m > K`` and their prefix sums), refined side by side; an empty tensor where ``s`` has at most
    ``K`` distinct values (then they are the exact centres)."""
    out: list[Tensor] = [torch.zeros(0)] * len(items)
    probs = []
    for i, (s, p1) in enumerate(items):
        sn, p = s.cpu().numpy(), p1.cpu().numpy()
        if np.count_nonzero(sn[1:] != sn[:-1]) + 1 <= K:
            continue
        z = int(np.searchsorted(sn, 0.0))
        comp, c0 = compand_points(sn, K)  # the grid's compand points, the K centres [K] ascending
        bnd = unique_ints(np.append(atom_bounds(sn, K, comp), z))  # [G + 1]
        s64 = sn.astype(np.float64)
        sq = np.add.reduceat(np.multiply(s64, s64, out=s64), bnd[:-1])  # [G] sums of squares per atom
        p2 = np.concatenate([[0.0], np.cumsum(sq)])  # [G + 1] at the atom boundaries
        zc = int(np.searchsorted(c0, 0.0))
        c = np.insert(c0, zc, 0.0)  # [K + 1] with the pinned zero
        za = int(np.searchsorted(bnd, z))
        B = np.searchsorted(bnd, np.searchsorted(sn, (c[:-1] + c[1:]) * 0.5, side="right"))  # [K]
        B = np.concatenate([[0], B, [bnd.size - 1]])
        B[: zc + 1] = np.minimum(B[: zc + 1], za)  # the zero cluster holds the sign change
        B[zc + 1 :] = np.maximum(B[zc + 1 :], za)
        probs.append((i, bnd, p[bnd], p2, za, B, zc))
    if not probs:
        return out
    Gmax = max(pr[1].size for pr in probs)

    def pad(v: np.ndarray) -> np.ndarray:
        return np.concatenate([v, np.full(Gmax - v.size, v[-1])])

    C = np.stack([pad(pr[1].astype(np.float64)) for pr in probs])  # [S, Gmax]
    P1 = np.stack([pad(pr[2]) for pr in probs])
    P2 = np.stack([pad(pr[3]) for pr in probs])
    G = np.array([pr[1].size - 1 for pr in probs])
    za = np.array([pr[4] for pr in probs])
    B0, zc0 = np.stack([pr[5] for pr in probs]), np.array([pr[6] for pr in probs])
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values: NaN errors, as with "lloyd"
        B, zc, _ = refine_partition(C, P1, P2, G, za, B0, zc0, WINDOW, MAX_PASSES, PASS_RTOL)
    for r, pr in enumerate(probs):
        lo, hi = B[r, :-1], B[r, 1:]
        n = C[r, hi] - C[r, lo]
        keep = (n > 0) & (np.arange(K + 1) != zc[r])
        with np.errstate(invalid="ignore"):  # non-finite values (inf - inf): NaN errors (the module docstring)
            means = (P1[r, hi[keep]] - P1[r, lo[keep]]) / n[keep]
        out[pr[0]] = torch.from_numpy(np.unique(means.astype(np.float32))).to(items[pr[0]][0].device)
    return out


def _stat_batches(values: Tensor, bounds: list[int], chunk: int = CHUNK_VALUES):
    """Yield lists of ``(segment, stats)`` of the nonempty segments, up to ``chunk`` values a list."""
    batch: list[tuple[int, Stats]] = []
    size = 0
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        if a < b:
            batch.append((i, _sorted_stats(values[a:b])))
            size += b - a
        if size >= chunk:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _batch_fits(
    batch: list[tuple[int, Stats]], bits: dict[int, int], max_iter: int, tol: float, method: str
) -> dict[int, tuple[Tensor, int, Tensor]]:
    """:func:`_quantize_many` of a batch's segments with more than ``2**bits[i]`` nonzeros (side by side per b)."""
    out = {}
    for b in sorted({bits[i] for i, _ in batch}):
        todo = [(i, st) for i, st in batch if bits[i] == b and st[0].numel() > 2**b]
        inits = _fast_inits([(st[0], st[1]) for _, st in todo], 2**b) if method == "fast" else None
        for (i, _), res in zip(todo, _quantize_many([st for _, st in todo], 2**b, max_iter, tol, method, inits)):
            out[i] = res
    return out


def _lloyd_segment(x: Tensor, st: Stats, b: int, fit, book: Tensor, codes: Tensor, q: Tensor) -> Tensor:
    """Quantize one segment ``x [n]`` (its stats ``st``; ``fit``: its :func:`_quantize_many` result when it
    has more than ``2**b`` nonzeros) into ``book [NUM_SLOTS]``, ``codes [n]``, ``q [n]``; return its error."""
    s, p1, total_sq = st  # [m], [m + 1], []
    K = 2**b
    nan = x.new_full((), float("nan"), dtype=torch.float64)  # a non-finite segment's error (the module docstring)
    if s.numel() <= K:  # kept exactly
        uniq = torch.unique(s)  # sorted
        book[1 : 1 + uniq.numel()] = uniq
        nzm = x != 0
        codes.copy_(torch.where(nzm, torch.searchsorted(uniq, x) + 1, 0))
        q.copy_(x)
        return x.new_zeros((), dtype=torch.float64) if _finite(total_sq) else nan
    c, nneg, err = fit
    F = c.numel() - 1
    book[1 : 1 + nneg] = c[:nneg]
    book[1 + nneg : 1 + F] = c[nneg + 1 :]
    # slot of each sorted centre: negatives -> 1.., the zero -> 0, positives -> nneg+1..
    slot = torch.arange(F + 1, dtype=torch.int16, device=x.device) + 1
    slot[nneg:] -= 1
    slot[nneg] = 0
    pos = _bucket(x, round_down_midpoints(c))  # [n]; zeros land on the zero
    torch.index_select(slot, 0, pos, out=codes)
    torch.index_select(c, 0, pos, out=q)
    return err if _finite(total_sq) else nan


def lloyd_quantize_ref(
    values: Tensor, offsets: Tensor, bits: Tensor, max_iter: int, tol: float, method: str = "fast"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize every segment of ``values`` (reference; see the module docstring).

    Args:
        values: ``[n]`` float32, segments back to back.
        offsets: ``[S + 1]`` int64, segment ``s`` is ``values[offsets[s]:offsets[s+1]]``.
        bits: ``[S]`` int, bits per segment in 1..8.
        max_iter, tol: Lloyd iteration cap and relative-SSE tolerance (ignored by ``"optimal"``).
        method: ``"fast"`` (DP init over atoms + Lloyd), ``"optimal"`` (exact DP) or ``"lloyd"``
            (the legacy midpoint-quantile init + Lloyd); see the module docstring.
    Returns:
        ``codebook [S, 257]`` f32, ``codes [n]`` int16, ``q [n]`` f32, ``err [S]`` f32.

    Example (one segment, 1 bit: two free centres plus the pinned zero; 1.0 and 1.1 cost less at 0):
        >>> v = torch.tensor([0.0, 1.0, 1.1, 5.0, -2.0])
        >>> book, codes, q, err = lloyd_quantize_ref(v, torch.tensor([0, 5]), torch.tensor([1]), 20, 0.0)
        >>> q.tolist(), codes.tolist(), round(float(err[0]), 4)
        ([0.0, 0.0, 0.0, 5.0, -2.0], [0, 0, 0, 2, 1], 2.21)
    """
    bounds = _check_inputs(values, offsets, bits, max_iter, tol, method)
    S = bits.numel()
    book = torch.zeros(S, NUM_SLOTS, dtype=torch.float32, device=values.device)
    codes = torch.zeros(values.numel(), dtype=torch.int16, device=values.device)
    q = torch.zeros_like(values)
    err = torch.zeros(S, dtype=torch.float32, device=values.device)
    bl = dict(enumerate(bits.tolist()))
    for batch in _stat_batches(values, bounds, CHUNK_VALUES if method != "optimal" else 1):
        fits = _batch_fits(batch, bl, max_iter, tol, method)
        for i, st in batch:
            a, b = bounds[i], bounds[i + 1]
            err[i] = _lloyd_segment(values[a:b], st, bl[i], fits.get(i), book[i], codes[a:b], q[a:b])
    return book, codes, q, err


def errors_for_bits_ref(values: Tensor, offsets: Tensor, max_iter: int, tol: float, method: str = "fast") -> Tensor:
    """Squared error of every segment quantized with b = 1..8 bits, one sort per segment (reference).

    Column ``b - 1`` equals ``lloyd_quantize_ref(values, offsets, full(b), max_iter, tol, method)[3]``;
    the table is the input of a per-layer bit allocation (a knapsack over segments).

    Args:
        values: ``[n]`` float32; offsets: ``[S + 1]`` int64 (as for :func:`lloyd_quantize_ref`).
    Returns:
        ``err [S, 8]`` float32.

    Example:
        >>> e = errors_for_bits_ref(torch.randn(1000), torch.tensor([0, 400, 1000]), 20, 0.0)
        >>> e.shape, bool((e[:, 1:] <= e[:, :-1]).all())
        (torch.Size([2, 8]), True)
    """
    bounds = _check_inputs(values, offsets, None, max_iter, tol, method, "errors_for_bits")
    S = len(bounds) - 1
    err = torch.zeros(S, MAX_BITS, dtype=torch.float32, device=values.device)
    for batch in _stat_batches(values, bounds, CHUNK_VALUES if method != "optimal" else 1):
        for b in range(1, MAX_BITS + 1):
            for i, (_, _, e) in _batch_fits(batch, dict.fromkeys(range(S), b), max_iter, tol, method).items():
                err[i, b - 1] = e
        for i, (_, _, total_sq) in batch:
            if not _finite(total_sq):  # every b, kept exactly (<= 2**b nonzeros) or not
                err[i] = float("nan")
    return err


def _lloyd_fake(values: Tensor, offsets: Tensor, bits: Tensor, max_iter: int, tol: float, method: str = "fast"):
    S = bits.shape[0]
    return (
        values.new_empty(S, NUM_SLOTS),
        values.new_empty(values.shape, dtype=torch.int16),
        values.new_empty(values.shape),
        values.new_empty(S),
    )


def _errors_fake(values: Tensor, offsets: Tensor, max_iter: int, tol: float, method: str = "fast"):
    return values.new_empty(offsets.shape[0] - 1, MAX_BITS)


def _quantize_host(
    values: Tensor, offsets: Tensor, bits: Tensor, max_iter: int, tol: float, method: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lloyd_quantize_ref` on host copies, results moved back to ``values.device``."""
    out = lloyd_quantize_ref(values.cpu(), offsets.cpu(), bits.cpu(), max_iter, tol, method)
    return tuple(o.to(values.device) for o in out)


def _errors_host(values: Tensor, offsets: Tensor, max_iter: int, tol: float, method: str) -> Tensor:
    """:func:`errors_for_bits_ref` on host copies, the result moved back to ``values.device``."""
    return errors_for_bits_ref(values.cpu(), offsets.cpu(), max_iter, tol, method).to(values.device)


# "optimal" has no Triton kernel: on CUDA it runs the reference on the host (a host sync). ("fast" and "lloyd" do.)
lloyd_quantize_host = torch.library.custom_op("atmc::lloyd_quantize_host", _quantize_host, mutates_args=())
lloyd_quantize_host.register_fake(_lloyd_fake)
errors_for_bits_host = torch.library.custom_op("atmc::lloyd_errors_for_bits_host", _errors_host, mutates_args=())
errors_for_bits_host.register_fake(_errors_fake)

if HAS_TRITON:
    from .lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton
else:  # the package works without Triton: the references serve every device
    errors_for_bits_triton = lloyd_quantize_triton = None

lloyd_quantize = register_op(
    "lloyd_quantize", reference=lloyd_quantize_ref, fake=_lloyd_fake, launcher=lloyd_quantize_triton, cpu_opaque=True
)
errors_for_bits = register_op(
    "lloyd_errors_for_bits",
    reference=errors_for_bits_ref,
    fake=_errors_fake,
    launcher=errors_for_bits_triton,
    cpu_opaque=True,
)
