"""The fast quantizer's init on the device: scans, compand init, atom grid and windowed-DP refinement.

Triton twin of the numpy path :func:`atmc_triton.kernels.lloyd._fast_inits` (with
:func:`.lloyd_window.compand_init` and :func:`.lloyd_window.refine_partition`): four launches, no
host synchronisation. ``scan_totals_kernel`` and ``scan_kernel`` give the prefix sums of the values (both
methods: ``FAST=0`` writes only those), of their squares and the distinct-run ranks of the segment-sorted
values; then one program per segment (per segment and
bit width for ``errors_for_bits``), on the segment's sorted nonzeros ``s [m]`` (zeros skipped) with
``K = 2**b`` free centres:

``fast_init_kernel`` (8 warps: 4096-wide tiles)

1. ``dcount <= K`` distinct nonzeros: they are the centres (``exact = 1``), done;
2. the compand measure: density^(1/3) over ``min(m, G_goal)`` equal-count atoms
   (``G_goal = max(512, 16 K)``), each atom's mass capped at ``COMPAND_CAP`` times its share of the
   values or two centres' worth, the larger, and at one centre per value it holds;
3. atoms: every distinct run when ``dcount <= G_goal``, else the union of equal-count quantiles,
   points at equal steps of the compand measure, a cube-root grid and the sign change
   (``tl.sort`` of ``G_goal`` positions, duplicates dropped); counts, sums and sums of squares at
   the atom boundaries come from the global prefix sums;
4. compand init: ``K`` centres at equal steps of the same measure, their midpoints snapped to atoms,
   the zero cluster around the sign change;

``fast_refine_kernel`` (4 warps, a launch of its own so that none of those tiles is live)

5. passes of the windowed DP: ``NC = 2 (2 W + 1)`` candidates per boundary (their atom counts and
   sums gathered once per pass), the Viterbi chain over the ``K + 1`` clusters (``[NCP, NCP]``
   float64 tiles, a flag for "zero cluster placed"; each step's loads issued a step ahead, the
   costs the reference skips skipped), packed backpointers in scratch, a backtrack that picks each
   backpointer from a row in registers; until nothing moves, the gain is ``<= rtol`` or
   ``max_passes``;
6. the cluster means (float32, ascending, duplicates dropped) are the init of the Lloyd kernel,
   which also runs the legacy init and keeps the lower error.

Equality with the reference: the arithmetic is the reference's formula for formula, but
prefix sums come from global float64 scans (not per-segment numpy cumsums), ``cbrt`` is
``exp2(log2(x) / 3)`` and the compand scan is a tree, so costs differ from numpy's in the last
bits and a near-tie between two partitions can resolve the other way. The launcher's contract is
therefore quality, not bits: the same SSE up to such ties (tested: ratio to the exact optimum
``<= 1.02``, never above the legacy quantizer, codes decoding to ``q``); segments kept exactly
(``<= K`` distinct nonzeros) match the reference bit for bit.

Bytes per value (device path), added to the ``"lloyd"`` path's sort and scans (which read the sorted values
twice and write the float64 prefix sums, 8 B): a byte marking segment starts (written, then read by both
scans) and 12 B written (the float64 prefix of squares, the int32 ranks). The init and the refinement
read only ``O(G + K NC passes)`` per segment (scratch: ``[P, 4104]`` int32 + 2 float64 atoms,
``[P, 264, 32]`` int32 x 3 + float64 x 2 candidates and backpointers, ``[P, 264]`` int32 x 2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lloyd_triton import _count_le, _problem, _search_steps, _segment_head  # shared with the Lloyd kernel

__all__ = [
    "GT",
    "NCP",
    "TSTRIDE",
    "ASTRIDE",
    "fast_init_kernel",
    "fast_refine_kernel",
    "scan_kernel",
    "scan_totals_kernel",
]

GT = 4096  # max(512, 16 * 256): the most atoms a segment gets (a power of two: one tile)
ASTRIDE = GT + 8  # scratch row of atom boundaries (G + 1 <= GT + 1 of them)
TSTRIDE = 264  # scratch rows of candidates and backpointers (K + 2 <= 258 boundaries)
NCP = 32  # candidates per boundary, padded (NC = 2 (2 W + 1) = 26 at W = 6)
TB = 32  # boundaries per candidate tile
KLANES = 256  # free centres
INT_MAX = tl.constexpr(2147483647)  # a global a kernel may read


@triton.jit
def _scan_terms(sorted_ptr, starts_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """One block's values and squares (float64, non-finite as 0) and, with ``FAST``, its distinct-run starts among
    nonzeros (int32; else zeros, ``starts`` not read): a nonzero starts a run at its segment's first position
    (``starts``) or where it differs from its predecessor (NaN != NaN: every NaN is a run, as with torch's ``!=``)."""
    p0 = tl.program_id(0).to(tl.int64) * BLOCK
    p = p0 + tl.arange(0, BLOCK)
    inb = p < n
    if p0 + BLOCK <= n:  # every block but the last: unmasked (128-bit) loads
        x = tl.load(sorted_ptr + p)
    else:
        x = tl.load(sorted_ptr + p, mask=inb, other=0.0)
    xf = tl.where((x == x) & (tl.abs(x) < float("inf")), x, 0.0).to(tl.float64)
    new = tl.zeros([BLOCK], tl.int32)
    if FAST:
        if p0 + BLOCK <= n:
            first = tl.load(starts_ptr + p) != 0
        else:
            first = tl.load(starts_ptr + p, mask=inb, other=0) != 0
        prev = tl.load(sorted_ptr + p - 1, mask=inb & (p > 0), other=0.0)  # (the same lines: L1)
        new = (inb & (x != 0) & (first | (x != prev))).to(tl.int32)
    return xf, xf * xf, new


@triton.jit(do_not_specialize=["n"])
def scan_totals_kernel(
    sorted_ptr,  # [n] f32: each segment ascending within its range
    starts_ptr,  # [n + 1] i8: 1 at each segment's first position (FAST only)
    s1_ptr,  # [blocks] f64 out: the block's sum of finite values
    sq_ptr,  # [blocks] f64 out: the block's sum of squares (FAST only)
    runs_ptr,  # [blocks] i32 out: the block's run starts (FAST only)
    n,
    FAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1 of the quantizer's scans (prefix sums of values; with ``FAST`` also of squares, distinct-run
    ranks): block totals."""
    xf, sq, new = _scan_terms(sorted_ptr, starts_ptr, n, FAST, BLOCK)
    tl.store(s1_ptr + tl.program_id(0), tl.sum(xf, 0))
    if FAST:
        tl.store(sq_ptr + tl.program_id(0), tl.sum(sq, 0))
        tl.store(runs_ptr + tl.program_id(0), tl.sum(new, 0))


@triton.jit(do_not_specialize=["n"])
def scan_kernel(
    sorted_ptr,  # [n] f32
    starts_ptr,  # [n + 1] i8 (FAST only)
    s1_base_ptr,  # [blocks] f64: finite values before each block (exclusive scan of pass 1's totals)
    sq_base_ptr,  # [blocks] f64: squares before each block (FAST only)
    runs_base_ptr,  # [blocks] i32: run starts before each block (FAST only)
    prefix_ptr,  # [n] f64 out: inclusive prefix sums of the values, non-finite as 0
    prefix2_ptr,  # [n] f64 out: inclusive prefix sums of squares (FAST only)
    rank_ptr,  # [n] i32 out: inclusive count of distinct-run starts among nonzeros (FAST only)
    n,
    FAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2: each block's inclusive scans plus what came before it (reads 4 B and writes 8 B per value; with
    ``FAST`` 5 B and 20 B, where the torch ops they replace moved ~114 B)."""
    xf, sq, new = _scan_terms(sorted_ptr, starts_ptr, n, FAST, BLOCK)
    p0 = tl.program_id(0).to(tl.int64) * BLOCK
    p = p0 + tl.arange(0, BLOCK)
    full = p0 + BLOCK <= n
    c1 = tl.cumsum(xf, 0) + tl.load(s1_base_ptr + tl.program_id(0))
    if full:
        tl.store(prefix_ptr + p, c1)
    else:
        tl.store(prefix_ptr + p, c1, mask=p < n)
    if FAST:
        c2 = tl.cumsum(sq, 0) + tl.load(sq_base_ptr + tl.program_id(0))
        r = tl.cumsum(new, 0) + tl.load(runs_base_ptr + tl.program_id(0))
        if full:
            tl.store(prefix2_ptr + p, c2)
            tl.store(rank_ptr + p, r)
        else:
            tl.store(prefix2_ptr + p, c2, mask=p < n)
            tl.store(rank_ptr + p, r, mask=p < n)


@triton.jit
def _gpos(j, start, zneg, nz):
    """Global position of nonzero ``j`` of the segment (``j = m`` maps to its end)."""
    return start + j + tl.where(j >= zneg, nz, 0)


@triton.jit
def _excl(ptr, p):
    """Exclusive prefix at global position ``p`` from an inclusive scan."""
    return tl.load(ptr + p - 1, mask=p > 0, other=0)


@triton.jit
def _cbrt(x):
    """Real cube root (float64)."""
    r = tl.exp2(tl.log2(tl.abs(x)) * (1.0 / 3.0))
    return tl.where(x < 0, -r, r)


@triton.jit
def _compand_at(cum_ptr, mass_ptr, idx, tq, g, m, sorted_ptr, start, zneg, nz):
    """Points (float64) at compand masses ``tq`` (lanes ``idx``, int64) of the measure in ``cum_ptr`` /
    ``mass_ptr`` (inclusive scan and masses of the ``g`` equal-count atoms): ``compand_init``'s inverse."""
    ii = _count_le(cum_ptr, idx * 0, g + idx * 0, tq, _search_steps(g), STRICT=False)
    ii = tl.minimum(ii, g - 1)
    cprev = tl.load(cum_ptr + ii - 1, mask=ii > 0, other=0.0)
    mi = tl.load(mass_ptr + ii)
    frac = tl.minimum(tl.maximum((tq - cprev) / tl.maximum(mi, 1e-300), 0.0), 1.0)
    lo_k = (ii * m) // g
    hi_k = tl.minimum(((ii + 1) * m) // g, m - 1)
    x0k = tl.load(sorted_ptr + _gpos(lo_k, start, zneg, nz)).to(tl.float64)
    xnk = tl.load(sorted_ptr + _gpos(hi_k, start, zneg, nz)).to(tl.float64)
    return x0k + frac * tl.maximum(xnk - x0k, 0.0)


@triton.jit
def _rint(x):
    """Round half to even (numpy's ``rint``) of float64 ``x >= 0``."""
    r = tl.floor(x + 0.5)
    odd = (r.to(tl.int64) % 2) == 1
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _first_min(c, mn, col, NCP: tl.constexpr):
    """Per row of ``c [R, NCP]``, the first column holding the row's minimum ``mn [R]`` (numpy's argmin;
    0 for an all-NaN row); min + compare instead of ``tl.argmin``, which the interpreter runs element-wise."""
    i = tl.min(tl.where(c == mn[:, None], col, NCP), 1)
    return tl.where(i == NCP, 0, i)


@triton.jit
def _fmax(a, b):
    return tl.maximum(a, b)


@triton.jit
def fast_init_kernel(
    sorted_ptr,  # [n] f32: each segment ascending within its range
    prefix_ptr,  # [n] f64: inclusive prefix sums of sorted
    prefix2_ptr,  # [n] f64: inclusive prefix sums of squares
    rank_ptr,  # [n] i32: inclusive count of distinct-run starts among nonzeros
    offsets_ptr,  # [S + 1] i64
    bits_ptr,  # [S] i32 (unused when ALL_BITS)
    atoms_ptr,  # [P, ASTRIDE] i32 scratch: atom boundaries (nonzero positions)
    a1_ptr,  # [P, ASTRIDE] f64 scratch: sums before each atom boundary
    a2_ptr,  # [P, ASTRIDE] f64 scratch: sums of squares before each atom boundary
    cum_ptr,  # [P, GT] f64 scratch: compand masses, inclusive scan
    mass_ptr,  # [P, GT] f64 scratch: compand masses
    bnd_ptr,  # [P, TSTRIDE] i32 scratch out: initial cluster boundaries (atom indices)
    state_ptr,  # [P, 4] i32 scratch out: G, za (atom boundary at the sign change), zero cluster, refine?
    init_ptr,  # [P, KLANES] f32 out: free centres ascending, +inf padded (exact segments)
    ninit_ptr,  # [P] i32 out: their number (exact segments)
    exact_ptr,  # [P] i32 out: 1 when they are the distinct nonzeros (error 0)
    passes_ptr,  # [P] i32 out: refinement passes run (0 here)
    ALL_BITS: tl.constexpr,  # grid (S, NBITS): bits = program_id(1) + 1
    NBITS: tl.constexpr,
    MIN_ATOMS: tl.constexpr,
    GRID_PER_CENTRE: tl.constexpr,
    COMPAND_CAP: tl.constexpr,  # an atom's compand mass is at most this many times its share of the values
    GT: tl.constexpr,
    ASTRIDE: tl.constexpr,
    TSTRIDE: tl.constexpr,
    KLANES: tl.constexpr,
):
    b, prob, K, start, end, steps, zlo, zhi = _segment_head(bits_ptr, offsets_ptr, sorted_ptr, ALL_BITS, NBITS)
    n_s = end - start
    zneg = zlo - start
    nz = zhi - zlo
    m = n_s - nz
    base = _excl(rank_ptr, start)
    last = tl.load(rank_ptr + tl.maximum(end - 1, 0), mask=n_s > 0, other=0)
    dcount = tl.where(m > 0, last - base, 0).to(tl.int64)
    klane = tl.arange(0, KLANES)
    ko = prob * KLANES
    tl.store(passes_ptr + prob, 0)
    lo_x = tl.load(sorted_ptr + start, mask=n_s > 0, other=0.0)
    hi_x = tl.load(sorted_ptr + tl.maximum(end - 1, 0), mask=n_s > 0, other=0.0)
    finite = (lo_x > -float("inf")) & (hi_x < float("inf"))  # sorted: -inf first, NaN and +inf last
    if (dcount <= K) | (~finite):  # the distinct nonzeros are the centres; non-finite: no init (legacy, NaN)
        r = klane.to(tl.int64)
        pe = _count_le(rank_ptr, start + r * 0, end + r * 0, base + r, steps, STRICT=False)
        fin_v = (r * 0 + finite.to(tl.int64)) != 0  # (a scalar & vector mask trips the interpreter)
        v = tl.load(sorted_ptr + pe, mask=(r < dcount) & fin_v, other=float("inf"))
        tl.store(init_ptr + ko + klane, v)
        tl.store(ninit_ptr + prob, tl.where(finite, dcount, 0).to(tl.int32))
        tl.store(exact_ptr + prob, finite.to(tl.int32))
        tl.store(state_ptr + prob * 4 + 3, 0)  # nothing to refine
    else:
        Gg = tl.maximum(GRID_PER_CENTRE * K, MIN_ATOMS).to(tl.int64)
        ao = prob * ASTRIDE
        lane = tl.arange(0, GT).to(tl.int64)
        # ---- 2. the compand measure (density^(1/3), 10 % by count) of the atom grid and the centres
        g = tl.minimum(m, Gg)
        valid = lane < g
        lo_i = (lane * m) // g
        hi_i = ((lane + 1) * m) // g
        cnt = (hi_i - lo_i).to(tl.float64)
        x0 = tl.load(sorted_ptr + _gpos(lo_i, start, zneg, nz), mask=valid, other=0.0).to(tl.float64)
        xn = tl.load(sorted_ptr + _gpos(tl.minimum(hi_i, m - 1), start, zneg, nz), mask=valid, other=0.0)
        w = tl.where(valid, tl.maximum(xn.to(tl.float64) - x0, 0.0), 0.0)
        raw = tl.exp2(tl.log2(cnt * w * w) * (1.0 / 3.0))
        raw = tl.where(valid & (w > 0), raw, 0.0)
        tot = tl.sum(raw, 0)
        by_cnt = cnt / m.to(tl.float64)
        share = tl.maximum(COMPAND_CAP * cnt / m.to(tl.float64), 2.0 / K.to(tl.float64))
        share = tl.minimum(share, cnt / K.to(tl.float64))  # and never more centres than values
        raw = tl.minimum(raw, share * tot)  # no atom past CAP x its share of the values or 2 centres
        tot = tl.sum(raw, 0)
        mass = tl.where(tot > 0, 0.9 * raw / tl.where(tot > 0, tot, 1.0) + 0.1 * by_cnt, by_cnt)
        mass = tl.where(valid, mass, 0.0)
        incl = tl.cumsum(mass, 0)
        total = tl.max(tl.where(valid, incl, 0.0), 0)
        go = prob * GT
        tl.store(cum_ptr + go + lane, incl)
        tl.store(mass_ptr + go + lane, mass)
        tl.debug_barrier()
        # ---- 3. atom boundaries [G + 1], ascending nonzero positions from 0 to m
        if dcount <= Gg:  # every distinct run is an atom (the sign change is a run start)
            pr = _count_le(rank_ptr, start + lane * 0, end + lane * 0, base + lane, steps, STRICT=False)
            tl.store(atoms_ptr + ao + lane, (pr - start - tl.where(pr >= zhi, nz, 0)).to(tl.int32), mask=lane < dcount)
            tl.store(atoms_ptr + ao + dcount, m.to(tl.int32))
            G = dcount
        else:  # quantiles, a compand grid and a cube-root grid, sorted, duplicates dropped
            H = Gg // 2
            Q = Gg // 4
            lo_v = tl.load(sorted_ptr + start).to(tl.float64)
            hi_v = tl.load(sorted_ptr + end - 1).to(tl.float64)
            iq = lane + 1  # quantiles 1 .. H - 1
            jq = (iq * m) // H
            vq = tl.load(sorted_ptr + _gpos(jq, start, zneg, nz), mask=lane < H - 1, other=0.0)
            pq = _count_le(sorted_ptr, start + lane * 0, end + lane * 0, vq, steps, STRICT=True)
            il = lane - (H - 1) + 1  # compand grid 1 .. Q - 1
            ic = lane - (H - 1) - (Q - 1) + 1  # cube-root grid 1 .. Q - 1
            cl = _cbrt(lo_v)
            ch = _cbrt(hi_v)
            tg = tl.minimum(tl.maximum(il, 0), Q).to(tl.float64) / Q.to(tl.float64) * total
            vl = _compand_at(cum_ptr + go, mass_ptr + go, lane, tg, g, m, sorted_ptr, start, zneg, nz)
            vc = ic.to(tl.float64) * ((ch - cl) / Q.to(tl.float64)) + cl
            vg = tl.where(lane < H - 1 + Q - 1, vl, vc * vc * vc).to(tl.float32)
            pg = _count_le(sorted_ptr, start + lane * 0, end + lane * 0, vg, steps, STRICT=False)
            pos = tl.where(lane < H - 1, pq, pg)
            pos = pos - start - tl.where(pos >= zhi, nz, 0)
            pos = tl.where(lane == Gg - 3, 0, tl.where(lane == Gg - 2, m, tl.where(lane == Gg - 1, zneg, pos)))
            pos = tl.where(lane < Gg, pos, INT_MAX).to(tl.int32)
            srt = tl.sort(pos, 0)
            prv = tl.gather(srt, tl.maximum(lane - 1, 0).to(tl.int32), 0)
            first = (srt != INT_MAX) & ((lane == 0) | (srt != prv))
            at = tl.cumsum(first.to(tl.int32), 0) - 1
            tl.store(atoms_ptr + ao + at, srt, mask=first)
            G = (tl.sum(first.to(tl.int32), 0) - 1).to(tl.int64)
        tl.debug_barrier()
        for ch0 in range(0, G + 1, GT):  # sums and sums of squares at the atom boundaries
            ia = ch0 + lane
            inr_a = ia <= G
            aa = tl.load(atoms_ptr + ao + ia, mask=inr_a, other=0).to(tl.int64)
            gp = _gpos(aa, start, zneg, nz)
            tl.store(a1_ptr + ao + ia, _excl(prefix_ptr, gp) - _excl(prefix_ptr, start), mask=inr_a)
            tl.store(a2_ptr + ao + ia, _excl(prefix2_ptr, gp) - _excl(prefix2_ptr, start), mask=inr_a)
        za = _count_le(atoms_ptr + ao, G * 0, G + 1, zneg.to(tl.int32), _search_steps(G + 1), STRICT=True)
        k = klane.to(tl.int64)
        kin = k < K
        # ---- 4. compand init: K centres at the masses (k + 1/2) / K
        tq = (k.to(tl.float64) + 0.5) / K.to(tl.float64) * total
        c0v = _compand_at(cum_ptr + go, mass_ptr + go, k, tq, g, m, sorted_ptr, start, zneg, nz)
        c0v = tl.where(kin, c0v, float("inf"))
        # ---- initial boundaries: midpoints of the centres (zero inserted), snapped to atoms
        zc = tl.sum((kin & (c0v < 0)).to(tl.int32), 0)
        c_nx = tl.gather(c0v, tl.minimum(klane + 1, KLANES - 1), 0)
        c_pv = tl.gather(c0v, tl.maximum(klane - 1, 0), 0)
        c_lo = tl.where(klane < zc, c0v, tl.where(klane == zc, 0.0, c_pv))
        c_hi = tl.where(klane + 1 < zc, c_nx, tl.where(klane + 1 == zc, 0.0, c0v))
        mid = (c_lo + c_hi) * 0.5
        pm = _count_le(sorted_ptr, start + k * 0, end + k * 0, mid, steps, STRICT=False)
        pm = (pm - start - tl.where(pm >= zhi, nz, 0)).to(tl.int32)
        bk = _count_le(atoms_ptr + ao, k * 0, G + 1 + k * 0, pm, _search_steps(G + 1), STRICT=True)
        bk = tl.where(klane + 1 <= zc, tl.minimum(bk, za), tl.maximum(bk, za)).to(tl.int32)
        bo = prob * TSTRIDE
        tl.store(bnd_ptr + bo + 1 + klane, bk, mask=kin)
        tl.store(bnd_ptr + bo, 0)
        tl.store(bnd_ptr + bo + K + 1, G.to(tl.int32))
        tl.store(state_ptr + prob * 4, G.to(tl.int32))
        tl.store(state_ptr + prob * 4 + 1, za.to(tl.int32))
        tl.store(state_ptr + prob * 4 + 2, zc)
        tl.store(state_ptr + prob * 4 + 3, 1)  # refine
        tl.store(exact_ptr + prob, 0)


@triton.jit
def _pick(row, col, x):
    """``row[x]`` of a ``[NCP]`` int32 row held in registers (a warp reduction, no dependent load)."""
    return tl.sum(tl.where(col == x, row, 0), 0)


@triton.jit(do_not_specialize=["max_passes"])
def fast_refine_kernel(
    bits_ptr,  # [S] i32 (unused when ALL_BITS)
    state_ptr,  # [P, 4] i32: G, za, zero cluster, refine? (from fast_init_kernel)
    atoms_ptr,  # [P, ASTRIDE] i32: atom boundaries (nonzero positions)
    a1_ptr,  # [P, ASTRIDE] f64: sums before each atom boundary
    a2_ptr,  # [P, ASTRIDE] f64: sums of squares before each atom boundary
    bnd_ptr,  # [P, TSTRIDE] i32 scratch: current cluster boundaries (atom indices)
    win_ptr,  # [P, TSTRIDE, NCP] i32 scratch: candidates
    wn_ptr,  # [P, TSTRIDE, NCP] i32 scratch: atoms[candidate]
    w1_ptr,  # [P, TSTRIDE, NCP] f64 scratch: a1[candidate]
    w2_ptr,  # [P, TSTRIDE, NCP] f64 scratch: a2[candidate]
    bp_ptr,  # [P, TSTRIDE, NCP] i32 scratch: backpointers arg0 | arg1 << 5 | zero flag << 10
    rng_ptr,  # [P, TSTRIDE] i32 scratch: each boundary's smallest | largest candidate << 16
    init_ptr,  # [P, KLANES] f32 out: free centres ascending, +inf padded
    ninit_ptr,  # [P] i32 out: their number
    passes_ptr,  # [P] i32 out: refinement passes run
    rtol,  # f64: a pass must gain more than rtol * cost to continue
    max_passes,  # i32
    ALL_BITS: tl.constexpr,  # grid (S, NBITS): bits = program_id(1) + 1
    NBITS: tl.constexpr,
    W: tl.constexpr,  # half window
    ASTRIDE: tl.constexpr,
    TSTRIDE: tl.constexpr,
    NCP: tl.constexpr,
    TB: tl.constexpr,
    KLANES: tl.constexpr,
):
    """Steps 5 and 6 of the module docstring for the programs :func:`fast_init_kernel` left to refine.

    A launch of its own, so that none of the init's 4096-wide tensors is live here (few registers,
    no spill moves). Every load of a Viterbi step is issued one step ahead (the candidates' atom
    counts and sums are gathered once per pass, with the candidates), and the backtrack picks each
    backpointer from a prefetched row in registers, so neither chain waits on memory.
    """
    tl.static_assert(NCP <= 32)
    tl.static_assert(2 * (2 * W + 1) < NCP)  # a pad column, holding the boundary before the pass
    tl.static_assert(W >= 1)  # (the spread's 2 W + 1 points need two ends, as refine_partition requires)
    _, _, prob, K = _problem(bits_ptr, ALL_BITS, NBITS)
    so = prob * 4
    if tl.load(state_ptr + so + 3) != 0:
        G32 = tl.load(state_ptr + so)
        za = tl.load(state_ptr + so + 1)
        zcur = tl.load(state_ptr + so + 2)
        ao = prob * ASTRIDE
        bo = prob * TSTRIDE
        wo = prob * TSTRIDE * NCP
        ko = prob * KLANES
        klane = tl.arange(0, KLANES)
        T = K + 2
        ocol = tl.arange(0, NCP)
        NC: tl.constexpr = 2 * (2 * W + 1)
        ip = ocol[None, :]  # previous candidate (columns)
        inx = ocol[:, None]  # next candidate (rows)
        prev_cost = tl.zeros((), tl.float64) + float("inf")
        passes = tl.zeros((), tl.int32)
        active = tl.zeros((), tl.int32) + 1
        while (active != 0) & (passes < max_passes):
            passes += 1
            tl.debug_barrier()
            for t0 in range(0, T, TB):  # candidates [T, NCP] and their atom counts and sums
                tt = t0 + tl.arange(0, TB)[:, None]
                o = ocol[None, :]
                inr_c = tt < T
                Bt = tl.load(bnd_ptr + bo + tt, mask=inr_c, other=0)
                Bp = tl.load(bnd_ptr + bo + tl.maximum(tt - 1, 0), mask=inr_c, other=0)
                Bn = tl.load(bnd_ptr + bo + tl.minimum(tt + 1, T - 1), mask=inr_c, other=0)
                local = tl.minimum(tl.maximum(Bt + o - W, 0), G32)
                lo = tl.maximum(tl.minimum(Bp, Bt - W), 0).to(tl.float64)
                hi = tl.minimum(tl.maximum(Bn, Bt + W), G32).to(tl.float64)
                j = (o - (2 * W + 1)).to(tl.float64)
                spread = _rint(lo + j / (2 * W) * (hi - lo)).to(tl.int32)
                spread = tl.where((o == 2 * W + 1) & (tt == 1), tl.minimum(G32, 1), spread)  # the end atoms
                spread = tl.where((o == NC - 1) & (tt == T - 2), tl.maximum(G32 - 1, 0), spread)
                s_lo = tl.where(tt == 1, tl.minimum(G32, 1), lo.to(tl.int32))  # the spread's ends
                s_hi = tl.where(tt == T - 2, tl.maximum(G32 - 1, 0), hi.to(tl.int32))
                local = tl.where(o == 0, tl.minimum(s_lo + 1, s_hi), local)  # one atom inside each end
                local = tl.where(o == 2 * W, tl.maximum(s_hi - 1, s_lo), local)
                cand = tl.where(o < 2 * W + 1, local, tl.where(o < NC, spread, Bt))
                cand = tl.where(tt == 0, 0, tl.where(tt == T - 1, G32, cand))
                at = wo + tt * NCP + o
                tl.store(win_ptr + at, cand, mask=inr_c)
                tl.store(wn_ptr + at, tl.load(atoms_ptr + ao + cand, mask=inr_c, other=0), mask=inr_c)
                tl.store(w1_ptr + at, tl.load(a1_ptr + ao + cand, mask=inr_c, other=0.0), mask=inr_c)
                tl.store(w2_ptr + at, tl.load(a2_ptr + ao + cand, mask=inr_c, other=0.0), mask=inr_c)
                rng = tl.min(cand, 1) | (tl.max(cand, 1) << 16)  # [TB] (the pad columns repeat B[t])
                tl.store(rng_ptr + bo + t0 + tl.arange(0, TB), rng, mask=t0 + tl.arange(0, TB) < T)
            tl.debug_barrier()
            V0 = tl.where(ocol < NC, 0.0, float("inf")).to(tl.float64)
            V1 = tl.zeros([NCP], tl.float64) + float("inf")
            pa = wo + ip  # row 0 as the previous boundary, row 1 as the next one
            a, an, a1, a2 = tl.load(win_ptr + pa), tl.load(wn_ptr + pa), tl.load(w1_ptr + pa), tl.load(w2_ptr + pa)
            pb = wo + NCP + inx
            bb, bn, b1, b2 = tl.load(win_ptr + pb), tl.load(wn_ptr + pb), tl.load(w1_ptr + pb), tl.load(w2_ptr + pb)
            ra = tl.load(rng_ptr + bo)
            rb = tl.load(rng_ptr + bo + 1)
            for t in range(0, T - 1):
                nrb = tl.load(rng_ptr + bo + tl.minimum(t + 2, T - 1))
                pa = wo + (t + 1) * NCP + ip  # the next step's rows, loaded while this one computes
                na, nan, na1, na2 = (
                    tl.load(win_ptr + pa),
                    tl.load(wn_ptr + pa),
                    tl.load(w1_ptr + pa),
                    tl.load(w2_ptr + pa),
                )
                pb = wo + tl.minimum(t + 2, T - 1) * NCP + inx
                nb, nbn, nb1, nb2 = (
                    tl.load(win_ptr + pb),
                    tl.load(wn_ptr + pb),
                    tl.load(w1_ptr + pb),
                    tl.load(w2_ptr + pb),
                )
                # [NCP, NCP]: the reference's costs (+ 0 or + inf), with one select per element instead
                ok = (a <= bb) & (ip < NC) & (inx < NC)  # a boundary not before its predecessor, no pad
                s1 = b1 - a1
                s2 = b2 - a2
                nf = tl.maximum(bn - an, 1).to(tl.float64)  # (= max(n, 1.0): counts are integers)
                free = tl.where(ok, tl.maximum(s2 - s1 * s1 / nf, 0.0), float("inf"))
                c1 = V1[None, :] + free
                m1 = tl.min(c1, 1)
                i1 = _first_min(c1, m1, ip, NCP)
                # as the reference: V0 only while a candidate of boundary t + 1 is at or before za (else
                # it is inf), the zero cluster only where row t's candidates start at or before za and
                # row t + 1's end at or after it (elsewhere every such cost is inf: skipped, same result)
                if (rb & 65535) <= za:
                    c0 = V0[None, :] + free
                    m0 = tl.min(c0, 1)
                    i0 = _first_min(c0, m0, ip, NCP)
                else:
                    m0 = tl.zeros_like(m1) + float("inf")
                    i0 = tl.zeros_like(i1)
                if ((ra & 65535) <= za) & (za <= (rb >> 16)):
                    zero = tl.where(ok & (a <= za) & (za <= bb), s2, float("inf"))
                    cz = V0[None, :] + zero
                    mz = tl.min(cz, 1)
                    iz = _first_min(cz, mz, ip, NCP)
                    use_z = mz < m1
                    V1 = tl.where(use_z, mz, m1)
                    i1 = tl.where(use_z, iz, i1)
                    zf = use_z.to(tl.int32)
                else:
                    V1 = m1
                    zf = tl.zeros_like(i1)
                tl.store(bp_ptr + wo + (t + 1) * NCP + ocol, i0 | (i1 << 5) | (zf << 10))
                V0 = m0
                a, an, a1, a2 = na, nan, na1, na2
                bb, bn, b1, b2 = nb, nbn, nb1, nb2
                ra, rb = rb, nrb
            tl.debug_barrier()
            cost = tl.min(V1, 0)
            x = tl.min(tl.where(V1 == cost, ocol, NCP), 0)
            x = tl.where(x == NCP, 0, x)
            flag = x * 0 + 1
            zero_at = x * 0
            moved = x * 0
            ro = wo + (T - 1) * NCP + ocol
            row = tl.load(win_ptr + ro) | (tl.load(bp_ptr + ro) << 13)  # candidate | backpointers << 13
            for ib in range(0, T - 1):  # backtrack from the last boundary
                tb = T - 1 - ib
                ro = wo + tl.maximum(tb - 1, 1) * NCP + ocol  # the next step's row, loaded ahead
                nrow = tl.load(win_ptr + ro) | (tl.load(bp_ptr + ro) << 13)
                pk = _pick(row, ocol, x)
                bt = pk & 8191
                # the boundary before this pass is the row's pad column (never a load of bnd, which this loop
                # writes: a warp one step ahead would store bnd[tb - 1] before a lagging warp read it, and the
                # warps would disagree on `moved`, leave the pass loop apart and desynchronize its barriers)
                moved = moved | (bt != (_pick(row, ocol, NCP - 1) & 8191)).to(tl.int32)
                tl.store(bnd_ptr + bo + tb, bt)
                zh = flag & ((pk >> 23) & 1)
                zero_at = tl.where(zh != 0, tb - 1, zero_at)
                x = tl.where(flag != 0, (pk >> 18) & 31, (pk >> 13) & 31)
                flag = flag & (1 - zh)
                row = nrow
            moved = moved | (zero_at != zcur).to(tl.int32)
            zcur = zero_at
            active = (moved != 0) & ((prev_cost - cost) > rtol * cost)
            active = active.to(tl.int32)
            prev_cost = cost
        tl.store(passes_ptr + prob, passes)
        tl.debug_barrier()
        # ---- 6. cluster means: float32, ascending, duplicates dropped
        count = tl.zeros((), tl.int32)
        run_max = tl.zeros((), tl.float32) - float("inf")
        for t0 in range(0, K + 1, KLANES):
            tc = t0 + klane
            inr_m = tc <= K
            blo = tl.load(bnd_ptr + bo + tc, mask=inr_m, other=0)
            bhi = tl.load(bnd_ptr + bo + tc + 1, mask=inr_m, other=0)
            cn = tl.load(atoms_ptr + ao + bhi, mask=inr_m, other=0) - tl.load(atoms_ptr + ao + blo, mask=inr_m, other=0)
            sm = tl.load(a1_ptr + ao + bhi, mask=inr_m, other=0.0) - tl.load(a1_ptr + ao + blo, mask=inr_m, other=0.0)
            keep = inr_m & (cn > 0) & (tc != zcur)
            mean = (sm / tl.maximum(cn, 1).to(tl.float64)).to(tl.float32)
            kv = tl.where(keep, mean, -float("inf"))
            cmax = tl.associative_scan(kv, 0, _fmax)
            before = tl.where(klane == 0, run_max, tl.maximum(tl.gather(cmax, tl.maximum(klane - 1, 0), 0), run_max))
            new = keep & (mean > before)
            at_m = count + tl.cumsum(new.to(tl.int32), 0) - 1
            tl.store(init_ptr + ko + at_m, mean, mask=new)
            count += tl.sum(new.to(tl.int32), 0)
            run_max = tl.maximum(run_max, tl.max(kv, 0))
        tl.store(init_ptr + ko + klane, tl.zeros([KLANES], tl.float32) + float("inf"), mask=klane >= count)
        tl.store(ninit_ptr + prob, count)
