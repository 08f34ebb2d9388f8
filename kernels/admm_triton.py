"""Fused ADMM step with the global hard-threshold projection: Triton kernels and launch plumbing.

Same semantics as :func:`atmc_triton.kernels.admm.admm_step_ref`; validation and the op
registration live in ``admm.py`` (this module needs Triton, that one does not).

The threshold is a radix select over the float32 bit patterns of ``|w|`` (non-negative
floats order like their int32 bits), 31 bits split into digits of 11, 10 and 10 bits, with
no sort, no ``kthvalue`` and no host round trip. One step is a fixed sequence of launches
whose grids depend only on ``n`` (CUDA-graph capturable)::

    zero workspace (one memset)
    _update_kernel      read grad, w, mom, z, u     -> write wn, mn (scratch); histogram of the top digit;
                                                       count non-finite updates
    _scan_kernel        find the top digit of the k-th largest |wn| and its rank inside that bucket
    _refine_kernel      read wn: histogram of the middle digit inside the chosen bucket
    _scan_kernel        ... the middle digit
    _refine_kernel      read wn: histogram of the low digit, per program and in total
    _scan_kernel        ... the low digit: tau's exact bits, the ties to keep, and per-program tie
                        offsets (an exclusive scan of the per-program tie counts)
    _write_kernel       read wn, mn -> write w, mom, mask (and tau); nothing if an update was not finite

Every kernel but the scans is persistent: program ``p`` owns the contiguous chunk
``[p * tiles * BLOCK, (p + 1) * tiles * BLOCK)`` and walks it tile by tile, so ties at tau
are ranked by flat index with a per-program offset plus an in-tile cumulative sum: exactly
``k`` survive, deterministically. Histograms are int32 counts (atomics on integers are
order-independent), so the result is bit-identical from run to run (DDP ranks agree).

Bytes per element with fp32 grads: 28 (update) + 4 + 4 (refinements) + 17 (write) = 53,
against a floor of 29 (read grad, w, mom, z, u; write w, mom, mask): 1.83x the floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

__all__ = ["BLOCK", "MAX_PROGRAMS", "interpreted", "launch_admm_step", "launch_dual_update", "launch_plan"]

BLOCK = 2048  # elements per tile
MAX_PROGRAMS = 512  # programs of the persistent kernels (fixed: the grid depends on n only)
NUM_WARPS = 8
DUAL_BLOCK = 4096

D1, D2, D3 = 11, 10, 10  # radix digits of the 31 magnitude bits, high to low
NB1, NB2, NB3 = 1 << D1, 1 << D2, 1 << D3

KEEP_ALL, KEEP_NONE, SELECT = 0, 1, 2  # projection modes (k >= n, k == 0, 0 < k < n)

# One int32 workspace per step, zeroed by one memset; kernels get its base pointer and these offsets:
# [0:4] state: the digits of tau found so far (then tau's bits), the rank left inside them (then the
# ties to keep), the count of non-finite updates, padding; three histograms; [P] tie offsets (ties
# before each program's chunk); [P, NB3] per-program histograms of the low digit.
_H1 = 4
_H2 = _H1 + NB1
_H3 = _H2 + NB2
_TIES = _H3 + NB3


@triton.jit
def _magnitude_bits(x):
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
def _update_tile(
    w_ptr,
    grad_ptr,
    mom_ptr,
    z_ptr,
    u_ptr,
    wn_ptr,
    mn_ptr,
    offs,
    n,
    lr,
    momentum,
    weight_decay,
    rho,
    acc,
    bad,
    outside,
    NESTEROV: tl.constexpr,
    HIST: tl.constexpr,
    NB: tl.constexpr,
    SHIFT: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = _load(w_ptr, offs, n, MASKED)  # [BLOCK] f32
    gr = _load(grad_ptr, offs, n, MASKED).to(tl.float32)
    m = _load(mom_ptr, offs, n, MASKED)
    z = _load(z_ptr, offs, n, MASKED)
    u = _load(u_ptr, offs, n, MASKED)
    # the reference's evaluation order: grad + wd w + rho ((w - z) + u); m = m momentum + g
    g = (gr + weight_decay * w) + rho * ((w - z) + u)
    m = m * momentum + g
    if NESTEROV:
        w = w - lr * (g + momentum * m)
    else:
        w = w - lr * m
    _store(wn_ptr, offs, w, n, MASKED)
    _store(mn_ptr, offs, m, n, MASKED)
    wb = _magnitude_bits(w)
    finite = (wb < 0x7F800000) & (_magnitude_bits(m) < 0x7F800000)
    key = wb >> SHIFT  # [BLOCK] the top digit
    if MASKED:
        valid = offs < n
        bad += (valid & ~finite).to(tl.int32)
        key = tl.where(valid, key, 0)  # lanes past n land in bin 0 ...
        outside += tl.sum((~valid).to(tl.int32), axis=0)  # ... and are taken out at the end
    else:
        bad += (~finite).to(tl.int32)
    if HIST:
        acc += tl.histogram(key, NB)
    return acc, bad, outside


@triton.jit(do_not_specialize=["n", "tiles"])
def _update_kernel(
    w_ptr,  # [n] f32
    grad_ptr,  # [n] f32 / f16 / bf16
    mom_ptr,  # [n] f32
    z_ptr,  # [n] f32
    u_ptr,  # [n] f32
    wn_ptr,  # [n] f32 out: w after the gradient step, before the projection
    mn_ptr,  # [n] f32 out: momentum after the gradient step
    ws_ptr,  # i32 workspace: += histogram of the top digit of |wn| at H_OFF, += non-finite count at 2
    n,
    tiles,
    lr,
    momentum,
    weight_decay,
    rho,
    NESTEROV: tl.constexpr,
    HIST: tl.constexpr,
    NB: tl.constexpr,
    SHIFT: tl.constexpr,
    H_OFF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    acc = tl.zeros([NB], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    outside = tl.full([], 0, tl.int32)
    for t in range(tiles):
        start = (pid.to(tl.int64) * tiles + t) * BLOCK
        offs = start + lanes  # [BLOCK]
        if start + BLOCK <= n:
            acc, bad, outside = _update_tile(
                w_ptr,
                grad_ptr,
                mom_ptr,
                z_ptr,
                u_ptr,
                wn_ptr,
                mn_ptr,
                offs,
                n,
                lr,
                momentum,
                weight_decay,
                rho,
                acc,
                bad,
                outside,
                NESTEROV,
                HIST,
                NB,
                SHIFT,
                False,
            )
        else:
            acc, bad, outside = _update_tile(
                w_ptr,
                grad_ptr,
                mom_ptr,
                z_ptr,
                u_ptr,
                wn_ptr,
                mn_ptr,
                offs,
                n,
                lr,
                momentum,
                weight_decay,
                rho,
                acc,
                bad,
                outside,
                NESTEROV,
                HIST,
                NB,
                SHIFT,
                True,
            )
    tl.atomic_add(ws_ptr + 2, tl.sum(bad, axis=0), sem="relaxed")
    if HIST:
        acc -= tl.where(bins == 0, outside, 0)
        tl.atomic_add(ws_ptr + H_OFF + bins, acc, sem="relaxed")


@triton.jit
def _refine_tile(
    wn_ptr, offs, n, prefix, acc, missed, HI: tl.constexpr, LO: tl.constexpr, NB: tl.constexpr, MASKED: tl.constexpr
):
    bits = _magnitude_bits(_load(wn_ptr, offs, n, MASKED))  # [BLOCK]
    cand = (bits >> HI) == prefix
    if MASKED:
        cand = cand & (offs < n)
    acc += tl.histogram(tl.where(cand, (bits >> LO) & (NB - 1), 0), NB)  # non-candidates land in bin 0 ...
    missed += tl.sum((~cand).to(tl.int32), axis=0)  # ... and are taken out at the end
    return acc, missed


@triton.jit(do_not_specialize=["n", "tiles", "programs"])
def _refine_kernel(
    wn_ptr,  # [n] f32
    ws_ptr,  # i32 workspace: reads the high digits found so far (ws[0]), += histogram at H_OFF
    n,
    tiles,
    programs,
    HI: tl.constexpr,  # bits above the next digit: candidates have bits >> HI == prefix
    LO: tl.constexpr,  # the next digit is (bits >> LO) & (NB - 1)
    NB: tl.constexpr,
    H_OFF: tl.constexpr,
    ROWS: tl.constexpr,  # also store this program's histogram at [TIES_OFF + programs + pid * NB]
    TIES_OFF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    prefix = tl.load(ws_ptr)
    acc = tl.zeros([NB], dtype=tl.int32)
    missed = tl.full([], 0, tl.int32)
    for t in range(tiles):
        start = (pid.to(tl.int64) * tiles + t) * BLOCK
        offs = start + lanes  # [BLOCK]
        if start + BLOCK <= n:
            acc, missed = _refine_tile(wn_ptr, offs, n, prefix, acc, missed, HI, LO, NB, False)
        else:
            acc, missed = _refine_tile(wn_ptr, offs, n, prefix, acc, missed, HI, LO, NB, True)
    acc -= tl.where(bins == 0, missed, 0)
    tl.atomic_add(ws_ptr + H_OFF + bins, acc, sem="relaxed")
    if ROWS:
        tl.store(ws_ptr + TIES_OFF + programs + pid * NB + bins, acc)


@triton.jit(do_not_specialize=["k", "programs"])
def _scan_kernel(
    ws_ptr,  # i32 workspace: histogram of this digit at H_OFF; in/out state ws[0:2]
    k,
    programs,
    FIRST: tl.constexpr,
    TIES: tl.constexpr,  # also write the tie offsets [P] at TIES_OFF from the per-program rows
    NB: tl.constexpr,
    DIGIT: tl.constexpr,
    H_OFF: tl.constexpr,
    TIES_OFF: tl.constexpr,
    PB: tl.constexpr,  # power of two >= programs
):
    """One program: the digit ``b`` of the ``rank``-th largest candidate, and the rank left inside it."""
    bins = tl.arange(0, NB)
    h = tl.load(ws_ptr + H_OFF + bins)  # [NB]
    if FIRST:
        prefix = 0
        rank = k.to(tl.int32)
    else:
        prefix = tl.load(ws_ptr)
        rank = tl.load(ws_ptr + 1)
    total = tl.sum(h, axis=0)
    at_least = total - tl.cumsum(h, axis=0) + h  # [NB] candidates with digit >= b
    b = tl.max(tl.where(at_least >= rank, bins, -1), axis=0)  # at_least falls with b; 1 <= rank <= total
    above = tl.sum(tl.where(bins > b, h, 0), axis=0)
    tl.store(ws_ptr, (prefix << DIGIT) | b)
    tl.store(ws_ptr + 1, rank - above)
    if TIES:
        p = tl.arange(0, PB)
        c = tl.load(ws_ptr + TIES_OFF + programs + p * NB + b, mask=p < programs, other=0)  # [PB] ties
        tl.store(ws_ptr + TIES_OFF + p, tl.cumsum(c, axis=0) - c, mask=p < programs)


@triton.jit
def _write_tile(
    wn_ptr,
    mn_ptr,
    w_ptr,
    mom_ptr,
    mask_ptr,
    offs,
    limit,
    tau_bits,
    need,
    seen,
    MODE: tl.constexpr,
    MASKED: tl.constexpr,
):
    wn = _load(wn_ptr, offs, limit, MASKED)  # [BLOCK]
    mn = _load(mn_ptr, offs, limit, MASKED)
    if MODE == 2:  # SELECT: keep |wn| > tau, and the first `need` ties |wn| == tau by flat index
        bits = _magnitude_bits(wn)
        tie = bits == tau_bits
        if MASKED:
            tie = tie & (offs < limit)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among the ties
        keep = (bits > tau_bits) | (tie & (rank <= need))
        seen += tl.sum(tie.to(tl.int32), axis=0)
    elif MODE == 1:  # KEEP_NONE
        keep = offs < 0
    else:  # KEEP_ALL
        keep = offs >= 0
    _store(w_ptr, offs, tl.where(keep, wn, 0.0), limit, MASKED)
    _store(mom_ptr, offs, tl.where(keep, mn, 0.0), limit, MASKED)
    _store(mask_ptr, offs, keep & (wn != 0.0), limit, MASKED)
    return seen


@triton.jit(do_not_specialize=["n", "tiles"])
def _write_kernel(
    wn_ptr,  # [n] f32
    mn_ptr,  # [n] f32
    w_ptr,  # [n] f32 out
    mom_ptr,  # [n] f32 out
    mask_ptr,  # [n] bool out
    tau_ptr,  # [] f32 out
    ws_ptr,  # i32 workspace: tau's bits, ties to keep, non-finite count; tie offsets at TIES_OFF
    n,
    tiles,
    MODE: tl.constexpr,
    TIES_OFF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    ok = tl.load(ws_ptr + 2) == 0  # every update finite; otherwise write nothing
    limit = tl.where(ok, n, 0)  # elements [0, limit) are written
    if MODE == 2:
        tau_bits = tl.load(ws_ptr)
        need = tl.load(ws_ptr + 1)
        seen = tl.load(ws_ptr + TIES_OFF + pid)  # ties in the chunks before this program's
        tau = tau_bits.to(tl.float32, bitcast=True)
    else:
        tau_bits = tl.full([], 0, tl.int32)
        need = tl.full([], 0, tl.int32)
        seen = tl.full([], 0, tl.int32)
        tau = tl.full([], 0x7F800000 if MODE == 1 else 0, tl.int32).to(tl.float32, bitcast=True)  # +inf or 0
    for t in range(tiles):
        start = (pid.to(tl.int64) * tiles + t) * BLOCK
        offs = start + lanes  # [BLOCK]
        if start + BLOCK <= limit:
            seen = _write_tile(wn_ptr, mn_ptr, w_ptr, mom_ptr, mask_ptr, offs, limit, tau_bits, need, seen, MODE, False)
        else:
            seen = _write_tile(wn_ptr, mn_ptr, w_ptr, mom_ptr, mask_ptr, offs, limit, tau_bits, need, seen, MODE, True)
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
    return not isinstance(_update_kernel, JITFunction)


def launch_plan(n: int, block: int = BLOCK, max_programs: int = MAX_PROGRAMS) -> tuple[int, int]:
    """``(programs, tiles per program)`` of the persistent kernels for ``n`` elements."""
    ntiles = max(triton.cdiv(n, block), 1)
    tiles = triton.cdiv(ntiles, min(ntiles, max_programs))
    return triton.cdiv(ntiles, tiles), tiles


def launch_admm_step(
    w: Tensor,
    grad: Tensor,
    mom: Tensor,
    z: Tensor,
    u: Tensor,
    mask: Tensor,
    wn: Tensor,
    mn: Tensor,
    tau: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    k: int,
    nesterov: bool,
    block: int = BLOCK,
    max_programs: int = MAX_PROGRAMS,
) -> None:
    """Launch one step on validated ``[n]`` buffers; ``wn``, ``mn`` ``[n]`` f32 and ``tau []`` f32 are
    caller-provided scratch / output (``wn``, ``mn`` end as the unprojected ``w``, ``mom``).

    Example (``admm_step_triton`` in ``admm.py`` does the validation and allocation):
        >>> n = w.numel()
        >>> wn, mn, tau = torch.empty(n), torch.empty(n), torch.empty(())
        >>> launch_admm_step(w, grad, mom, z, u, mask, wn, mn, tau, 0.1, 0.9, 0.0, 0.0, 5, False)
    """
    n = w.numel()
    programs, tiles = launch_plan(n, block, max_programs)
    mode = KEEP_ALL if k >= n else KEEP_NONE if k == 0 else SELECT
    select = mode == SELECT
    ws = torch.zeros(_TIES + (programs + programs * NB3 if select else 0), dtype=torch.int32, device=w.device)
    pb = triton.next_power_of_2(programs)
    grid = (programs,)
    wrap_triton(_update_kernel)[grid](
        w_ptr=w,
        grad_ptr=grad,
        mom_ptr=mom,
        z_ptr=z,
        u_ptr=u,
        wn_ptr=wn,
        mn_ptr=mn,
        ws_ptr=ws,
        n=n,
        tiles=tiles,
        lr=float(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        rho=float(rho),
        NESTEROV=bool(nesterov),
        HIST=select,
        NB=NB1,
        SHIFT=D2 + D3,
        H_OFF=_H1,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    if select:
        # (bins, digit bits, histogram offset, shift of the digits above, shift of this digit) per level
        levels = ((NB1, D1, _H1, 0, 0), (NB2, D2, _H2, D2 + D3, D3), (NB3, D3, _H3, D3, 0))
        for level, (nb, digit, h_off, hi, lo) in enumerate(levels):
            if level:  # histogram of this digit among the elements that share the digits found so far
                wrap_triton(_refine_kernel)[grid](
                    wn_ptr=wn,
                    ws_ptr=ws,
                    n=n,
                    tiles=tiles,
                    programs=programs,
                    HI=hi,
                    LO=lo,
                    NB=nb,
                    H_OFF=h_off,
                    ROWS=level == 2,
                    TIES_OFF=_TIES,
                    BLOCK=block,
                    num_warps=NUM_WARPS,
                )
            wrap_triton(_scan_kernel)[(1,)](
                ws_ptr=ws,
                k=k,
                programs=programs,
                FIRST=level == 0,
                TIES=level == 2,
                NB=nb,
                DIGIT=digit,
                H_OFF=h_off,
                TIES_OFF=_TIES,
                PB=pb,
                num_warps=4,
            )
    wrap_triton(_write_kernel)[grid](
        wn_ptr=wn,
        mn_ptr=mn,
        w_ptr=w,
        mom_ptr=mom,
        mask_ptr=mask,
        tau_ptr=tau,
        ws_ptr=ws,
        n=n,
        tiles=tiles,
        MODE=mode,
        TIES_OFF=_TIES,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )


def launch_dual_update(u: Tensor, w: Tensor, z: Tensor) -> None:
    """``u += w - z`` on validated contiguous float32 buffers of one size (one launch)."""
    n = u.numel()
    if n:
        wrap_triton(_dual_kernel)[(triton.cdiv(n, DUAL_BLOCK),)](
            u_ptr=u, w_ptr=w, z_ptr=z, n=n, BLOCK=DUAL_BLOCK, num_warps=8
        )
