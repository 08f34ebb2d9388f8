"""Segmented Lloyd quantizer: Triton kernels and launchers (every segment in one Lloyd launch).

Same semantics and output layout as :func:`atmc_triton.kernels.lloyd.lloyd_quantize_ref`.
The launcher is pure torch ops plus ``wrap_triton`` kernels, so it traces under
``torch.compile(fullgraph=True)``:

1. segmented sort (:mod:`.lloyd_split_triton`): one float32 ``torch.sort`` of all values, then a stable
   split by segment (two Triton launches; the torch fix-up past 1,024 segments) leaves every segment
   ascending in its own range ``[offsets[s], offsets[s+1])`` (zeros included, in the middle of the segment);
2. float64 inclusive prefix sums of the sorted buffer (two scan launches of :mod:`.lloyd_window_triton`, which for
   ``"fast"`` also write the prefix sums of squares and the distinct-run ranks), and per-segment sums of squares;
3. ONE Lloyd launch, one program per segment (``[S, 8]`` programs for :func:`errors_for_bits`),
   every iteration in registers: 256 lanes hold the free centres, each iteration is a binary
   search of the float32 round-down midpoints over the segment's sorted values plus
   prefix-sum differences (O(K log n)); per-segment convergence, no host synchronisation;
4. an elementwise pass that writes codes and q in the original order by searching each value
   against its segment's midpoints.

``method="fast"`` adds, between 2 and 3, the init and refinement launches of :mod:`.lloyd_window_triton`; the
Lloyd launch then also runs from that init and keeps the lower error. ``method="optimal"`` runs the reference on
host copies.

Floating point: means are float64 prefix-sum differences rounded to float32, like the
reference. The prefix sums are taken over the whole sorted buffer (not restarted per
segment) and in a different order than the reference's, so a centre can differ from the
reference by one float32 ulp where a float64 mean lies within rounding noise of a float32
rounding boundary; that is rare and only moves codes of values within an ulp of a midpoint.
The error is ``total_sq - gain`` (float64); where that is ``<= 1e-9 total_sq`` (it cancels: a tiny error
beside large values) the Lloyd launch sums the squares about the centres directly instead, as the
reference does (``_uncancelled``: a branch of the same launch, no extra one; for ``"fast"`` both fits'
errors before the lower is kept). Non-finite values follow
the reference's rule (:mod:`.lloyd`'s docstring): the segment's error is NaN.

Bytes per value (float32 values, at most 256 segments; ``bench/model.py``'s ``lloyd_quantize``
counts the same launches), read + written:

    floor (read the values, write int16 codes and float32 q)                       10
    index fill of the first sort                                                  8
    torch.sort, float32 keys + int64 indices (4 radix passes of 8 bits)          100
    the split by segment (.lloyd_split_triton; its torch fix-up moved ~85)      ~21
    the scans: prefix sums (read 4 twice, write 8), sums of squares (read 4)      20
    Lloyd launch: O(S K log n) binary-search loads per iteration                 ~0
    codes pass (read values, write codes and q)                                   10
    total, method "lloyd"                                                       ~159   (16x the floor)
    method "fast": + segment starts 1 (read twice), squares and ranks 12,
    init and refinement ~3                                                      ~177   (18x)

(nan_to_num and ``cumsum(dtype=float64)`` moved 40 B for the prefix sums until 2026-12-02.)
The segmented sort (index fill to the split) is ~129 of them: a design with one full sort cannot come
near this floor (README, "Static GPU gate, roofline predictions and the one-shot GPU check"); the split
is bound by what it issues rather than by its bytes (``bench/sort_rank.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._registry import interpreted, metadata_only, no_data, wrap_triton

__all__ = ["errors_for_bits_triton", "lloyd_quantize_triton"]

LANES = 256  # 2**8: free centres (and midpoints) per segment, one lane each
NUM_SLOTS = LANES + 1  # codebook row: the zero in slot 0, free centres in 1..K
NBITS = 8  # bit widths 1..8
SPLIT = 32  # programs per segment for the sum of squares
SUMSQ_BLOCK = 1024
CODES_BLOCK = 1024
LLOYD_WARPS = 4
FAST_WARPS = 8  # the fast init kernel: 4096-wide atom tiles
REFINE_WARPS = 4  # its refinement kernel: [32, 32] candidate-pair tiles
SCAN_BLOCK = 1024  # values per program of the fast path's two scans


@triton.jit
def _search_steps(length):
    """Steps of a halving search that settle any window of ``length`` elements (scalar)."""
    return tl.ceil(tl.log2(length.to(tl.float32) + 1.0)).to(tl.int32) + 2  # + slack for log2 rounding


@triton.jit
def _count_le(data_ptr, lo, hi, target, steps, STRICT: tl.constexpr):
    """Per lane, the first position in ``[lo, hi)`` whose value is ``> target`` (``>= target``
    when ``STRICT``), for ascending data there; lanes with ``lo == hi`` load nothing."""
    for _ in range(steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        v = tl.load(data_ptr + mid, mask=active, other=0)
        if STRICT:
            go_right = v < target
        else:
            go_right = v <= target
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & (~go_right), mid, hi)
    return lo


@triton.jit
def _round_down_f32(x):
    """Largest float32 ``<= x`` for float64 ``x`` (finite)."""
    r = x.to(tl.float32)  # round to nearest
    bits = r.to(tl.int32, bitcast=True)
    # one ulp towards -inf: |r| grows for negatives (and -0.0), shrinks for positives
    down = tl.where(bits < 0, bits + 1, bits - 1).to(tl.float32, bitcast=True)
    return tl.where(r.to(tl.float64) > x, down, r)


@triton.jit
def _prefix(prefix_ptr, p, mask):
    """Sum of the sorted buffer before global position ``p`` (float64), from inclusive prefix sums."""
    return tl.load(prefix_ptr + p - 1, mask=mask & (p > 0), other=0.0)


@triton.jit
def _assign(sorted_ptr, prefix_ptr, start, n_s, steps, F, K, nneg, LANES: tl.constexpr):
    """Boundaries, counts and sums of the clusters of the free centres ``F [LANES]``.

    The ``K + 1`` sorted centres are ``F[:nneg], 0, F[nneg:K]``. Returns the round-down
    midpoints (``+inf`` past ``K``), each midpoint's boundary (sorted values ``<=`` it, relative
    to ``start``), and per free centre its cluster's count and float64 sum.
    """
    lane = tl.arange(0, LANES)
    act = lane < K
    f_prev = tl.gather(F, tl.maximum(lane - 1, 0), 0)
    f_next = tl.gather(F, tl.minimum(lane + 1, LANES - 1), 0)
    c_lo = tl.where(lane < nneg, F, tl.where(lane == nneg, 0.0, f_prev))  # centre i
    c_hi = tl.where(lane + 1 < nneg, f_next, tl.where(lane + 1 == nneg, 0.0, F))  # centre i + 1
    mid = _round_down_f32((c_lo.to(tl.float64) + c_hi.to(tl.float64)) * 0.5)
    mid = tl.where(act, mid, float("inf"))
    end = start + n_s
    bound = _count_le(sorted_ptr, tl.where(act, start, end), end + lane * 0, mid, steps, STRICT=False)
    rel = (bound - start).to(tl.int32)  # [LANES]
    r_prev = tl.gather(rel, tl.maximum(lane - 1, 0), 0)
    r_next = tl.gather(rel, tl.minimum(lane + 1, LANES - 1), 0)
    n32 = n_s.to(tl.int32)
    # free centre f is sorted centre f (f < nneg) or f + 1 (f >= nneg)
    lo = tl.where(lane < nneg, tl.where(lane == 0, 0, r_prev), rel)
    hi = tl.where(lane < nneg, rel, tl.where(lane + 1 >= K, n32, r_next))
    cnt = hi - lo
    s1 = _prefix(prefix_ptr, start + hi, act) - _prefix(prefix_ptr, start + lo, act)
    return mid, rel, cnt, s1


@triton.jit
def _gain(F, cnt, s1, act):
    """``sum over free clusters of 2 c s1 - cnt c^2`` in float64 (the SSE is total_sq - gain)."""
    cd = tl.where(act, F, 0.0).to(tl.float64)  # padding lanes hold +inf
    term = 2.0 * cd * s1 - cnt.to(tl.float64) * cd * cd
    return tl.sum(tl.where(act & (cnt > 0), term, 0.0), 0)


@triton.jit
def _iterate(F, Keff, sorted_ptr, prefix_ptr, start, n_s, steps, total_sq, tol, max_iter, skip, LANES: tl.constexpr):
    """Lloyd from the free centres ``F [LANES]`` (ascending, ``Keff`` of them, +inf padded) until a fixed
    point, a relative SSE drop ``<= tol`` or ``max_iter``; returns the centres, the pinned zero's place
    among them (fixed by the init, as in the reference) and their float64 SSE."""
    lane = tl.arange(0, LANES)
    act = lane < Keff
    nneg = tl.sum((act & (F < 0)).to(tl.int32), 0)
    prev_rel = tl.full([LANES], -1, tl.int32)
    prev_err = tl.zeros((), tl.float64) + float("inf")
    done = skip.to(tl.int32)
    it = tl.zeros((), tl.int32)
    while (it < max_iter) & (done == 0):
        mid, rel, cnt, s1 = _assign(sorted_ptr, prefix_ptr, start, n_s, steps, F, Keff, nneg, LANES)
        mean = (s1 / tl.maximum(cnt, 1).to(tl.float64)).to(tl.float32)
        F = tl.where(act & (cnt > 0), mean, F)  # an empty cluster keeps its centre
        err = total_sq - _gain(F, cnt, s1, act)
        fixed = tl.sum((act & (rel != prev_rel)).to(tl.int32), 0) == 0
        finite = prev_err < float("inf")
        prev = tl.where(finite, prev_err, 0.0)  # (avoids 0 * inf)
        small = finite & ((prev - err) <= tol * prev)
        done = (fixed | small).to(tl.int32)
        prev_err = err
        prev_rel = rel
        it += 1
    mid, rel, cnt, s1 = _assign(sorted_ptr, prefix_ptr, start, n_s, steps, F, Keff, nneg, LANES)
    return F, nneg, total_sq - _gain(F, cnt, s1, act)


@triton.jit
def _direct_sse(sorted_ptr, start, end, F, Keff, nneg, LANES: tl.constexpr):
    """The SSE of the segment's sorted values ``[start, end)`` about their nearest centres, summed directly in
    float64 (the reference's ``_uncancelled``): the centres ``F[:nneg], 0, F[nneg:Keff]``, each value's the
    count of round-down midpoints below it (ties to the lower centre), as in :func:`_assign` and the codes pass.
    O(n K) work for one segment: only where ``total_sq - gain`` cancels (:func:`_lloyd_kernel`)."""
    lane = tl.arange(0, LANES)
    f_prev = tl.gather(F, tl.maximum(lane - 1, 0), 0)
    f_next = tl.gather(F, tl.minimum(lane + 1, LANES - 1), 0)
    c_lo = tl.where(lane < nneg, F, tl.where(lane == nneg, 0.0, f_prev))  # sorted centre i
    c_hi = tl.where(lane + 1 < nneg, f_next, tl.where(lane + 1 == nneg, 0.0, F))  # sorted centre i + 1
    mid = _round_down_f32((c_lo.to(tl.float64) + c_hi.to(tl.float64)) * 0.5)
    mid = tl.where(lane < Keff, mid, float("inf"))  # [LANES]
    acc = tl.zeros([LANES], tl.float64)
    for off in range(start, end, LANES):
        p = off + lane
        inb = p < end
        x = tl.load(sorted_ptr + p, mask=inb, other=0.0)
        k = tl.zeros([LANES], tl.int32)  # midpoints below x: 2 * LANES virtual slots, +inf past LANES
        for i in tl.static_range(9):
            step = LANES >> i
            probe = k + step - 1
            mv = tl.where(probe < LANES, tl.gather(mid, tl.minimum(probe, LANES - 1), 0), float("inf"))
            k = tl.where(mv < x, k + step, k)
        f_k = tl.gather(F, tl.minimum(k, LANES - 1), 0)
        f_k1 = tl.gather(F, tl.maximum(k - 1, 0), 0)
        c = tl.where(k < nneg, f_k, tl.where(k == nneg, 0.0, f_k1))  # sorted centre k
        d = x.to(tl.float64) - c.to(tl.float64)
        acc += tl.where(inb, d * d, 0.0)
    return tl.sum(acc, 0)


@triton.jit
def _uncancelled(err, total_sq, exact, sorted_ptr, start, end, F, Keff, nneg, LANES: tl.constexpr):
    """``err`` (``total_sq - gain``, float64), or where that cancels (``<= 1e-9`` of ``total_sq``: a tiny error
    beside large values, where a float64 rounding of the total can pass it) the error summed directly
    (:func:`_direct_sse`), as the reference's ``lloyd._uncancelled`` does: a rare branch of the Lloyd launch, no
    extra launch. Not for a segment kept exactly (error 0) nor a non-finite one (error NaN)."""
    if (err <= 1e-9 * total_sq) & (total_sq < float("inf")) & (exact.to(tl.int32) == 0):
        err = _direct_sse(sorted_ptr, start, end, F, Keff, nneg, LANES)
    return err


@triton.jit
def _problem(bits_ptr, ALL_BITS: tl.constexpr, NBITS: tl.constexpr):
    """This program's ``(seg, b, prob, K)``: segment, bits, problem index (segment, or segment x bits when
    ``ALL_BITS``: grid ``(S, NBITS)``, bits ``program_id(1) + 1``) and free centres ``2**b``."""
    seg = tl.program_id(0)
    if ALL_BITS:
        b = tl.program_id(1) + 1
        prob = seg * NBITS + b - 1
    else:
        b = tl.load(bits_ptr + seg)
        prob = seg
    K = (b * 0 + 1) << b  # i32 scalar
    return seg, b, prob, K


@triton.jit
def _segment_head(bits_ptr, offsets_ptr, sorted_ptr, ALL_BITS: tl.constexpr, NBITS: tl.constexpr):
    """This program's problem: ``(b, prob, K, start, end, steps, zlo, zhi)``: bits, problem index (segment,
    or segment x bits when ``ALL_BITS``), free centres, the segment's range, the halving-search steps
    that settle it, and the range ``[zlo, zhi)`` of its zeros in the sorted buffer."""
    seg, b, prob, K = _problem(bits_ptr, ALL_BITS, NBITS)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    steps = _search_steps(end - start)
    zlo = _count_le(sorted_ptr, start, end, 0.0, steps, STRICT=True)  # first value >= 0
    zhi = _count_le(sorted_ptr, zlo, end, 0.0, steps, STRICT=False)  # first value > 0
    return b, prob, K, start, end, steps, zlo, zhi


@triton.jit(do_not_specialize=["max_iter"])
def _lloyd_kernel(
    sorted_ptr,  # [n] f32: each segment ascending within its range
    prefix_ptr,  # [n] f64: inclusive prefix sums of sorted
    sumsq_ptr,  # [S, SPLIT] f64: partial sums of squares
    offsets_ptr,  # [S + 1] i64
    bits_ptr,  # [S] i32 (unused when ALL_BITS)
    tol_ptr,  # [1] f64
    init_ptr,  # [P, LANES] f32: the fast init's free centres, +inf padded (FAST only)
    ninit_ptr,  # [P] i32: their number (FAST only)
    iexact_ptr,  # [P] i32: 1 when they are the distinct nonzeros (FAST only)
    book_ptr,  # [S, LANES + 1] f32 out
    mids_ptr,  # [S, LANES] f32 out: round-down midpoints, +inf padded
    nneg_ptr,  # [S] i32 out: negative free centres
    err_ptr,  # [S] f32 out, or [S, NBITS] when ALL_BITS
    max_iter,  # i32
    ALL_BITS: tl.constexpr,  # grid (S, NBITS): bits = program_id(1) + 1, only err is written
    FAST: tl.constexpr,  # also run Lloyd from the fast init (P = S, or S * NBITS when ALL_BITS); keep the lower SSE
    NBITS: tl.constexpr,
    SPLIT: tl.constexpr,
    LANES: tl.constexpr,
):
    seg = tl.program_id(0)
    b, prob, K, start, end, steps, zlo, zhi = _segment_head(bits_ptr, offsets_ptr, sorted_ptr, ALL_BITS, NBITS)
    n_s = end - start
    zneg = zlo - start
    m = n_s - (zhi - zlo)  # nonzeros
    lane = tl.arange(0, LANES)
    j = lane.to(tl.int64)
    if FAST:  # the init kernel found <= K distinct nonzeros (m <= K included): they are the centres
        exact = tl.load(iexact_ptr + prob) != 0
    else:
        exact = m <= K
    exact_v = (j * 0 + exact.to(tl.int32)) != 0  # [LANES] copy (a scalar & vector mask trips the interpreter)

    # kept exactly: the free centres are the distinct nonzeros (m <= K <= LANES of them)
    inr = exact_v & (j < m)
    v = tl.load(sorted_ptr + tl.where(j < zneg, start + j, zhi + (j - zneg)), mask=inr, other=float("inf"))
    v_prev = tl.gather(v, tl.maximum(lane - 1, 0), 0)
    first = inr & ((lane == 0) | (v != v_prev))
    csum = tl.cumsum(first.to(tl.int32), 0)  # [LANES], non-decreasing
    n_uniq = tl.sum(first.to(tl.int32), 0)
    at = tl.zeros([LANES], tl.int32)  # lane r: index of the (r+1)-th distinct value = #{csum <= r}
    for i in tl.static_range(8):
        step = LANES >> (i + 1)
        at = tl.where(tl.gather(csum, at + step - 1, 0) <= lane, at + step, at)
    f_exact = tl.where(lane < n_uniq, tl.gather(v, at, 0), float("inf"))

    # Lloyd: midpoint-quantile init over the sorted nonzeros
    idx = ((2 * j + 1) * m) // (2 * K)
    f_init = tl.load(
        sorted_ptr + tl.where(idx < zneg, start + idx, zhi + (idx - zneg)),
        mask=(lane < K) & (~exact_v),
        other=float("inf"),
    )
    total_sq = tl.sum(tl.load(sumsq_ptr + seg * SPLIT + tl.arange(0, SPLIT)), 0)
    tol = tl.load(tol_ptr)
    Fa, nn_a, err_a = _iterate(
        f_init, K, sorted_ptr, prefix_ptr, start, n_s, steps, total_sq, tol, max_iter, exact, LANES
    )
    err_a = _uncancelled(err_a, total_sq, exact, sorted_ptr, start, end, Fa, K, nn_a, LANES)
    if FAST:
        Kb = tl.load(ninit_ptr + prob)
        Fb = tl.load(init_ptr + prob * LANES + lane)
        Fb, nn_b, err_b = _iterate(
            Fb, Kb, sorted_ptr, prefix_ptr, start, n_s, steps, total_sq, tol, max_iter, exact, LANES
        )
        err_b = _uncancelled(err_b, total_sq, exact, sorted_ptr, start, end, Fb, Kb, nn_b, LANES)
        use_b = exact | (err_b <= err_a)  # never worse than the legacy init
    else:
        Kb = n_uniq
        Fb = f_exact
        nn_b = tl.sum(((lane < n_uniq) & (f_exact < 0)).to(tl.int32), 0)
        err_b = err_a
        use_b = exact
    use_v = (j * 0 + use_b.to(tl.int32)) != 0
    F = tl.where(use_v, Fb, Fa)  # [LANES] ascending, +inf padded
    Keff = tl.where(use_b, Kb, K)
    act = lane < Keff
    nneg = tl.where(use_b, nn_b, nn_a)
    err = tl.where(exact, 0.0, tl.where(use_b, err_b, err_a))  # (both uncancelled before the choice, as in lloyd)
    # the non-finite rule (lloyd's module docstring): a NaN or an infinity makes total_sq NaN or inf (float64 sums
    # of finite float32 squares stay finite), and the segment's error NaN, kept exactly or not
    err = tl.where(total_sq < float("inf"), err, float("nan"))
    if ALL_BITS:
        tl.store(err_ptr + seg * NBITS + b - 1, err.to(tl.float32))
    else:
        mid, rel, cnt, s1 = _assign(sorted_ptr, prefix_ptr, start, n_s, steps, F, Keff, nneg, LANES)
        tl.store(mids_ptr + seg * LANES + lane, mid)
        tl.store(book_ptr + seg * (LANES + 1) + 1 + lane, tl.where(act, F, 0.0))
        tl.store(book_ptr + seg * (LANES + 1), 0.0)
        tl.store(nneg_ptr + seg, nneg)
        tl.store(err_ptr + seg, err.to(tl.float32))


@triton.jit
def _sumsq_kernel(
    sorted_ptr,  # [n] f32
    offsets_ptr,  # [S + 1] i64
    out_ptr,  # [S, SPLIT] f64 out
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros([BLOCK], tl.float64)
    # BLOCK-aligned chunks (unmasked 128-bit loads inside the segment; masked at its two ends)
    for off in range((start // BLOCK) * BLOCK + part * BLOCK, end, SPLIT * BLOCK):
        off = tl.multiple_of(off, BLOCK)
        p = off + tl.arange(0, BLOCK)
        if (off >= start) & (off + BLOCK <= end):
            x = tl.load(sorted_ptr + p)
        else:
            x = tl.load(sorted_ptr + p, mask=(p >= start) & (p < end), other=0.0)
        x = x.to(tl.float64)
        acc += x * x
    tl.store(out_ptr + seg * SPLIT + part, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["n", "S"])
def _codes_kernel(
    values_ptr,  # [n] f32, original order
    offsets_ptr,  # [S + 1] i64
    mids_ptr,  # [S, LANES] f32
    nneg_ptr,  # [S] i32
    book_ptr,  # [S, LANES + 1] f32
    codes_ptr,  # [n] i16 out
    q_ptr,  # [n] f32 out
    n,  # i64 / i32
    S,  # i32
    LANES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    p0 = tl.program_id(0).to(tl.int64) * BLOCK
    p = p0 + tl.arange(0, BLOCK)
    inb = p < n
    full = p0 + BLOCK <= n  # every block but the last: unmasked (128-bit) loads and stores
    if full:
        x = tl.load(values_ptr + p)
    else:
        x = tl.load(values_ptr + p, mask=inb, other=0.0)
    # segment of p: number of offsets[1..S] that are <= p
    lo = tl.full([BLOCK], 1, tl.int64)
    hi = tl.where(inb, S + 1, 1).to(tl.int64)
    seg = _count_le(offsets_ptr, lo, hi, p, _search_steps(tl.zeros((), tl.int32) + S), STRICT=False) - 1
    seg = tl.where(inb, seg, 0)
    # sorted centre of x: number of midpoints < x (ties go to the lower centre)
    row = mids_ptr + seg * LANES
    k = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(9):  # 2 * LANES virtual slots, +inf past LANES
        step = LANES >> i
        probe = k + step - 1
        mv = tl.load(row + probe, mask=inb & (probe < LANES), other=float("inf"))
        k = tl.where(mv < x, k + step, k)
    nn = tl.load(nneg_ptr + seg, mask=inb, other=0)
    code = tl.where(k < nn, k + 1, tl.where(k == nn, 0, k))
    q = tl.load(book_ptr + seg * (LANES + 1) + code, mask=inb, other=0.0)
    if full:
        tl.store(codes_ptr + p, code.to(tl.int16))
        tl.store(q_ptr + p, q)
    else:
        tl.store(codes_ptr + p, code.to(tl.int16), mask=inb)
        tl.store(q_ptr + p, q, mask=inb)


def _check(values: Tensor, offsets: Tensor, bits: Tensor | None, max_iter: int, tol: float, name: str) -> None:
    """The reference's checks (:func:`.lloyd.check_arguments`, always; :func:`.lloyd.check_values`, eager only:
    they read offsets and bits back) plus the kernels' own: at most ``2**31 - 1`` values, one device."""
    from .lloyd import check_arguments, check_values

    check_arguments(values, offsets, bits, max_iter, tol, name)
    if values.numel() >= 2**31:
        raise ValueError(f"{name}: at most 2**31 - 1 values per call, got {values.numel()}")
    for t, what in ((offsets, "offsets"), (bits, "bits")):
        if t is not None and t.device != values.device:
            raise ValueError(f"{name}: {what} is on {t.device}, values on {values.device}")
    if _skip_value_checks(values):
        return  # value checks read tensors back: skipped under tracing and CUDA-graph capture
    if not (values.device.type == "cuda" or (values.device.type == "cpu" and _interpreted())):
        raise ValueError(
            f"{name}: the Triton kernels need CUDA tensors (or CPU with TRITON_INTERPRET=1), got {values.device}"
        )
    check_values(values, offsets, bits, name)  # always (offsets [k != 0] with no values too): kernels index with them


def _dense(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous (a copy of a strided view; the kernels index flat memory). Non-tensors pass through."""
    return t.contiguous() if isinstance(t, Tensor) else t


def _skip_value_checks(values: Tensor) -> bool:
    """Without data (meta or fake tensors, tracing: :func:`._registry.no_data`) or under CUDA-graph capture the
    value checks (which read tensors back) and the device check are skipped."""
    return no_data(values) or (values.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return interpreted(_lloyd_kernel)


def _segment_sort(values: Tensor, offsets: Tensor) -> Tensor:
    """``values`` with each segment sorted ascending in place of its range: ``[n]`` float32
    (:mod:`.lloyd_split_triton`: one ``torch.sort``, then the Triton split by segment)."""
    from . import lloyd_split_triton as ls

    if _interpreted() and values.numel() > ls.INTERPRETED_MAX:  # the same bits (the interpreter's tl.sort is slow)
        return ls.segment_sort_ref(values, offsets)
    return ls.segment_sort(values, offsets)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation (tests poison it with NaN / sentinels to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _prepare(values: Tensor, offsets: Tensor, fast: bool) -> tuple[Tensor, ...]:
    """``(srt, prefix, sumsq, prefix2, rank)``: the segment-sorted values, the float64 inclusive prefix sums of
    their finite values, ``[S, SPLIT]`` partial sums of squares and, with ``fast``, the scans of
    :func:`_scans` (else ``None``)."""
    S = offsets.numel() - 1
    srt = _segment_sort(values, offsets)
    prefix, prefix2, rank = _scans(srt, offsets, fast)  # one segment's NaN must not reach the next: as 0
    sumsq = _new((S, SPLIT), torch.float64, values.device)
    if S:
        wrap_triton(_sumsq_kernel)[(S, SPLIT)](
            sorted_ptr=srt, offsets_ptr=offsets, out_ptr=sumsq, SPLIT=SPLIT, BLOCK=SUMSQ_BLOCK
        )
    return srt, prefix, sumsq, prefix2, rank


def _scans(srt: Tensor, offsets: Tensor, fast: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(prefix [n] f64, prefix2 [n] f64, rank [n] i32)`` of the segment-sorted ``srt``: inclusive prefix sums of
    the values and (``fast``) of their squares, non-finite values as 0, and (``fast``) inclusive counts of
    distinct-run starts among the nonzeros (a run starts at each segment's first position and wherever a value
    differs from its predecessor); ``prefix2`` and ``rank`` are ``None`` without ``fast``. Two launches of
    :mod:`.lloyd_window_triton` (block totals, then block scans plus what precedes them): they replace
    ``nan_to_num`` and ``cumsum(dtype=float64)`` (a cast, then a scan)."""
    from . import lloyd_window_triton as wt

    n, dev = srt.numel(), srt.device
    blocks = triton.cdiv(n, SCAN_BLOCK)
    prefix = _new((n,), torch.float64, dev)
    prefix2, rank = (_new((n,), torch.float64, dev), _new((n,), torch.int32, dev)) if fast else (None, None)
    if not n:
        return prefix, prefix2, rank
    s1 = _new((blocks,), torch.float64, dev)
    unused = _new((1,), torch.float64, dev)  # (the outputs a scan without fast does not write: no aliasing)
    sq, runs, starts = unused, unused, srt  # (starts: not read without fast)
    if fast:
        sq, runs = _new((blocks,), torch.float64, dev), _new((blocks,), torch.int32, dev)
        starts = torch.zeros(n + 1, dtype=torch.int8, device=dev)  # (empty segments at the end mark n)
        starts.index_fill_(0, offsets[:-1], 1)  # (not starts[...] = 1: on CUDA that copies a host scalar, a sync)
    args = {"sorted_ptr": srt, "starts_ptr": starts, "n": n, "FAST": fast, "BLOCK": SCAN_BLOCK}
    wrap_triton(wt.scan_totals_kernel)[(blocks,)](s1_ptr=s1, sq_ptr=sq, runs_ptr=runs, **args)
    s1_base, sq_base, runs_base = torch.cumsum(s1, 0) - s1, unused, unused
    if fast:
        sq_base, runs_base = torch.cumsum(sq, 0) - sq, (torch.cumsum(runs, 0) - runs).to(torch.int32)
    wrap_triton(wt.scan_kernel)[(blocks,)](
        s1_base_ptr=s1_base, sq_base_ptr=sq_base, runs_base_ptr=runs_base, prefix_ptr=prefix,
        prefix2_ptr=unused if prefix2 is None else prefix2, rank_ptr=unused if rank is None else rank, **args,
    )  # fmt: skip
    return prefix, prefix2, rank


def _fast_init(
    srt: Tensor, prefix: Tensor, prefix2: Tensor, rank: Tensor, offsets: Tensor, bits: Tensor | None
) -> tuple[Tensor, ...]:
    """The fast path's init on the device (:mod:`.lloyd_window_triton`): ``init [P, LANES]`` f32 free
    centres (+inf padded), ``ninit [P]``, ``exact [P]`` and ``passes [P]`` int32, with ``P = S``, or
    ``S * NBITS`` (row ``s * NBITS + b - 1``) when ``bits`` is None."""
    from . import lloyd_window_triton as wt
    from .lloyd import GRID_PER_CENTRE, MAX_PASSES, MIN_ATOMS, PASS_RTOL, WINDOW
    from .lloyd_window import COMPAND_CAP

    S, dev = offsets.numel() - 1, srt.device
    P = S if bits is not None else S * NBITS
    i32, f64 = torch.int32, torch.float64
    init, ninit, exact, passes = _new((P, LANES), torch.float32, dev), *(_new((P,), i32, dev) for _ in range(3))
    grid = (S,) if bits is not None else (S, NBITS)
    bits32 = bits.to(i32) if bits is not None else rank
    atoms, a1, a2 = _new((P, wt.ASTRIDE), i32, dev), _new((P, wt.ASTRIDE), f64, dev), _new((P, wt.ASTRIDE), f64, dev)
    bnd, state = _new((P, wt.TSTRIDE), i32, dev), _new((P, 4), i32, dev)
    wrap_triton(wt.fast_init_kernel)[grid](
        sorted_ptr=srt, prefix_ptr=prefix, prefix2_ptr=prefix2, rank_ptr=rank, offsets_ptr=offsets,
        bits_ptr=bits32, atoms_ptr=atoms, a1_ptr=a1, a2_ptr=a2, cum_ptr=_new((P, wt.GT), f64, dev),
        mass_ptr=_new((P, wt.GT), f64, dev), bnd_ptr=bnd, state_ptr=state, init_ptr=init, ninit_ptr=ninit,
        exact_ptr=exact, passes_ptr=passes, ALL_BITS=bits is None, NBITS=NBITS, MIN_ATOMS=MIN_ATOMS,
        GRID_PER_CENTRE=GRID_PER_CENTRE, COMPAND_CAP=COMPAND_CAP, GT=wt.GT, ASTRIDE=wt.ASTRIDE,
        TSTRIDE=wt.TSTRIDE, KLANES=LANES,
        num_warps=FAST_WARPS,
    )  # fmt: skip
    rows = (P, wt.TSTRIDE * wt.NCP)
    wrap_triton(wt.fast_refine_kernel)[grid](
        bits_ptr=bits32, state_ptr=state, atoms_ptr=atoms, a1_ptr=a1, a2_ptr=a2, bnd_ptr=bnd,
        win_ptr=_new(rows, i32, dev), wn_ptr=_new(rows, i32, dev), w1_ptr=_new(rows, f64, dev),
        w2_ptr=_new(rows, f64, dev), bp_ptr=_new(rows, i32, dev), rng_ptr=_new((P, wt.TSTRIDE), i32, dev),
        init_ptr=init, ninit_ptr=ninit,
        passes_ptr=passes, rtol=PASS_RTOL, max_passes=MAX_PASSES, ALL_BITS=bits is None, NBITS=NBITS, W=WINDOW,
        ASTRIDE=wt.ASTRIDE, TSTRIDE=wt.TSTRIDE, NCP=wt.NCP, TB=wt.TB, KLANES=LANES, num_warps=REFINE_WARPS,
    )  # fmt: skip
    return init, ninit, exact, passes


def lloyd_quantize_triton(
    values: Tensor, offsets: Tensor, bits: Tensor, max_iter: int, tol: float, method: str = "fast"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton launcher of ``atmc::lloyd_quantize`` (same contract as the reference).

    ``"lloyd"`` and ``"fast"`` run on the device with no host synchronisation after the eager-only
    value checks (``"fast"``: the init and refinement kernels of :mod:`.lloyd_window_triton`, then Lloyd from it and
    from the legacy init, the lower SSE kept); ``"optimal"`` (the exact DP, no kernel) runs the
    reference on host copies through ``atmc::lloyd_quantize_host``.

    Example:
        >>> v = torch.tensor([0.0, 1.0, 1.1, 5.0, -2.0], device="cuda")
        >>> book, codes, q, err = lloyd_quantize_triton(v, torch.tensor([0, 5], device="cuda"),
        ...                                             torch.tensor([1], device="cuda"), 20, 0.0)
    """
    from .lloyd import check_method, lloyd_quantize_host

    check_method(method)
    values, offsets, bits = _dense(values), _dense(offsets), _dense(bits)  # views are read as the reference reads them
    _check(values, offsets, bits, max_iter, tol, "lloyd_quantize")  # every method: bad input fails alike
    if method == "optimal":
        return lloyd_quantize_host(values, offsets, bits, max_iter, tol, method)
    n, S, dev = values.numel(), bits.numel(), values.device
    book = _new((S, NUM_SLOTS), torch.float32, dev)
    codes = _new((n,), torch.int16, dev)
    q = _new((n,), torch.float32, dev)
    err = _new((S,), torch.float32, dev)
    if S == 0 or metadata_only(values, _interpreted(), "atmc lloyd kernels"):
        return book, codes, q, err
    fast = method == "fast"
    srt, prefix, sumsq, prefix2, rank = _prepare(values, offsets, fast)
    mids = _new((S, LANES), torch.float32, dev)
    nneg = _new((S,), torch.int32, dev)
    tol_t = torch.full((1,), tol, dtype=torch.float64, device=dev)
    init, ninit, iexact, _ = _fast_init(srt, prefix, prefix2, rank, offsets, bits) if fast else (nneg,) * 4
    wrap_triton(_lloyd_kernel)[(S,)](
        sorted_ptr=srt, prefix_ptr=prefix, sumsq_ptr=sumsq, offsets_ptr=offsets, bits_ptr=bits.to(torch.int32),
        tol_ptr=tol_t, init_ptr=init, ninit_ptr=ninit, iexact_ptr=iexact, book_ptr=book, mids_ptr=mids,
        nneg_ptr=nneg, err_ptr=err, max_iter=max_iter, ALL_BITS=False, FAST=fast, NBITS=NBITS, SPLIT=SPLIT,
        LANES=LANES, num_warps=LLOYD_WARPS,
    )  # fmt: skip
    if n:
        wrap_triton(_codes_kernel)[(triton.cdiv(n, CODES_BLOCK),)](
            values_ptr=values, offsets_ptr=offsets, mids_ptr=mids, nneg_ptr=nneg, book_ptr=book, codes_ptr=codes,
            q_ptr=q, n=n, S=S, LANES=LANES, BLOCK=CODES_BLOCK, num_warps=4,
        )  # fmt: skip
    return book, codes, q, err


def errors_for_bits_triton(values: Tensor, offsets: Tensor, max_iter: int, tol: float, method: str = "fast") -> Tensor:
    """Triton launcher of ``atmc::lloyd_errors_for_bits``: ``[S, 8]`` float32 errors for b = 1..8, one sort
    (``method`` as for :func:`lloyd_quantize_triton`)."""
    from .lloyd import check_method, errors_for_bits_host

    check_method(method, "errors_for_bits")
    values, offsets = _dense(values), _dense(offsets)
    _check(values, offsets, None, max_iter, tol, "errors_for_bits")
    if method == "optimal":
        return errors_for_bits_host(values, offsets, max_iter, tol, method)
    S, dev = offsets.numel() - 1, values.device
    err = _new((S, NBITS), torch.float32, dev)
    if S == 0 or metadata_only(values, _interpreted(), "atmc lloyd kernels"):
        return err
    fast = method == "fast"
    srt, prefix, sumsq, prefix2, rank = _prepare(values, offsets, fast)
    tol_t = torch.full((1,), tol, dtype=torch.float64, device=dev)
    unused = _new((1,), torch.int32, dev)  # codebook / midpoint / nneg outputs are not written here
    init, ninit, iexact, _ = _fast_init(srt, prefix, prefix2, rank, offsets, None) if fast else (unused,) * 4
    wrap_triton(_lloyd_kernel)[(S, NBITS)](
        sorted_ptr=srt, prefix_ptr=prefix, sumsq_ptr=sumsq, offsets_ptr=offsets, bits_ptr=unused, tol_ptr=tol_t,
        init_ptr=init, ninit_ptr=ninit, iexact_ptr=iexact, book_ptr=unused, mids_ptr=unused, nneg_ptr=unused,
        err_ptr=err, max_iter=max_iter, ALL_BITS=True, FAST=fast, NBITS=NBITS, SPLIT=SPLIT, LANES=LANES,
        num_warps=LLOYD_WARPS,
    )  # fmt: skip
    return err
