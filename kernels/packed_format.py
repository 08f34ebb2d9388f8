"""Storage of one packed ATMC factor: bit-packed codes (dense or CSR) plus a small codebook.

A factor ``[rows, cols]`` of a finalized layer takes ``L <= 2^b`` distinct nonzero values.
Its packed form is four tensors (unused ones are empty) and a format tag:

* ``FMT_EMPTY``: the factor is all zero; every tensor is empty.
* ``FMT_DENSE``: ``codes`` holds ``rows * cols`` codes in row-major order, ``width =
  bit_length(L)`` bits each (code 0 is the zero, code ``c`` is ``book[c]``).
* ``FMT_CSR``: ``indptr [rows + 1]`` int32, ``indices [nnz]`` column indices (int16 when
  ``cols <= 32768``, else int32, ascending within a row) and ``codes`` holds the nonzeros'
  level indices, ``width = max(1, bit_length(L - 1))`` bits each (value ``book[code + 1]``).
* ``FMT_BITMAP``: ``indices [rows * ceil(cols / 32)]`` int32 is a bitmap of the nonzeros (bit
  ``j`` of word ``w`` of row ``n`` is column ``32 w + j``; each row starts a new word, bits past
  ``cols`` are 0); ``indptr [rows * ceil(cols / GROUP) + 1]`` int32 holds, per row and group of
  ``GROUP`` = 256 columns, the number of nonzeros before it in row-major order (the last entry is
  nnz), so a kernel finds the code of any element from one pointer and at most 8 word popcounts;
  ``codes`` as for CSR. Per element: ``1 + 32 / GROUP`` bits of positions (1.125) plus ``width``
  bits per nonzero, against ``16 + width`` bits per nonzero for CSR: the smaller one above about 7 %
  density (17 % for the main factor of a 4096^2 layer at ratio 0.05: 2.5 against 4.1 bits per element).
  Only ``SIZE_FORMATS`` choose it (``pack_(model, formats="size")``): it saves bytes, not time.

``book [L + 1]`` float32 holds the zero in slot 0 and the levels ascending in slots ``1..L``.
A layer without a quantizer (``bits = 0``) stores raw float32 values instead of codes:
``book`` is empty and ``width`` is 32 (the words are the values' bit patterns).

Codes are a little-endian bit stream in int32 words: code ``i`` occupies bits
``[i * width, (i + 1) * width)``; codes may straddle two words, and one zero pad word at the
end lets a reader always load the pair ``(w, w + 1)``. Among the candidate formats (dense and
CSR by default, plus bitmap for the smallest storage) the one with the fewest bytes wins (the
earlier on ties); :func:`factor_nbytes` is that exact byte count, :func:`factor_bytes_breakdown`
its parts. ``tests/test_lowrank_gemm.py::test_on_disk_format_is_pinned`` pins the layout.

Code widths and the quantizer: a factor holds ``L <= 2^b`` levels (``2^b`` free Lloyd centres;
the zero is not a level). CSR keeps the zero in its structure, so its codes take
``ceil(log2 L) <= b`` bits: b-bit codebooks fit b bits, as the paper counts them. Dense codes must
also say "zero", so they take ``ceil(log2 (L + 1))`` bits: ``b`` when the factor uses at most
``2^b - 1`` levels, ``b + 1`` when it uses all ``2^b`` (9 bits for a full 8-bit codebook). No exact
dense encoding of ``2^b + 1`` symbols fits ``b`` bits; where the extra bit matters, CSR (or, at
high density, the bitmap of nonzeros plus b-bit codes) is the smaller choice, and
the byte-count comparison picks it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BITMAP_GROUP",
    "bitmap_encode",
    "bitmap_groups",
    "bitmap_mask",
    "bitmap_words",
    "FMT_BITMAP",
    "FMT_CSR",
    "FMT_DENSE",
    "FMT_EMPTY",
    "FORMAT_NAMES",
    "MAX_BOOK",
    "SIZE_FORMATS",
    "SPEED_FORMATS",
    "choose_format",
    "code_width",
    "codes_at",
    "decode_factor_ref",
    "encode_factor",
    "factor_bytes_breakdown",
    "factor_nbytes",
    "factor_part_sizes",
    "index_dtype",
    "pack_bits",
    "packed_words",
    "unpack_bits",
]

FMT_EMPTY, FMT_DENSE, FMT_CSR, FMT_BITMAP = 0, 1, 2, 3
FORMAT_NAMES = {FMT_EMPTY: "empty", FMT_DENSE: "dense", FMT_CSR: "csr", FMT_BITMAP: "bitmap"}
MAX_BOOK = 257  # the zero plus 2^8 levels
BITMAP_GROUP = 256  # columns per row-group pointer of a bitmap factor (8 bitmap words)


def code_width(fmt: int, levels: int, raw: bool) -> int:
    """Bits per stored code: 32 for raw values, ``bit_length(L)`` dense, ``max(1, bit_length(L - 1))`` CSR."""
    if fmt == FMT_EMPTY:
        return 0
    if raw:
        return 32
    if levels < 1:
        raise ValueError(f"a coded factor needs at least one level, got {levels}")
    return levels.bit_length() if fmt == FMT_DENSE else max(1, (levels - 1).bit_length())


def bitmap_words(cols: int) -> int:
    """Bitmap words per row of a bitmap factor with ``cols`` columns."""
    return (cols + 31) // 32


def bitmap_groups(cols: int) -> int:
    """Row-group pointers per row of a bitmap factor with ``cols`` columns."""
    return (cols + BITMAP_GROUP - 1) // BITMAP_GROUP


def packed_words(count: int, width: int) -> int:
    """int32 words holding ``count`` codes of ``width`` bits, plus the pad word."""
    return (count * width + 31) // 32 + 1


def index_dtype(cols: int) -> torch.dtype:
    """Column-index dtype of a CSR factor with ``cols`` columns."""
    return torch.int16 if cols <= 2**15 else torch.int32


def factor_part_sizes(
    fmt: int, rows: int, cols: int, nnz: int, levels: int, raw: bool
) -> dict[str, tuple[int, torch.dtype]]:
    """``{part: (numel, dtype)}`` of the four tensors of a factor stored in ``fmt``.

    Example:
        >>> factor_part_sizes(FMT_BITMAP, 2, 40, 3, 2, False)["indices"]
        (4, torch.int32)
    """
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown packed format {fmt}")
    empty = fmt == FMT_EMPTY
    count = rows * cols if fmt == FMT_DENSE else nnz
    sizes = {
        "codes": (0 if empty else packed_words(count, code_width(fmt, levels, raw)), torch.int32),
        "book": (0 if empty or raw else levels + 1, torch.float32),
        "indptr": (0, torch.int32),
        "indices": (0, torch.int16),
    }
    if fmt == FMT_CSR:
        sizes["indptr"] = (rows + 1, torch.int32)
        sizes["indices"] = (nnz, index_dtype(cols))
    elif fmt == FMT_BITMAP:
        sizes["indptr"] = (rows * bitmap_groups(cols) + 1, torch.int32)
        sizes["indices"] = (rows * bitmap_words(cols), torch.int32)
    return sizes


def factor_nbytes(fmt: int, rows: int, cols: int, nnz: int, levels: int, raw: bool) -> int:
    """Exact bytes of a factor stored in ``fmt`` (codes, codebook, and for CSR / bitmap indptr + indices)."""
    sizes = factor_part_sizes(fmt, rows, cols, nnz, levels, raw)
    return sum(n * torch.empty(0, dtype=dt).element_size() for n, dt in sizes.values())


def factor_bytes_breakdown(fmt: int, rows: int, cols: int, nnz: int, levels: int, raw: bool) -> dict[str, int]:
    """Bytes of a factor by part: ``codes`` (the stream's payload bits, rounded up to whole words),
    ``pad`` (the pad word), ``indices`` and ``indptr`` (CSR positions), ``book``. Sums to :func:`factor_nbytes`.

    Example:
        >>> factor_bytes_breakdown(FMT_CSR, 4, 100, 10, 3, False)
        {'codes': 4, 'pad': 4, 'indices': 20, 'indptr': 20, 'book': 16}
    """
    parts = {"codes": 0, "pad": 0, "indices": 0, "indptr": 0, "book": 0}
    if fmt == FMT_EMPTY:
        return parts
    for part, (n, dt) in factor_part_sizes(fmt, rows, cols, nnz, levels, raw).items():
        parts[part] = n * torch.empty(0, dtype=dt).element_size()
    parts["pad"] = 4
    parts["codes"] -= 4
    return parts


SPEED_FORMATS = (FMT_DENSE, FMT_CSR)  # the default candidates: the fastest kernels at small M (see the README)
SIZE_FORMATS = (FMT_DENSE, FMT_CSR, FMT_BITMAP)  # the smallest storage


def choose_format(rows: int, cols: int, nnz: int, levels: int, raw: bool, formats: tuple = SPEED_FORMATS) -> int:
    """The candidate in ``formats`` with the fewest bytes (ties: the earlier one; empty when ``nnz == 0``).

    The default leaves the bitmap out: its tile decode issues about twice the instructions per element
    of dense codes and more than CSR per nonzero at these densities (``ISSUE`` in
    :mod:`.lowrank_gemm`), so it saves bytes but not time; ``SIZE_FORMATS`` adds it.

    Example:
        >>> nnz = 2_850_000  # 17 % of 4096^2, 8-bit codes
        >>> choose_format(4096, 4096, nnz, 256, False), choose_format(4096, 4096, nnz, 256, False, SIZE_FORMATS)
        (2, 3)
    """
    if nnz == 0:
        return FMT_EMPTY
    if not formats or any(f not in (FMT_DENSE, FMT_CSR, FMT_BITMAP) for f in formats):
        raise ValueError(f"choose_format: formats must be a non-empty subset of (1, 2, 3), got {formats}")
    return min(formats, key=lambda f: factor_nbytes(f, rows, cols, nnz, levels, raw))


def _to_int32_words(w64: Tensor) -> Tensor:
    return torch.where(w64 >= 2**31, w64 - 2**32, w64).to(torch.int32)


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """Bit-pack non-negative ``codes [n]`` (< 2^width) into int32 words ``[packed_words(n, width)]``.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3]), 2).tolist()
        [57, 0]
    """
    c = codes.reshape(-1).to(torch.int64)
    n = c.numel()
    words = torch.zeros(packed_words(n, width), dtype=torch.int64, device=c.device)
    if n:
        c = c & ((1 << width) - 1)
        bit = torch.arange(n, device=c.device, dtype=torch.int64) * width
        wi, sh = bit >> 5, bit & 31
        words.index_add_(0, wi, (c << sh) & 0xFFFFFFFF)  # the bit ranges are disjoint: add == or
        spill = sh + width > 32
        words.index_add_(0, wi[spill] + 1, c[spill] >> (32 - sh[spill]))
    return _to_int32_words(words)


def unpack_bits(words: Tensor, count: int, width: int) -> Tensor:
    """The ``count`` codes (int64) of a stream written by :func:`pack_bits`.

    Example:
        >>> unpack_bits(pack_bits(torch.tensor([5, 0, 7, 1]), 3), 4, 3).tolist()
        [5, 0, 7, 1]
    """
    return codes_at(words, torch.arange(count, device=words.device, dtype=torch.int64), width)


def codes_at(words: Tensor, idx: Tensor, width: int) -> Tensor:
    """Codes (int64) number ``idx`` (any shape, int64) of a stream written by :func:`pack_bits`.

    Example:
        >>> codes_at(pack_bits(torch.tensor([5, 0, 7, 1]), 3), torch.tensor([3, 0]), 3).tolist()
        [1, 5]
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << width) - 1
    bit = idx * width
    wi, sh = (bit >> 5).clamp_max(max(0, words.numel() - 2)), bit & 31  # the clamp only guards corrupt data
    return ((w[wi] >> sh) | ((w[wi + 1] & mask) << (32 - sh))) & mask


def _values(fmt: int, count: int, codes: Tensor, book: Tensor) -> Tensor:
    """float32 values of the ``count`` stored entries (raw bit patterns or codebook lookups)."""
    raw = book.numel() == 0
    levels = book.numel() - 1
    width = code_width(fmt, levels, raw)
    if raw:
        return codes[:count].view(torch.float32)
    slot = unpack_bits(codes, count, width) + (0 if fmt == FMT_DENSE else 1)
    return book.index_select(0, slot.clamp_max(levels))


def bitmap_encode(nz: Tensor) -> tuple[Tensor, Tensor]:
    """``(indptr, words)`` of a bitmap factor whose nonzeros are ``nz [rows, cols]`` (bool).

    Example:
        >>> indptr, words = bitmap_encode(torch.tensor([[True, False, True], [False, True, False]]))
        >>> indptr.tolist(), words.tolist()
        ([0, 2, 3], [5, 2])
    """
    rows, cols = nz.shape
    wpr, grp = bitmap_words(cols), bitmap_groups(cols)
    pad = torch.zeros(rows, grp * BITMAP_GROUP, dtype=torch.int64, device=nz.device)
    pad[:, :cols] = nz.to(torch.int64)
    bits = pad[:, : wpr * 32].view(rows, wpr, 32) << torch.arange(32, device=nz.device)
    words = _to_int32_words(bits.sum(2)).reshape(-1)  # [rows * wpr]
    counts = pad.view(rows, grp, BITMAP_GROUP).sum(2).reshape(-1)  # [rows * grp]
    indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    return indptr, words


def bitmap_mask(words: Tensor, rows: int, cols: int) -> Tensor:
    """The nonzero pattern ``[rows, cols]`` (bool) of a bitmap factor's ``words`` (inverse of :func:`bitmap_encode`)."""
    wpr = bitmap_words(cols)
    w = words.to(torch.int64).view(rows, wpr, 1) & 0xFFFFFFFF
    bits = (w >> torch.arange(32, device=words.device)) & 1  # [rows, wpr, 32]
    return bits.view(rows, wpr * 32)[:, :cols].bool()


def decode_factor_ref(
    fmt: int, rows: int, cols: int, codes: Tensor, book: Tensor, indptr: Tensor, indices: Tensor
) -> Tensor:
    """The dense float32 factor ``[rows, cols]`` of a packed one (the reference decoder).

    Example:
        >>> book = torch.tensor([0.0, -1.0, 2.0])
        >>> codes = pack_bits(torch.tensor([0, 2, 1, 0]), 2)
        >>> decode_factor_ref(FMT_DENSE, 2, 2, codes, book, None, None).tolist()
        [[0.0, 2.0], [-1.0, 0.0]]
    """
    out = torch.zeros(rows, cols, dtype=torch.float32, device=codes.device)
    if fmt == FMT_DENSE:
        out.view(-1).copy_(_values(fmt, rows * cols, codes, book))
    elif fmt == FMT_CSR:
        nnz = indices.numel()
        counts = (indptr[1:] - indptr[:-1]).long()
        row = torch.repeat_interleave(torch.arange(rows, device=codes.device), counts, output_size=nnz)
        out[row, indices.long()] = _values(fmt, nnz, codes, book)
    elif fmt == FMT_BITMAP:  # static shapes (a compiled graph cannot size by data): every element's rank
        nz = bitmap_mask(indices, rows, cols).reshape(-1)
        rank = (torch.cumsum(nz, 0) - 1).clamp_min(0)  # codes are row-major, as the bits
        if book.numel() == 0:
            vals = codes.view(torch.float32)[rank.clamp_max(max(0, codes.numel() - 2))]
        else:
            levels = book.numel() - 1
            vals = book[(codes_at(codes, rank, code_width(fmt, levels, False)) + 1).clamp_max(levels)]
        out.view(-1).copy_(torch.where(nz, vals, 0.0))
    return out


def encode_factor(
    w: Tensor, raw: bool, fmt: int | None = None, formats: tuple = SPEED_FORMATS
) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """Pack ``w [rows, cols]`` into ``(fmt, codes, book, indptr, indices)``; inverse of :func:`decode_factor_ref`.

    ``raw``: store float32 values (no quantizer); otherwise ``w`` may take at most 256 distinct
    nonzero values, which become the codebook. ``fmt`` forces a format (default: the smallest of
    ``formats``, see :func:`choose_format`); an all-zero factor is always ``FMT_EMPTY``.

    Example:
        >>> w = torch.tensor([[0.0, 0.5], [0.5, -2.0]])
        >>> fmt, codes, book, indptr, indices = encode_factor(w, raw=False)
        >>> fmt, book.tolist(), torch.equal(decode_factor_ref(fmt, 2, 2, codes, book, indptr, indices), w)
        (1, [0.0, -2.0, 0.5], True)
    """
    if w.dim() != 2:
        raise ValueError(f"encode_factor: w must be 2-D, got {tuple(w.shape)}")
    rows, cols = w.shape
    dev = w.device
    flat = w.detach().reshape(-1).to(torch.float32)
    nz = flat != 0
    nnz = int(nz.sum())
    levels = flat.new_zeros(0) if raw else torch.unique(flat[nz])
    if levels.numel() > MAX_BOOK - 1:
        raise ValueError(f"encode_factor: {levels.numel()} distinct nonzero values, a codebook holds at most 256")
    fmt = choose_format(rows, cols, nnz, levels.numel(), raw, formats) if fmt is None or nnz == 0 else fmt
    i32 = torch.zeros(0, dtype=torch.int32, device=dev)
    book = flat.new_zeros(0) if raw or fmt == FMT_EMPTY else torch.cat([flat.new_zeros(1), levels])
    if fmt == FMT_EMPTY:
        return fmt, i32, book, i32, torch.zeros(0, dtype=torch.int16, device=dev)
    width = code_width(fmt, levels.numel(), raw)
    if fmt == FMT_DENSE:
        if raw:
            return fmt, torch.cat([flat.view(torch.int32), i32.new_zeros(1)]), book, i32, i32.short()
        slot = torch.where(nz, torch.searchsorted(levels, flat) + 1, 0)
        return fmt, pack_bits(slot, width), book, i32, i32.short()
    if fmt not in (FMT_CSR, FMT_BITMAP):
        raise ValueError(f"encode_factor: unknown format {fmt}")
    idx = torch.nonzero(nz).view(-1)  # ascending: row-major order, columns ascending within a row
    if fmt == FMT_CSR:
        counts = torch.bincount(idx // cols, minlength=rows)
        indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
        indices = (idx % cols).to(index_dtype(cols))
    else:
        indptr, indices = bitmap_encode(nz.view(rows, cols))
    vals = flat[idx]
    codes = (
        torch.cat([vals.view(torch.int32), i32.new_zeros(1)])
        if raw
        else pack_bits(torch.searchsorted(levels, vals), width)
    )
    return fmt, codes, book, indptr, indices
