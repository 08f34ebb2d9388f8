"""Fused ADMM step with the global hard-threshold projection: Triton kernels and launch plumbing.

Same semantics as :func:`atmc_triton.kernels.admm.admm_step_ref`; validation and the op
registration live in ``admm.py`` (this module needs Triton, that one does not).

The threshold ``tau`` is the k-th largest ``key = bits(|wn|)`` (non-negative float32 values order
like their int32 bit patterns), found by a radix select with no sort, no ``kthvalue`` and no host
round trip. Nothing is written before every update is known to be finite, and ``wn`` is never
stored: the first pass keeps one float per element (``s``: the new momentum, or with Nesterov the
gradient) and the last pass recomputes ``wn`` from ``(w, s)`` with the same instructions (one
helper), so both see the same bits.

One step is a fixed sequence of launches whose grids depend only on ``n`` (CUDA-graph capturable);
``P`` persistent programs each own a contiguous chunk of ``tiles * BLOCK`` elements. Five launches
(two when ``k = 0`` or ``k >= n``: no select), no memset (every workspace word is written before it is read)::

    _update_kernel   read grad, w, mom, z, u -> write s; count non-finite updates; with a previous
                     tau: count keys above the band around it and append the keys inside the band to
                     the program's own segment of a buffer (no atomics in the loop); zero the histograms
    _select_kernel   level 1: choose the path. BAND if the k-th largest key lies in the band and no
                     segment overflowed, else FULL (first step, tau jumped, k changed a lot):
                     histogram of the top 11 key bits over all n (recomputing wn from w, s)
    _select_kernel   level 2: histogram of the next 10 bits among the candidates (BAND: the buffer)
    _select_kernel   level 3: ... the low 10 bits, also per program (its row)
    _write_kernel    tau's low digit and the ties to keep from level 3; read w, s (mom) -> write w,
                     mom, mask (and tau); nothing if an update was not finite

Each level first finds the previous digit from the previous histogram (every program the same way;
program 0 records it). The band is ``+-2**19`` key steps around the previous tau (3-6 % of its
value); keys relative to its low end have 20 bits, the level-2 and -3 digits, so level 1 has
nothing to do on the BAND path. Ties at tau are ranked by flat index: a program's ties are its
level-3 row at tau's digit (a BAND segment holds only its own chunk's keys), so each program knows
the ties in the chunks before its own, and only the program where the cut falls ranks inside tiles
(a cumulative sum): exactly ``k`` survive. Histograms and counts are int32 (atomics on integers are
order-independent), so results are bit-identical from run to run and across DDP ranks, and the path
taken never changes the result: the previous tau only decides how fast it is found.

Histograms use ``tl.histogram`` over 512 keys per step (8 warps): on Triton 3.6 its ballot/popcount
lowering then needs 64 registers (2048 bins) instead of 195+ for 2048 keys per step.

Bytes per element (fp32 grads; bf16/fp16 grads read 2 B less), ``f`` the fraction of elements in
the band (about 2-4 % for Gaussian-like weights at k = 10 %; at most a quarter per program chunk):

    floor (read grad, w, mom, z, u; write w, mom, mask)         29
    _update_kernel   read 20, write s 4, band keys 4f           24 + 4f
    levels 2, 3 (BAND): read the band keys                           8f
    _write_kernel    read w, s 8 (+ mom 4 with Nesterov), write 9  17 (21)
    BAND path                                                   41 + 12f   (1.41x + 0.41f x the floor)
    BAND path, Nesterov                                         45 + 12f   (1.55x + 0.41f x)
    FULL path (fallback): + 3 passes reading w, s (mom)         65 (81 with Nesterov)

Scratch memory: ``s`` (4 B per element) and the band buffer (1 B per element for large ``n``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._registry import interpreted as _interpreted_kernel
from ._registry import wrap_triton

__all__ = [
    "BAND",
    "BAND_HALF",
    "BLOCK",
    "FULL",
    "MAX_PROGRAMS",
    "SBLOCK",
    "PATH_WORD",
    "band_segment",
    "interpreted",
    "launch_admm_step",
    "launch_dual_update",
    "launch_plan",
    "workspace_size",
]

BLOCK = 1024  # elements per tile of the streaming passes: 4 per thread, one 128-bit load per input
SBLOCK = 512  # elements per histogram step (Triton 3.6's histogram codegen needs few per thread)
MAX_PROGRAMS = 256  # persistent programs: one wave at >= 2 blocks/SM on a 132-SM H100 / H200
NUM_WARPS = 8
DUAL_BLOCK = 4096
BAND_HALF = 1 << 19  # the band is [tau_key - BAND_HALF, tau_key + BAND_HALF) in key steps: 20 bits

NB1, NB2, NB3 = 2048, 1024, 1024  # radix digits of the 31 key bits (FULL path), high to low: 11, 10, 10

KEEP_ALL, KEEP_NONE, SELECT = 0, 1, 2  # projection modes (k >= n, k == 0, 0 < k < n)
FULL, BAND = 0, 1  # the path a SELECT step took (ws[PATH_WORD])

# One int32 workspace per step (torch.empty: every word is written before it is read). State words, then
# three histograms, then the tie count of each program's chunk.
# Level L of the select reads the digits found so far from words _ST_DIGITS + 2 (L - 1) and the one after,
# and writes its own at _ST_DIGITS + 2 L and the one after (a program must never read what another program
# of its launch writes).
ST_LO, ST_PATH = tl.constexpr(0), tl.constexpr(1)
_ST_DIGITS = tl.constexpr(2)
_H1 = tl.constexpr(16)
_H2 = tl.constexpr(_H1 + NB1)
_H3 = tl.constexpr(_H2 + NB2)
_PP = tl.constexpr(_H3 + NB3)  # [3, P]: per program non-finite count, keys above the band, band fill
_BAND_HALF = tl.constexpr(BAND_HALF)
_NB1, _NB2, _NB3 = tl.constexpr(NB1), tl.constexpr(NB2), tl.constexpr(NB3)
PATH_WORD = 1  # ws[PATH_WORD] is the path of a SELECT step


def workspace_size(programs: int) -> int:
    """int32 words of the workspace for ``programs`` persistent programs (no memset: every word is
    written before it is read, the histograms by the update kernel)."""
    return _PP.value + 3 * programs + programs * NB3


def band_segment(chunk: int) -> int:
    """Band buffer entries of one program whose chunk has ``chunk`` elements: a quarter of it, and all of
    a chunk of up to 4096 elements."""
    return max(chunk // 4, min(chunk, 4096))


@triton.jit
def _key(x):
    """int32 bit pattern of ``|x|`` for float32 ``x``: orders like ``|x|`` for non-NaN values."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load(ptr, offs, limit, MASKED: tl.constexpr):
    """``ptr[offs]``; full tiles load unmasked (vectorized), the ragged tail masked by ``offs < limit``."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < limit, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def _store(ptr, offs, x, limit, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=offs < limit)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def _finish(w, s, mom, lr, momentum, NESTEROV: tl.constexpr):
    """``(wn, mn)`` from ``w`` and the kept ``s`` (``mn``, or with Nesterov ``g``; then ``mom`` is the
    old momentum). The update and the write pass both call this, so both get the same bits."""
    if NESTEROV:
        mn = mom * momentum + s
        wn = w - lr * (s + momentum * mn)
    else:
        mn = s
        wn = w - lr * mn
    return wn, mn


@triton.jit
def _recompute_key(w_ptr, s_ptr, mom_ptr, offs, n, lr, momentum, NESTEROV: tl.constexpr, MASKED: tl.constexpr):
    w = _load(w_ptr, offs, n, MASKED)
    s = _load(s_ptr, offs, n, MASKED)
    mom = w  # unused without Nesterov
    if NESTEROV:
        mom = _load(mom_ptr, offs, n, MASKED)
    wn, mn = _finish(w, s, mom, lr, momentum, NESTEROV)
    return wn, mn, _key(wn)


@triton.jit
def _update_tile(
    w_ptr,
    grad_ptr,
    mom_ptr,
    z_ptr,
    u_ptr,
    s_ptr,
    seg_ptr,
    offs,
    n,
    seg,
    lr,
    momentum,
    weight_decay,
    rho,
    lo,
    hi,
    bad,
    above,
    fill,
    NESTEROV: tl.constexpr,
    HINT: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = _load(w_ptr, offs, n, MASKED)  # [BLOCK] f32
    gr = _load(grad_ptr, offs, n, MASKED).to(tl.float32)
    mom = _load(mom_ptr, offs, n, MASKED)
    z = _load(z_ptr, offs, n, MASKED)
    u = _load(u_ptr, offs, n, MASKED)
    # the reference's evaluation order: grad + wd w + rho ((w - z) + u); m = m momentum + g
    g = (gr + weight_decay * w) + rho * ((w - z) + u)
    if NESTEROV:
        s = g
    else:
        s = mom * momentum + g
    _store(s_ptr, offs, s, n, MASKED)
    wn, mn = _finish(w, s, mom, lr, momentum, NESTEROV)
    key = _key(wn)
    finite = (key < 0x7F800000) & (_key(mn) < 0x7F800000)
    if MASKED:
        valid = offs < n
        bad += (valid & ~finite).to(tl.int32)
    else:
        valid = offs >= 0
        bad += (~finite).to(tl.int32)
    if HINT:
        above += tl.sum((valid & (key >= hi)).to(tl.int32), axis=0)
        cand = valid & (key >= lo) & (key < hi)
        c = tl.sum(cand.to(tl.int32), axis=0)
        if c > 0:  # append the band's keys to this program's segment of the buffer
            pos = fill + tl.cumsum(cand.to(tl.int32), axis=0) - 1  # [BLOCK]
            tl.store(seg_ptr + pos, key, mask=cand & (pos < seg))
            fill += c
    return bad, above, fill


@triton.jit(do_not_specialize=["n", "tiles", "seg"])
def _update_kernel(
    w_ptr,  # [n] f32
    grad_ptr,  # [n] f32 / f16 / bf16
    mom_ptr,  # [n] f32
    z_ptr,  # [n] f32
    u_ptr,  # [n] f32
    s_ptr,  # [n] f32 out: the new momentum (Nesterov: the gradient)
    hint_ptr,  # [] f32: the previous tau (read when HINT)
    ws_ptr,  # i32 workspace: += non-finite count, keys above the band, band size; band low end, fills
    buf_ptr,  # [programs, seg] i32 out: keys of the band's elements, program p's in row p
    n,
    tiles,
    seg,
    programs,
    lr,
    momentum,
    weight_decay,
    rho,
    NESTEROV: tl.constexpr,
    HINT: tl.constexpr,
    NB1: tl.constexpr,
    NB2: tl.constexpr,
    NB3: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    lo = tl.full([], 0x7F800000, tl.int32)  # no band: empty (and every finite key below it)
    hi = lo
    if HINT:
        t = _key(tl.load(hint_ptr))
        ok = t < 0x7F800000  # a finite previous tau (NaN after a voided step, +inf after k = 0)
        lo = tl.where(ok, tl.maximum(t - _BAND_HALF, 0), lo)
        hi = tl.where(ok, tl.minimum(lo + 2 * _BAND_HALF, 0x7F800000), hi)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    above = tl.full([], 0, tl.int32)
    fill = tl.full([], 0, tl.int32)
    seg_ptr = buf_ptr + pid.to(tl.int64) * seg
    for t in range(tiles):
        start = (pid.to(tl.int64) * tiles + t) * BLOCK
        offs = start + lanes  # [BLOCK]
        if start + BLOCK <= n:
            bad, above, fill = _update_tile(
                w_ptr, grad_ptr, mom_ptr, z_ptr, u_ptr, s_ptr, seg_ptr, offs, n, seg, lr, momentum,
                weight_decay, rho, lo, hi, bad, above, fill, NESTEROV, HINT, False,
            )  # fmt: skip
        else:
            bad, above, fill = _update_tile(
                w_ptr, grad_ptr, mom_ptr, z_ptr, u_ptr, s_ptr, seg_ptr, offs, n, seg, lr, momentum,
                weight_decay, rho, lo, hi, bad, above, fill, NESTEROV, HINT, True,
            )  # fmt: skip
    tl.store(ws_ptr + _PP + pid, tl.sum(bad, axis=0))
    tl.store(ws_ptr + _PP + programs + pid, above)
    tl.store(ws_ptr + _PP + 2 * programs + pid, fill)
    tl.store(ws_ptr + ST_LO, lo, mask=pid == 0)
    if pid == 0:  # zero the three histograms for the select levels
        for i in range(0, NB1 + NB2 + NB3, BLOCK):
            h = i + lanes
            tl.store(ws_ptr + _H1 + h, tl.zeros([BLOCK], dtype=tl.int32), mask=h < NB1 + NB2 + NB3)


@triton.jit
def _pick(h_ptr, rank, NB: tl.constexpr):
    """Digit ``b`` of the ``rank``-th largest candidate (1 <= rank <= total) from its histogram
    ``h_ptr[NB]``, and the rank left inside bucket ``b``."""
    bins = tl.arange(0, NB)
    h = tl.load(h_ptr + bins)  # [NB]
    total = tl.sum(h, axis=0)
    at_least = total - tl.cumsum(h, axis=0) + h  # [NB] candidates with digit >= b; falls with b
    b = tl.max(tl.where(at_least >= rank, bins, -1), axis=0)
    return b, rank - tl.sum(tl.where(bins > b, h, 0), axis=0)


@triton.jit(do_not_specialize=["n", "tiles", "seg", "k", "programs"])
def _select_kernel(
    w_ptr,  # [n] f32
    s_ptr,  # [n] f32
    mom_ptr,  # [n] f32 (read with Nesterov)
    ws_ptr,  # i32 workspace: state, histograms, per-program counts and level-3 rows
    buf_ptr,  # [programs, seg] i32: keys of the band's elements, program p's in row p
    n,
    tiles,
    seg,
    k,
    programs,
    lr,
    momentum,
    NESTEROV: tl.constexpr,
    LEVEL: tl.constexpr,  # 1..3: histogram of digit LEVEL among the candidates (3: also per program)
    NB: tl.constexpr,  # bins of this level's histogram, at ws[H_OFF:H_OFF + NB]
    H_OFF: tl.constexpr,
    HI: tl.constexpr,  # candidates have (key - base) >> HI == the digits found so far
    LO: tl.constexpr,  # this level's digit is ((key - base) >> LO) & (NB - 1)
    PB: tl.constexpr,  # power of two >= programs
    BLOCK: tl.constexpr,  # the persistent kernels' tile (a program's chunk is tiles * BLOCK elements)
    SBLOCK: tl.constexpr,  # elements per histogram step (divides BLOCK)
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, SBLOCK)
    bins = tl.arange(0, NB)
    # the digits found so far: every program derives them the same way; program 0 records them
    if LEVEL == 1:
        p = tl.arange(0, PB)
        above = tl.sum(tl.load(ws_ptr + _PP + programs + p, mask=p < programs, other=0), axis=0)
        fills = tl.load(ws_ptr + _PP + 2 * programs + p, mask=p < programs, other=0)  # [PB]
        m = tl.sum(fills, axis=0)
        band = (above < k) & (k <= above + m) & (tl.max(fills, axis=0) <= seg)
        base = tl.where(band, tl.load(ws_ptr + ST_LO), 0)
        prefix = tl.full([], 0, tl.int32)
        rank = tl.where(band, k - above, k)
        tl.store(ws_ptr + ST_PATH, band.to(tl.int32), mask=pid == 0)
    else:
        band = tl.load(ws_ptr + ST_PATH) != 0
        base = tl.where(band, tl.load(ws_ptr + ST_LO), 0)
        prefix = tl.load(ws_ptr + _ST_DIGITS + 2 * (LEVEL - 1))
        rank = tl.load(ws_ptr + _ST_DIGITS + 2 * (LEVEL - 1) + 1)
        if LEVEL == 2:  # FULL: the top digit from level 1's histogram; BAND: keys - base have 20 bits
            b, left = _pick(ws_ptr + _H1, rank, _NB1)
            prefix = tl.where(band, 0, b)
            rank = tl.where(band, rank, left)
        else:
            b, rank = _pick(ws_ptr + _H2, rank, _NB2)
            prefix = (prefix << 10) | b
    tl.store(ws_ptr + _ST_DIGITS + 2 * LEVEL, prefix, mask=pid == 0)
    tl.store(ws_ptr + _ST_DIGITS + 2 * LEVEL + 1, rank, mask=pid == 0)
    acc = tl.zeros([NB], dtype=tl.int32)
    missed = tl.full([], 0, tl.int32)  # non-candidates land in bin 0 and are taken out at the end
    if band:
        if LEVEL > 1:  # this program's segment of the buffer
            fill = tl.load(ws_ptr + _PP + 2 * programs + pid)
            for i in range(0, fill, SBLOCK):
                idx = i + lanes
                v = tl.load(buf_ptr + pid.to(tl.int64) * seg + idx, mask=idx < fill, other=0) - base
                cand = (idx < fill) & ((v >> HI) == prefix)
                acc += tl.histogram(tl.where(cand, (v >> LO) & (NB - 1), 0), NB)
                missed += tl.sum((~cand).to(tl.int32), axis=0)
    else:
        for t in range(tiles * (BLOCK // SBLOCK)):
            offs = pid.to(tl.int64) * tiles * BLOCK + t * SBLOCK + lanes  # [SBLOCK]
            _, _, v = _recompute_key(w_ptr, s_ptr, mom_ptr, offs, n, lr, momentum, NESTEROV, True)
            cand = (offs < n) & ((v >> HI) == prefix)
            acc += tl.histogram(tl.where(cand, (v >> LO) & (NB - 1), 0), NB)
            missed += tl.sum((~cand).to(tl.int32), axis=0)
    acc -= tl.where(bins == 0, missed, 0)
    tl.atomic_add(ws_ptr + H_OFF + bins, acc, mask=acc != 0, sem="relaxed")
    if LEVEL == 3:  # this program's row: its ties at tau, once the write pass knows tau's low digit
        tl.store(ws_ptr + _PP + 3 * programs + pid * NB + bins, acc)


@triton.jit
def _write_tile(
    w_ptr,
    s_ptr,
    mom_ptr,
    mask_ptr,
    offs,
    limit,
    lr,
    momentum,
    tau_key,
    need,
    seen,
    partial,
    take_all,
    NESTEROV: tl.constexpr,
    MODE: tl.constexpr,
    MASKED: tl.constexpr,
):
    wn, mn, key = _recompute_key(w_ptr, s_ptr, mom_ptr, offs, limit, lr, momentum, NESTEROV, MASKED)
    if MODE == 2:  # SELECT: keep key > tau, and the first `need` ties key == tau by flat index
        tie = key == tau_key
        if MASKED:
            tie = tie & (offs < limit)
        if partial:  # the cut falls in this program's chunk: rank its ties
            rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among the ties
            keep = (key > tau_key) | (tie & (rank <= need))
            seen += tl.sum(tie.to(tl.int32), axis=0)
        else:
            keep = (key > tau_key) | (tie & take_all)
    elif MODE == 1:  # KEEP_NONE
        keep = offs < 0
    else:  # KEEP_ALL
        keep = offs >= 0
    _store(w_ptr, offs, tl.where(keep, wn, 0.0), limit, MASKED)
    _store(mom_ptr, offs, tl.where(keep, mn, 0.0), limit, MASKED)
    _store(mask_ptr, offs, keep & (wn != 0.0), limit, MASKED)
    return seen


@triton.jit(do_not_specialize=["n", "tiles", "programs"])
def _write_kernel(
    w_ptr,  # [n] f32 in/out
    s_ptr,  # [n] f32: the new momentum (Nesterov: the gradient)
    mom_ptr,  # [n] f32 in/out
    mask_ptr,  # [n] bool out
    tau_ptr,  # [] f32 out
    ws_ptr,  # i32 workspace: non-finite counts; the digits of tau, level 3's histogram and rows
    n,
    tiles,
    programs,
    lr,
    momentum,
    NESTEROV: tl.constexpr,
    MODE: tl.constexpr,
    PB: tl.constexpr,  # power of two >= programs
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    p = tl.arange(0, PB)
    ok = tl.sum(tl.load(ws_ptr + _PP + p, mask=p < programs, other=0), axis=0) == 0  # else write nothing
    limit = tl.where(ok, n, 0)  # elements [0, limit) are written
    if MODE == 2:  # tau's low digit from level 3's histogram; the ties to keep are the rank left in it
        b, need = _pick(ws_ptr + _H3, tl.load(ws_ptr + _ST_DIGITS + 7), _NB3)
        base = tl.where(tl.load(ws_ptr + ST_PATH) != 0, tl.load(ws_ptr + ST_LO), 0)
        tau_key = base + ((tl.load(ws_ptr + _ST_DIGITS + 6) << 10) | b)
        c = tl.load(ws_ptr + _PP + 3 * programs + p * _NB3 + b, mask=p < programs, other=0)  # [PB] ties per chunk
        seen = tl.sum(tl.where(p < pid, c, 0), axis=0)  # ties in the chunks before this one
        mine = tl.sum(tl.where(p == pid, c, 0), axis=0)
        partial = (seen < need) & (seen + mine > need)
        take_all = seen + mine <= need
        tau = tau_key.to(tl.float32, bitcast=True)
    else:
        tau_key = tl.full([], 0, tl.int32)
        need = tau_key
        seen = tau_key
        partial = tau_key != 0
        take_all = partial
        tau = tl.full([], 0x7F800000 if MODE == 1 else 0, tl.int32).to(tl.float32, bitcast=True)  # +inf or 0
    for t in range(tiles):
        start = (pid.to(tl.int64) * tiles + t) * BLOCK
        offs = start + lanes  # [BLOCK]
        if start + BLOCK <= limit:
            seen = _write_tile(
                w_ptr, s_ptr, mom_ptr, mask_ptr, offs, limit, lr, momentum, tau_key, need, seen, partial, take_all,
                NESTEROV, MODE, False,
            )  # fmt: skip
        else:
            seen = _write_tile(
                w_ptr, s_ptr, mom_ptr, mask_ptr, offs, limit, lr, momentum, tau_key, need, seen, partial, take_all,
                NESTEROV, MODE, True,
            )  # fmt: skip
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    tl.store(tau_ptr, tl.where(ok, tau, nan), mask=pid == 0)


@triton.jit(do_not_specialize=["n"])
def _dual_kernel(
    u_ptr,  # [n] f32 in/out
    w_ptr,  # [n] f32
    z_ptr,  # [n] f32
    n,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)  # [BLOCK]
    if start + BLOCK <= n:
        tl.store(u_ptr + offs, tl.load(u_ptr + offs) + (tl.load(w_ptr + offs) - tl.load(z_ptr + offs)))
    else:
        valid = offs < n
        u = tl.load(u_ptr + offs, mask=valid, other=0.0)
        w = tl.load(w_ptr + offs, mask=valid, other=0.0)
        z = tl.load(z_ptr + offs, mask=valid, other=0.0)
        tl.store(u_ptr + offs, u + (w - z), mask=valid)


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when imported)."""
    return _interpreted_kernel(_update_kernel)


def launch_plan(n: int, block: int = BLOCK, max_programs: int = MAX_PROGRAMS) -> tuple[int, int]:
    """``(programs, tiles per program)`` of the persistent kernels for ``n`` elements."""
    ntiles = max(triton.cdiv(n, block), 1)
    tiles = triton.cdiv(ntiles, min(ntiles, max_programs))
    return triton.cdiv(ntiles, tiles), tiles


# (bins, histogram offset, HI, LO) of select levels 1..3
_LEVELS = ((NB1, _H1.value, 31, 20), (NB2, _H2.value, 20, 10), (NB3, _H3.value, 10, 0))


def launch_admm_step(
    w: Tensor,
    grad: Tensor,
    mom: Tensor,
    z: Tensor,
    u: Tensor,
    mask: Tensor,
    s: Tensor,
    tau: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    k: int,
    nesterov: bool,
    tau_hint: Tensor | None = None,
    block: int = BLOCK,
    max_programs: int = MAX_PROGRAMS,
) -> Tensor:
    """Launch one step on validated ``[n]`` buffers; ``s [n]`` f32 and ``tau []`` f32 are caller-provided
    scratch / output. ``tau_hint`` (``[]`` f32, e.g. the previous step's tau) only chooses the path.
    Returns the int32 workspace (``ws[PATH_WORD]`` is ``BAND`` or ``FULL`` for a SELECT step).

    Example (``admm_step_triton`` in ``admm.py`` does the validation and allocation):
        >>> n = w.numel()
        >>> s, tau = torch.empty(n), torch.empty(())
        >>> ws = launch_admm_step(w, grad, mom, z, u, mask, s, tau, 0.1, 0.9, 0.0, 0.0, 5, False, tau_hint=prev)
    """
    n = w.numel()
    programs, tiles = launch_plan(n, block, max_programs)
    mode = KEEP_ALL if k >= n else KEEP_NONE if k == 0 else SELECT
    select = mode == SELECT
    hint = select and tau_hint is not None
    seg = band_segment(tiles * block) if hint else 1
    ws = torch.empty(workspace_size(programs), dtype=torch.int32, device=w.device)
    buf = torch.empty(programs * seg, dtype=torch.int32, device=w.device)
    grid = (programs,)
    common = dict(lr=float(lr), momentum=float(momentum), NESTEROV=bool(nesterov), BLOCK=block)
    wrap_triton(_update_kernel)[grid](
        w_ptr=w,
        grad_ptr=grad,
        mom_ptr=mom,
        z_ptr=z,
        u_ptr=u,
        s_ptr=s,
        hint_ptr=tau_hint if hint else tau,
        ws_ptr=ws,
        buf_ptr=buf,
        n=n,
        tiles=tiles,
        seg=seg,
        programs=programs,
        weight_decay=float(weight_decay),
        rho=float(rho),
        HINT=hint,
        NB1=NB1,
        NB2=NB2,
        NB3=NB3,
        num_warps=NUM_WARPS,
        **common,
    )
    if select:
        for level, (nb, h_off, hi, lo) in enumerate(_LEVELS, start=1):
            wrap_triton(_select_kernel)[grid](
                w_ptr=w,
                s_ptr=s,
                mom_ptr=mom,
                ws_ptr=ws,
                buf_ptr=buf,
                n=n,
                tiles=tiles,
                seg=seg,
                k=k,
                programs=programs,
                LEVEL=level,
                NB=nb,
                H_OFF=h_off,
                HI=hi,
                LO=lo,
                PB=triton.next_power_of_2(programs),
                SBLOCK=min(SBLOCK, block),
                num_warps=NUM_WARPS,
                **common,
            )
    wrap_triton(_write_kernel)[grid](
        w_ptr=w,
        s_ptr=s,
        mom_ptr=mom,
        mask_ptr=mask,
        tau_ptr=tau,
        ws_ptr=ws,
        n=n,
        tiles=tiles,
        programs=programs,
        MODE=mode,
        PB=triton.next_power_of_2(programs),
        num_warps=NUM_WARPS,
        **common,
    )
    return ws


def launch_dual_update(u: Tensor, w: Tensor, z: Tensor) -> None:
    """``u += w - z`` on validated contiguous float32 buffers of one size (one launch)."""
    n = u.numel()
    if n:
        wrap_triton(_dual_kernel)[(triton.cdiv(n, DUAL_BLOCK),)](
            u_ptr=u, w_ptr=w, z_ptr=z, n=n, BLOCK=DUAL_BLOCK, num_warps=8
        )
