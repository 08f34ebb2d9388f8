"""The quantizer's segmented sort: one ``torch.sort`` of every value, then a stable split by segment.

:func:`segment_sort` (``values [n]`` float32, ``offsets [S + 1]`` int64) returns every segment ascending in its
own range ``[offsets[s], offsets[s+1])``: ``torch.sort`` orders all values at once, and a stable split by
segment (a counting sort on the segment id, which keeps each segment's values in that order) moves them into
their ranges. :func:`segment_sort_ref` is the same in torch ops (the segment of each sorted value by
``searchsorted``, a stable radix sort of the narrow ids, a gather); both return the same bits (NaN last, and
ties, ``-0.0`` and ``0.0`` among them, in ``torch.sort``'s order). The Triton split serves ``S <= MAX_SEGMENTS``;
more segments take the reference.

The split is two launches and a scan (``BLOCK`` sorted values per program, ``NB`` bins, :func:`split_shape`):

1. ``split_count_kernel``: each value's segment (a halving search of its original index, ``torch.sort``'s
   index, in ``offsets``), stored as one byte (two past 256 segments), and the block's histogram of segments:
   ``counts[b, s]`` and ``adj[b, s] = offsets[s] - (the block's values of segments <= s)``;
2. ``cum = cumsum(counts, 0)`` (torch, ``[blocks, NB]`` int32), so ``cum + adj`` is where block ``b``'s values
   of segment ``s`` start, less their first position in the block once it is ordered by segment;
3. ``split_scatter_kernel``: ``tl.sort`` of ``segment << LOGB | slot`` orders the block by segment, stably
   (the slot breaks ties); sorted position ``i`` holds the value of that slot and goes to
   ``cum[b, segment] + adj[b, segment] + i``. A block's values of one segment land side by side.

Bytes per value (S <= 256), read + written, after ``torch.sort`` (index fill 8, four radix passes of float32
keys and int64 indices 100):

    reference: searchsorted (idx 8, segment 4), narrow ids (4 + 1), index fill 8, stable sort of
    the 1-byte ids with int64 indices (1 + 9 + 9), index_select (perm 8, the gather ~29 for
    ResNet34's 111 segments, write 4)                                                              ~85
    this split: count (idx 8, segment 1), scatter (segment 1, value 4, write 4), the [blocks, NB]
    tables (counts, adj written; cumsum read and write; cum, adj read: 24 NB / BLOCK)              ~21

Both kernels issue more than they move (``bench/sort_rank.py``, sm_90, 128 bins: 3.7-5.1 and 8.1-11.1 warp
instructions per value over Triton 3.6-3.9, the scatter's ``tl.sort`` most of it; up to 8.2 and 12.8 at 1,024
bins), so the split is predicted at 0.74 ms for ResNet34's 45M values on an H100 against the reference's
1.29 ms (``bench/model.py``, a prediction).

Example:
    >>> v, off = torch.tensor([3.0, 1.0, 2.0, 0.5, -1.0]), torch.tensor([0, 3, 5])
    >>> segment_sort_ref(v, off)
    tensor([ 1.0000,  2.0000,  3.0000, -1.0000,  0.5000])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._registry import wrap_triton

__all__ = ["MAX_SEGMENTS", "segment_sort", "segment_sort_ref"]

MAX_SEGMENTS = 1024  # the Triton split's histogram bins (more segments: the reference's fix-up)
SPLIT_WARPS = 8
INTERPRETED_MAX = 0  # values up to which the Lloyd launchers split with the kernels in Triton's CPU interpreter, where
# tl.sort takes about a second per block (past it: the reference's fix-up, the same bits); tests raise it


def split_shape(S: int) -> tuple[int, int, int]:
    """``(NB, BLOCK, LOGB)`` for ``S`` segments: bins a power of two >= S (at least 16), blocks of at least 1024
    values and 4 per bin (the ``[blocks, NB]`` tables stay a quarter of the values or less), ``BLOCK = 2**LOGB``.

    Example:
        >>> split_shape(111)
        (128, 1024, 10)
    """
    nb = max(16, triton.next_power_of_2(max(S, 1)))
    block = max(1024, 4 * nb)
    return nb, block, block.bit_length() - 1


@triton.jit
def _segment_of(src, offsets_ptr, S, NB: tl.constexpr, LOG_NB: tl.constexpr):
    """Segment (int32) of each original position ``src``: the last ``s < S`` with ``offsets[s] <=`` it (past an
    empty segment, whose offset equals the next one's). ``log2(NB)`` unrolled halving steps, each one load
    (from L1: ``offsets`` is at most ``8 (MAX_SEGMENTS + 1)`` bytes) and one compare. (Not
    ``lloyd_triton._count_le``, the codes pass's search: its runtime-bounded loop with a lower and an upper bound
    made this kernel issue about 9.1 warp instructions per value on sm_90 with Triton 3.8, against 3.7.)"""
    seg = tl.zeros(src.shape, tl.int32)
    for k in tl.static_range(LOG_NB):
        cand = seg + (NB >> (k + 1))
        v = tl.load(offsets_ptr + cand, mask=cand < S, other=2**62)  # (past S: above every position)
        seg = tl.where(v <= src, cand, seg)
    return seg


@triton.jit(do_not_specialize=["n", "S"])
def split_count_kernel(
    idx_ptr,  # [n] i64: torch.sort's indices (original position of each value, in value order)
    offsets_ptr,  # [S + 1] i64
    seg_ptr,  # [n] u8 / i16 out: segment of each value, in value order
    counts_ptr,  # [blocks, NB] i32 out: the block's values of each segment
    adj_ptr,  # [blocks, NB] i32 out: offsets[s] - (the block's values of segments < s) - counts
    n,
    S,
    NB: tl.constexpr,
    LOG_NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    inb = p < n
    # (masked loads, no full-block branch: the kernel is bound by what it issues, not by its 9 B per value)
    seg = _segment_of(tl.load(idx_ptr + p, mask=inb, other=0), offsets_ptr, S, NB, LOG_NB)
    seg = tl.where(inb, seg, 0)
    tl.store(seg_ptr + p, seg.to(seg_ptr.dtype.element_ty), mask=inb)
    bins = tl.arange(0, NB)  # [NB]
    missing = BLOCK - tl.sum(inb.to(tl.int32), axis=0)  # the tail's masked lanes, counted in bin 0
    h = tl.histogram(seg, NB) - tl.where(bins == 0, missing, 0)  # [NB]
    off = tl.load(offsets_ptr + bins, mask=bins < S, other=0).to(tl.int32)  # (n < 2**31: checked by the callers)
    tl.store(counts_ptr + pid * NB + bins, h)
    tl.store(adj_ptr + pid * NB + bins, off - tl.cumsum(h, 0))  # offsets - (earlier segments) - counts


@triton.jit(do_not_specialize=["n"])
def split_scatter_kernel(
    by_value_ptr,  # [n] f32: every value, ascending (torch.sort's values)
    seg_ptr,  # [n] u8 / i16: segment of each (split_count_kernel)
    cum_ptr,  # [blocks, NB] i32: cumsum(counts, 0), the values of each segment up to this block's
    adj_ptr,  # [blocks, NB] i32: split_count_kernel's
    out_ptr,  # [n] f32 out: each segment ascending in its own range
    n,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
    LOGB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    p0 = pid * BLOCK
    i = tl.arange(0, BLOCK)  # [BLOCK]
    inb = p0 + i < n
    seg = tl.load(seg_ptr + p0 + i, mask=inb, other=0).to(tl.int32)
    key = (tl.where(inb, seg, NB) << LOGB) | i  # masked slots sort last
    key = tl.sort(key, 0)  # [BLOCK]: by segment, stably (the slot breaks ties)
    ds = key >> LOGB
    ok = ds < NB
    v = tl.load(by_value_ptr + p0 + (key & (BLOCK - 1)), mask=ok, other=0.0)
    row = pid * NB + ds
    dest = tl.load(cum_ptr + row, mask=ok, other=0) + tl.load(adj_ptr + row, mask=ok, other=0) + i
    tl.store(out_ptr + dest, v, mask=ok)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every buffer the split writes (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _seg_dtype(S: int) -> torch.dtype:
    return torch.uint8 if S <= 256 else torch.int16


def _check(values: Tensor, offsets: Tensor) -> None:
    """The checks that read nothing back (the Lloyd launchers also check that ``offsets`` rise from 0 to ``n``,
    which needs a host sync)."""
    if values.dim() != 1 or values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError(
            f"segment_sort: values must be 1-D contiguous float32, got {values.dtype} {tuple(values.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64 or not offsets.is_contiguous():
        raise ValueError("segment_sort: offsets must be a 1-D contiguous int64 tensor [S + 1]")
    if offsets.device != values.device:
        raise ValueError(f"segment_sort: offsets are on {offsets.device}, values on {values.device}")
    if values.numel() >= 2**31:
        raise ValueError(f"segment_sort: at most 2**31 - 1 values, got {values.numel()}")


def segment_sort_ref(values: Tensor, offsets: Tensor) -> Tensor:
    """``values [n]`` with each segment of ``offsets [S + 1]`` sorted ascending in its own range (torch ops)."""
    _check(values, offsets)
    S = offsets.numel() - 1
    by_value, idx = torch.sort(values)  # [n], [n] int64
    seg = torch.searchsorted(offsets[1:], idx, right=True, out_int32=True)  # segment of each sorted value
    key_dtype = torch.uint8 if S <= 256 else torch.int16 if S <= 2**15 else torch.int32
    perm = torch.sort(seg.to(key_dtype), stable=True)[1]  # few radix passes on a narrow key
    return by_value.index_select(0, perm)


def segment_sort(values: Tensor, offsets: Tensor) -> Tensor:
    """:func:`segment_sort_ref` with the split in Triton (``S <= MAX_SEGMENTS``): ``[n]`` float32.

    ``values`` contiguous float32 (``n < 2**31``) and ``offsets`` int64, on one device (else ``ValueError``);
    ``offsets`` must rise from 0 to ``n``: the Lloyd launchers check that before they call it (reading them back).
    """
    _check(values, offsets)
    n, S = values.numel(), offsets.numel() - 1
    if S > MAX_SEGMENTS or n == 0:
        return segment_sort_ref(values, offsets)
    nb, block, logb = split_shape(S)
    blocks = triton.cdiv(n, block)
    dev = values.device
    by_value, idx = torch.sort(values)  # [n], [n] int64
    seg = _empty((n,), _seg_dtype(S), dev)
    counts = _empty((blocks, nb), torch.int32, dev)
    adj = _empty((blocks, nb), torch.int32, dev)
    wrap_triton(split_count_kernel)[(blocks,)](
        idx_ptr=idx, offsets_ptr=offsets, seg_ptr=seg, counts_ptr=counts, adj_ptr=adj, n=n, S=S, NB=nb,
        LOG_NB=nb.bit_length() - 1, BLOCK=block, num_warps=SPLIT_WARPS,
    )  # fmt: skip
    cum = torch.cumsum(counts, 0, dtype=torch.int32)  # [blocks, NB]
    out = _empty((n,), torch.float32, dev)
    wrap_triton(split_scatter_kernel)[(blocks,)](
        by_value_ptr=by_value, seg_ptr=seg, cum_ptr=cum, adj_ptr=adj, out_ptr=out, n=n, NB=nb, BLOCK=block, LOGB=logb,
        num_warps=SPLIT_WARPS,
    )  # fmt: skip
    return out
