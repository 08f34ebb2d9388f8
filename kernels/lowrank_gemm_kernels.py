"""Triton kernels of the packed ATMC linear layer (launchers: :mod:`.lowrank_gemm_triton`).

Factors arrive as bit-packed codes (:mod:`.packed_format`): ``_codes_at`` unpacks a code that
may straddle two int32 words (8-bit codes: one byte load), ``_dequant`` looks it up in the codebook (or reinterprets raw
float32 bits). Every index is masked or clamped, so corrupt codes or column indices never read
out of bounds: a code past the codebook reads its last level, a column index outside ``[0, K)``
contributes nothing (the launchers' callers validate packed data before it gets here; these
guards are the second line, and tests pin their values).

Bytes per element (what the roofline model counts): a dense-coded factor reads ``WIDTH / 8``
bytes per weight element plus its codebook once per program (L1); a CSR factor reads, per
nonzero, its column index (2 bytes, int16, or 4) and ``WIDTH / 8`` bytes of code, plus 4 bytes per
row of ``indptr``, and gathers ``BLOCK_M`` activations (2 or 4 bytes each) per nonzero from L1/L2 (``x^T``,
which ``_transpose_pad_kernel`` writes once per call in one launch, padded to a multiple of ``BLOCK_M`` columns
plus a zero row: it reads ``x`` once, ``M K`` elements, and writes ``(K + 1) Mp``).
A bitmap factor reads 1/8 byte per element (its bitmap), ``WIDTH / 8`` bytes per nonzero and a 4-byte
group pointer per ``GROUP`` (256) elements; it is decoded in the tile loop and fed to the tensor cores like
dense codes, at the cost of integer work per element (a bit test, a popcount, a code fetch from L1).
Activations ``x [M, K]`` are read once per output-column tile, outputs written once (the
split-K tile path writes ``SPLIT_K`` float32 partials that one fixed-order pass sums).
"""

import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------ device helpers


@triton.jit
def _codes_at(words_ptr, idx, mask, WIDTH: tl.constexpr):
    """Codes (int32) of elements ``idx`` (int32 or int64) of a little-endian ``WIDTH``-bit stream in int32 words.

    8-bit codes are whole bytes of the stream: code ``i`` is its byte ``i``, one byte load and no shifts
    (a third fewer instructions per CSR nonzero). Other widths: word and shift arithmetic in int64
    (``idx * WIDTH`` may pass 2^31)."""
    if WIDTH == 8:
        code = tl.load(words_ptr.to(tl.pointer_type(tl.uint8)) + idx, mask=mask, other=0).to(tl.int32)
    else:
        bit = idx.to(tl.int64) * WIDTH
        wi = bit >> 5
        sh = bit & 31
        lo = tl.load(words_ptr + wi, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
        if 32 % WIDTH == 0:  # a code never straddles two words
            code64 = (lo >> sh) & ((1 << WIDTH) - 1)
        else:
            hi = tl.load(words_ptr + wi + 1, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
            code64 = ((lo >> sh) | ((hi & ((1 << WIDTH) - 1)) << (32 - sh))) & ((1 << WIDTH) - 1)
        code = code64.to(tl.int32)
    return code


@triton.jit
def _tile_values(
    words_ptr,
    elem0,
    rel,
    mask,
    book_ptr,
    book_len,
    book,
    WIDTH: tl.constexpr,
    SLOT0: tl.constexpr,
    BOOK_GATHER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """float32 values ``[BLOCK_K, BLOCK_N]`` of stream entries ``elem0[n] + rel[k, n]`` (``elem0 [BN]`` int64,
    ``rel`` int32 ``[BK, BN]`` or ``[BK, 1]``): raw float32 bits (``WIDTH`` 32) or ``book[code + SLOT0]`` of a
    little-endian ``WIDTH``-bit code stream in int32 words. int64 only per column; the per-element arithmetic
    is 32-bit. Masked elements read 0 (with ``SLOT0`` 0 their code 0 is the codebook's zero)."""
    if WIDTH == 32:  # raw float32 values
        v = tl.load(words_ptr + (elem0[None, :] + rel), mask=mask, other=0).to(tl.float32, bitcast=True)
    else:
        bit0 = elem0 * WIDTH  # [BN] int64
        bit = (bit0 & 31).to(tl.int32)[None, :] + rel * WIDTH  # [BK, BN] int32
        ptrs = words_ptr + (bit0 >> 5)[None, :] + (bit >> 5)
        sh = (bit & 31).to(tl.uint32)
        lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
        if 32 % WIDTH == 0:  # a code never straddles two words
            code = lo >> sh
        else:
            hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
            code = (lo >> sh) | ((hi << 1) << (31 - sh))  # (hi << 32 - sh), defined for sh = 0 too
        slot = tl.minimum((code & ((1 << WIDTH) - 1)).to(tl.int32) + SLOT0, book_len - 1)  # never past the book
        if BOOK_GATHER:  # codebook held in registers / shared memory
            v = tl.reshape(tl.gather(book, tl.reshape(slot, (BLOCK_K * BLOCK_N,)), 0), (BLOCK_K, BLOCK_N))
            if SLOT0 != 0:  # a masked element's code 0 reads a level, not the zero
                v = tl.where(mask, v, 0.0)
        else:  # small-table load: the codebook stays in L1
            v = tl.load(book_ptr + slot, mask=mask, other=0.0)
    return v


@triton.jit
def _popc(w):
    """Set bits of each uint32 ``w`` (int32; the SWAR idiom, which LLVM turns into one POPC)."""
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _bitmap_index(gp_ptr, bm_ptr, nnz, K, N, k0, kk, rn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Where the codes of a bitmap factor ``B [N, K]``'s ``B^T`` tile (columns ``kk = k0 + arange(BLOCK_K)``,
    ``k0`` a multiple of ``BLOCK_K``, which divides ``GROUP``; rows ``rn``) stand in its code stream:
    ``(base [BN] int64, rel [BK, BN] int32, ok [BK, BN])``, element ``(n, k)`` is code ``base[n] + rel[k, n]``
    where ``ok`` (a stored nonzero, inside the tile and the stream).

    ``base[n]`` is ``gp[n, k0 // GROUP]`` plus the set bits of row ``n`` from the group's first column up
    to ``k0``, ``rel`` the set bits before ``k`` in the step: one pointer per row, the popcounts of at most
    ``GROUP / 32`` words per row and step (L1), then the element's own word.
    """
    tl.static_assert(GROUP % BLOCK_K == 0 and (BLOCK_K % 32 == 0 or 32 % BLOCK_K == 0))
    GW: tl.constexpr = GROUP // 32
    WPS: tl.constexpr = max(1, BLOCK_K // 32)  # bitmap words a step touches
    wpr = (K + 31) // 32
    n_ok = rn < N  # [BN]
    row_w = rn.to(tl.int64) * wpr  # [BN]: the row's first bitmap word
    g = k0 // GROUP
    kw0 = k0 // 32
    base = tl.load(gp_ptr + rn.to(tl.int64) * ((K + GROUP - 1) // GROUP) + g, mask=n_ok, other=0)  # [BN]
    jw = g * GW + tl.arange(0, GW)  # [GW]: the group's words; those before this step count
    pre = tl.load(bm_ptr + row_w[None, :] + jw[:, None], mask=(jw[:, None] < kw0) & n_ok[None, :], other=0)
    base += tl.sum(_popc(pre.to(tl.uint32, bitcast=True)), axis=0)  # [BN]: nonzeros before column k0
    mask = (kk[:, None] < K) & n_ok[None, :]  # [BK, BN]
    own = tl.load(bm_ptr + row_w[None, :] + (kk // 32)[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
    sh = (kk & 31).to(tl.uint32)[:, None]  # [BK, 1]
    nz = ((own >> sh) & 1) != 0  # [BK, BN]
    rel = _popc(own & (((own * 0 + 1) << sh) - 1))  # [BK, BN]: set bits below k in its own word
    lw = (kk - k0) // 32  # [BK]: the element's word within the step
    for q in tl.static_range(WPS - 1):  # set bits of the step's earlier words
        # (tl.where, not `n_ok & scalar`: Triton 3.9's interpreter makes a bool tensor & a scalar bool int32)
        q_ok = tl.where(kw0 + q < wpr, n_ok, False)
        wq = tl.load(bm_ptr + row_w + kw0 + q, mask=q_ok, other=0).to(tl.uint32, bitcast=True)
        rel += tl.where(lw[:, None] > q, _popc(wq)[None, :], 0)
    ok = mask & nz & (base[None, :] + rel < nnz)  # a corrupt pointer never reads past the codes
    return base.to(tl.int64), rel, ok


@triton.jit
def _row_range(indptr_ptr, r, n_rows, nnz):
    """``[start, end)`` of CSR rows ``r`` (rows past ``n_rows``: empty), clamped to the streams
    ``[0, nnz)`` once per row, so one compare per nonzero masks a corrupt pointer."""
    ok = r < n_rows
    start = tl.maximum(tl.load(indptr_ptr + r, mask=ok, other=0), 0)
    end = tl.minimum(tl.load(indptr_ptr + r + 1, mask=ok, other=0), nnz)
    return start, end


@triton.jit
def _dequant(words_ptr, book_ptr, book_len, idx, mask, WIDTH: tl.constexpr, SLOT0: tl.constexpr):
    """float32 values of stored entries ``idx``: raw bit patterns (WIDTH 32) or ``book[code + SLOT0]``."""
    if WIDTH == 32:
        v = tl.load(words_ptr + idx, mask=mask, other=0).to(tl.float32, bitcast=True)
    else:
        slot = tl.minimum(_codes_at(words_ptr, idx, mask, WIDTH) + SLOT0, book_len - 1)  # never past the book
        v = tl.load(book_ptr + slot, mask=mask, other=0.0)
    return v


@triton.jit
def _b_tile(
    p,
    N,
    kk,
    rn,
    k0,
    KIND: tl.constexpr,
    WIDTH: tl.constexpr,
    BOOK_GATHER: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Dequantized ``B^T`` tile ``[BLOCK_K, BLOCK_N]`` (float32) of product ``p``'s factor ``B [N, K]`` (see
    :func:`_k_steps`), columns ``kk`` (``= k0 + arange(BLOCK_K)``). ``KIND`` 1 dense codes, 2 a plain
    matrix, 3 a bitmap factor (``gp_ptr``, ``bm_ptr``: its group pointers and bitmap words, ``nnz`` codes)."""
    _, _, K, b_ptr, book_ptr, book_len, book, stride_bn, stride_bk, gp_ptr, bm_ptr, nnz = p
    if KIND == 3:
        base, rel, ok = _bitmap_index(gp_ptr, bm_ptr, nnz, K, N, k0, kk, rn, GROUP, BLOCK_K)
        b = _tile_values(b_ptr, base, rel, ok, book_ptr, book_len, book, WIDTH, 1, BOOK_GATHER, BLOCK_K, BLOCK_N)
    else:
        mask = (kk[:, None] < K) & (rn[None, :] < N)  # [BK, BN]
        row0 = rn.to(tl.int64) * stride_bn  # [BN]: each row's first element
        rel = kk[:, None] * stride_bk  # [BK, 1] (stride_bk is 1 for codes)
        if KIND == 2:  # plain float matrix
            b = tl.load(b_ptr + (row0[None, :] + rel), mask=mask, other=0.0).to(tl.float32)
        else:
            b = _tile_values(b_ptr, row0, rel, mask, book_ptr, book_len, book, WIDTH, 0, BOOK_GATHER, BLOCK_K, BLOCK_N)
    return b


@triton.jit
def _k_steps(
    acc,
    p,
    M,
    N,
    rm,
    rn,
    rk,
    s_lo,
    s_hi,
    KIND: tl.constexpr,
    WIDTH: tl.constexpr,
    DOT: tl.constexpr,
    BOOK_GATHER: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``acc [BM, BN] += A[rm] deq(B)[rn]^T`` over K-steps ``s_lo <= s < s_hi`` of one product ``p = (a_ptr,
    stride_am, K, b_ptr, book_ptr, book_len, book, stride_bn, stride_bk, gp_ptr, bm_ptr, nnz)``: ``A [M, K]``
    (row stride ``stride_am``) times the factor ``B [N, K]`` that ``KIND`` / ``WIDTH`` describe (:func:`_b_tile`;
    ``book``: the codebook in registers when ``BOOK_GATHER``)."""
    a_ptr, stride_am, K = p[0], p[1], p[2]
    rm64 = rm.to(tl.int64)  # row offsets of big inputs pass 2^31
    for s in range(s_lo, s_hi):
        kk = s * BLOCK_K + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + rm64[:, None] * stride_am + kk[None, :], mask=a_mask, other=0.0)  # [BM, BK]
        b = _b_tile(p, N, kk, rn, s * BLOCK_K, KIND, WIDTH, BOOK_GATHER, GROUP, BLOCK_K, BLOCK_N)  # [BK, BN]
        acc = _mma(acc, a, b, DOT)
    return acc


@triton.jit
def _mma(acc, a, b, DOT: tl.constexpr):
    """``acc += a b`` on tensor cores: fp16 / bf16 operands for ``DOT`` 1 / 2, tf32 for ``DOT`` 0 and for a
    float32 ``a`` whatever ``DOT`` says: the low-rank intermediate ``t = x deq(V)^T (+ x)`` (kept in float32
    between the two stages) is never rounded to fp16 / bf16 before its product with ``U`` (tf32 keeps its
    float32 range; an fp16 ``t`` overflowed past 65504 and lost the float32-accumulated bits)."""
    if DOT == 0 or a.dtype == tl.float32:
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision="tf32")  # fp32 x or t: tf32 tensor cores
    elif DOT == 1:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return acc


@triton.jit
def _load_book(
    book_ptr, book_len, KIND: tl.constexpr, WIDTH: tl.constexpr, BOOK_GATHER: tl.constexpr, BOOK_SIZE: tl.constexpr
):
    if BOOK_GATHER and (KIND == 1 or KIND == 3) and WIDTH != 32:
        r = tl.arange(0, BOOK_SIZE)
        book = tl.load(book_ptr + r, mask=r < book_len, other=0.0)  # [BOOK_SIZE]
    else:
        book = tl.zeros((BOOK_SIZE,), dtype=tl.float32)
    return book


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _tile_kernel(
    out_ptr,
    stride_ok,
    stride_om,
    M,
    N,
    a1_ptr,
    stride_a1m,
    K1,
    b1_ptr,
    book1_ptr,
    book1_len,
    stride_b1n,
    stride_b1k,
    gp1_ptr,
    bm1_ptr,
    nnz1,
    a2_ptr,
    stride_a2m,
    K2,
    b2_ptr,
    book2_ptr,
    book2_len,
    stride_b2n,
    stride_b2k,
    gp2_ptr,
    bm2_ptr,
    nnz2,
    e_ptr,
    stride_em,
    bias_ptr,
    M_BUCKET,
    KIND1: tl.constexpr,
    WIDTH1: tl.constexpr,
    BOOK1: tl.constexpr,
    KIND2: tl.constexpr,
    WIDTH2: tl.constexpr,
    BOOK2: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    BOOK_GATHER: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out [M, N] (+)= A1 deq(B1)^T + A2 deq(B2)^T + E + bias`` for ``A_s [M, K_s]``, ``B_s [N, K_s]``.

    ``KIND_s``: 0 absent, 1 bit-packed codes (``WIDTH_s`` bits; 32 = raw float32), 2 a plain
    float matrix, 3 a bitmap factor (codes at ``b_s``, ``GROUP``-column pointers at ``gp_s``, bitmap
    words at ``bm_s``, ``nnz_s`` codes). ``B_s[n, k]`` is element ``n * stride_bsn + k * stride_bsk``. The K-steps of
    both products form one sequence that ``SPLIT_K`` programs share; split ``s`` stores its
    partial sums to ``out[s]`` (``out [SPLIT_K, M, N]`` float32 when ``SPLIT_K > 1``, strides
    ``stride_ok, stride_om``), which the launcher sums in a fixed order: no atomics, the same bits
    every run. Split 0 adds ``E`` (the identity term) and the bias.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rm64 = rm.to(tl.int64)  # row offsets of big outputs pass 2^31
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    book1 = _load_book(book1_ptr, book1_len, KIND1, WIDTH1, BOOK_GATHER, BOOK1)
    p1 = (a1_ptr, stride_a1m, K1, b1_ptr, book1_ptr, book1_len, book1, stride_b1n, stride_b1k, gp1_ptr, bm1_ptr, nnz1)
    book2 = _load_book(book2_ptr, book2_len, KIND2, WIDTH2, BOOK_GATHER, BOOK2)
    p2 = (a2_ptr, stride_a2m, K2, b2_ptr, book2_ptr, book2_len, book2, stride_b2n, stride_b2k, gp2_ptr, bm2_ptr, nnz2)
    steps1 = 0
    steps2 = 0
    if KIND1 != 0:
        steps1 = tl.cdiv(K1, BLOCK_K)
    if KIND2 != 0:
        steps2 = tl.cdiv(K2, BLOCK_K)
    per = tl.cdiv(steps1 + steps2, SPLIT_K)
    s0 = pid_k * per
    s1 = tl.minimum(s0 + per, steps1 + steps2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if KIND1 != 0:
        lo, hi = s0, tl.minimum(s1, steps1)
        acc = _k_steps(acc, p1, M, N, rm, rn, rk, lo, hi, KIND1, WIDTH1, DOT, BOOK_GATHER, GROUP, BLOCK_K, BLOCK_N)
    if KIND2 != 0:
        lo, hi = tl.maximum(s0, steps1) - steps1, tl.maximum(s1, steps1) - steps1
        acc = _k_steps(acc, p2, M, N, rm, rn, rk, lo, hi, KIND2, WIDTH2, DOT, BOOK_GATHER, GROUP, BLOCK_K, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)  # [BM, BN]
    first = (rn * 0 + pid_k) == 0  # [BN]: only split 0 adds the bias and the identity term
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=(rn < N) & first, other=0.0).to(tl.float32)[None, :]
    if HAS_ADDEND:
        acc += tl.load(e_ptr + rm64[:, None] * stride_em + rn[None, :], mask=mask & first[None, :], other=0.0).to(
            tl.float32
        )
    out_ptrs = out_ptr + pid_k.to(tl.int64) * stride_ok + rm64[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _csr_chunk(
    acc, a_ptrs, off, ok, val, ZERO_ROW: tl.constexpr, c: tl.constexpr, NCH: tl.constexpr, VEC: tl.constexpr
):
    """``acc [QG, VEC] += A^T[col, c VEC : (c + 1) VEC] * val`` for chunk ``c < NCH`` of the activation rows
    (``a_ptrs [1, VEC]``, ``off``, ``ok``, ``val [QG, 1]``; ``ok`` masks the gather unless ``ZERO_ROW``)."""
    if c < NCH:
        if ZERO_ROW:
            a = tl.load(a_ptrs + c * VEC + off)  # [QG, VEC]
        else:
            a = tl.load(a_ptrs + c * VEC + off, mask=ok, other=0.0)
        acc += a.to(tl.float32) * val
    return acc


@triton.jit
def _csr_nonzero(
    acc0,
    acc1,
    acc2,
    acc3,
    acc4,
    acc5,
    acc6,
    acc7,
    a_ptrs,
    col,
    ok,
    jj,
    slot,
    words_ptr,
    book_ptr,
    book_len,
    K,
    row_elems,
    WIDTH: tl.constexpr,
    ZERO_ROW: tl.constexpr,
    NCH: tl.constexpr,
    VEC: tl.constexpr,
):
    """One nonzero slot per thread (``col``, ``ok``, ``jj``, ``slot``: ``[QG]``, ``slot`` the codebook entry
    when ``WIDTH`` is 8) into the chunk accumulators ``acc0 .. acc7`` ``[QG, VEC]`` (those ``< NCH``)."""
    if WIDTH == 8:
        val = tl.load(book_ptr + slot)  # in range (clamped); a masked slot's activation is 0
    else:
        val = _dequant(words_ptr, book_ptr, book_len, jj, ok, WIDTH, 1)
    val = val[:, None]  # [QG, 1]
    if ZERO_ROW:  # masked slots read the zero row K
        off = (tl.where(ok, col, K).to(tl.uint32, bitcast=True).to(tl.int64) * row_elems)[:, None]
    else:
        off = (col.to(tl.int64) * row_elems)[:, None]
    ok = ok[:, None]
    acc0 = _csr_chunk(acc0, a_ptrs, off, ok, val, ZERO_ROW, 0, NCH, VEC)
    acc1 = _csr_chunk(acc1, a_ptrs, off, ok, val, ZERO_ROW, 1, NCH, VEC)
    acc2 = _csr_chunk(acc2, a_ptrs, off, ok, val, ZERO_ROW, 2, NCH, VEC)
    acc3 = _csr_chunk(acc3, a_ptrs, off, ok, val, ZERO_ROW, 3, NCH, VEC)
    acc4 = _csr_chunk(acc4, a_ptrs, off, ok, val, ZERO_ROW, 4, NCH, VEC)
    acc5 = _csr_chunk(acc5, a_ptrs, off, ok, val, ZERO_ROW, 5, NCH, VEC)
    acc6 = _csr_chunk(acc6, a_ptrs, off, ok, val, ZERO_ROW, 6, NCH, VEC)
    acc7 = _csr_chunk(acc7, a_ptrs, off, ok, val, ZERO_ROW, 7, NCH, VEC)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _split4(t):
    """The four columns ``[QG]`` of ``t [QG, 4]`` (each thread holds a whole row: no data movement)."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))  # columns (0, 2) and (1, 3)
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _column(c):
    """int32 column indices of loaded ``c`` (int16 ones zero-extended: a negative index is ``>= 2^15 >= K``)."""
    if c.dtype == tl.int16:
        c = c.to(tl.uint16, bitcast=True).to(tl.int32)
    return c


@triton.jit
def _csr_tail(
    indices_ptr,
    words_ptr,
    book_ptr,
    book_len,
    start,
    end,
    nnz_v,
    K,
    row_elems,
    WIDTH: tl.constexpr,
    ZERO_ROW: tl.constexpr,
    G: tl.constexpr,
):
    """``(t_off, t_ok, t_val)`` ``[BR, G]`` of a factor's tail: each row's nonzeros in ``[nnz_v, nnz)`` (fewer
    than ``G``, past the last whole group of the streams), scalar loads; ``t_off`` the offsets of their rows of
    ``A^T`` (``ZERO_ROW``: masked slots point at the zero row ``K``)."""
    tj = tl.maximum(start, nnz_v)[:, None] + tl.arange(0, G)[None, :]  # [BR, G]
    t_ok = tj < end[:, None]
    t_col = _column(tl.load(indices_ptr + tj, mask=t_ok, other=0))
    t_ok = t_ok & (t_col.to(tl.uint32, bitcast=True) < K)
    t_val = _dequant(words_ptr, book_ptr, book_len, tj, t_ok, WIDTH, 1)  # [BR, G]
    if ZERO_ROW:
        t_off = tl.where(t_ok, t_col, K).to(tl.int64) * row_elems
    else:
        t_off = t_col.to(tl.int64) * row_elems
    return t_off, t_ok, t_val


@triton.jit
def _csr_tail_add(acc2, c: tl.constexpr, t_off, t_ok, t_val, a_ptr, m0, ZERO_ROW: tl.constexpr, VEC: tl.constexpr):
    """``acc2 [BR, VEC] +`` the tail ``(t_off, t_ok, t_val)`` (:func:`_csr_tail`) times chunk ``c`` of the rows."""
    v = tl.arange(0, VEC)[None, None, :]  # [1, 1, VEC]
    if ZERO_ROW:
        a = tl.load(a_ptr + m0 + c * VEC + v + t_off[:, :, None])  # [BR, G, VEC]
    else:
        a = tl.load(a_ptr + m0 + c * VEC + v + t_off[:, :, None], mask=t_ok[:, :, None], other=0.0)
    acc2 += tl.sum(a.to(tl.float32) * t_val[:, :, None], axis=1)
    return acc2


@triton.jit
def _csr_store(
    acc,
    c: tl.constexpr,
    t_off,
    t_ok,
    t_val,
    t2_off,
    t2_ok,
    t2_val,
    a_ptr,
    out_ptr,
    stride_om,
    e_ptr,
    stride_em,
    bias_ptr,
    M,
    N,
    m0,
    pid_r,
    INIT: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ZERO_ROW: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    NCH: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    G: tl.constexpr,
):
    """``out[m, rows] (+)= sum_j acc + tail`` for chunk ``c`` (``acc [BR * BJ / G, VEC]``, rows ``m = m0 + c VEC
    + v``); the tail: the ``[BR, G]`` slots past the last whole ``G``-group of the streams (``t_off``, ...), and
    with ``HAS_SECOND`` the second factor's (``t2_off``, ...)."""
    if c < NCH:
        acc2 = tl.sum(tl.reshape(acc, (BLOCK_R, BLOCK_J // G, VEC)), axis=1)  # [BR, VEC]
        acc2 = _csr_tail_add(acc2, c, t_off, t_ok, t_val, a_ptr, m0, ZERO_ROW, VEC)
        if HAS_SECOND:
            acc2 = _csr_tail_add(acc2, c, t2_off, t2_ok, t2_val, a_ptr, m0, ZERO_ROW, VEC)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # [BR, 1]
        rm = m0 + c * VEC + tl.arange(0, VEC)[None, :]  # [1, VEC]
        rm64 = rm.to(tl.int64)
        ptrs = out_ptr + rm64 * stride_om + rows  # [BR, VEC]
        mask = (rm < M) & (rows < N)
        if INIT:
            if HAS_BIAS:
                acc2 += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
            if HAS_ADDEND:
                acc2 += tl.load(e_ptr + rm64 * stride_em + rows, mask=mask, other=0.0).to(tl.float32)
        else:
            acc2 += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _csr_walk(
    acc0,
    acc1,
    acc2,
    acc3,
    acc4,
    acc5,
    acc6,
    acc7,
    a_ptrs,
    row_elems,
    start,
    end,
    nnz_v,
    indices_ptr,
    words_ptr,
    book_ptr,
    book_len,
    K,
    WIDTH: tl.constexpr,
    ZERO_ROW: tl.constexpr,
    NCH: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    G: tl.constexpr,
):
    """The whole ``G``-groups of one factor's rows ``[start, end)`` (``[BR]``, clamped; ``nnz_v``: the whole
    groups of its streams) into the chunk accumulators ``acc0 .. acc7`` (:func:`_csr_mm_kernel`'s loop)."""
    QG: tl.constexpr = BLOCK_R * BLOCK_J // G
    longest = tl.max(end - (start // G) * G, axis=0)
    stq = tl.reshape(tl.broadcast_to(start[:, None], (BLOCK_R, BLOCK_J // G)), (QG,))  # [QG]: thread q's row
    enq = tl.reshape(tl.broadcast_to(tl.minimum(end, nnz_v)[:, None], (BLOCK_R, BLOCK_J // G)), (QG,))
    base = (stq // G) * G + (tl.arange(0, QG) % (BLOCK_J // G)) * G  # [QG]: its first group, a multiple of G
    # a slot is in its row when its position relative to the row start, as unsigned, is below the row's length
    # (one compare: a slot before the start is negative, so huge)
    rel0 = base - stq  # [QG]
    lenq = tl.maximum(enq - stq, 0).to(tl.uint32, bitcast=True)[:, None]  # [QG, 1]
    rg = tl.arange(0, G)[None, :]  # [1, G]
    codes_ptr = words_ptr.to(tl.pointer_type(tl.uint8))  # 8-bit codes: byte j of the stream
    cols_next = tl.load(indices_ptr + (base[:, None] + rg), mask=(base < enq)[:, None], other=0)  # [QG, G]
    for j0 in range(0, longest, BLOCK_J):
        gb = base + j0  # [QG]
        jj = gb[:, None] + rg  # [QG, G]
        col = _column(cols_next)
        gn = gb + BLOCK_J  # software pipelining: the next chunk's indices load while this one gathers
        cols_next = tl.load(indices_ptr + (gn[:, None] + rg), mask=(gn < enq)[:, None], other=0)
        rel = (rel0 + j0)[:, None] + rg  # [QG, G]
        # (a negative column is >= K unsigned)
        ok = (rel.to(tl.uint32, bitcast=True) < lenq) & (col.to(tl.uint32, bitcast=True) < K)
        if WIDTH == 8:  # the group's 4 codes in one load; past the codebook reads its last level
            code = tl.load(codes_ptr + jj, mask=(gb < enq)[:, None], other=0).to(tl.int32)
            slot = tl.minimum(code + 1, book_len - 1)
        else:  # unpacked per nonzero (_dequant)
            slot = jj
        c0, c1, c2, c3 = _split4(col)
        o0, o1, o2, o3 = _split4(ok)
        j0_, j1_, j2_, j3_ = _split4(jj)
        s0, s1, s2, s3 = _split4(slot)
        args = (words_ptr, book_ptr, book_len, K, row_elems)
        accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_nonzero(
            *accs, a_ptrs, c0, o0, j0_, s0, *args, WIDTH, ZERO_ROW, NCH, VEC
        )
        accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_nonzero(
            *accs, a_ptrs, c1, o1, j1_, s1, *args, WIDTH, ZERO_ROW, NCH, VEC
        )
        accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_nonzero(
            *accs, a_ptrs, c2, o2, j2_, s2, *args, WIDTH, ZERO_ROW, NCH, VEC
        )
        accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_nonzero(
            *accs, a_ptrs, c3, o3, j3_, s3, *args, WIDTH, ZERO_ROW, NCH, VEC
        )
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _csr_mm_kernel(
    out_ptr,
    stride_om,
    M,
    N,
    a_ptr,
    stride_akv,
    K,
    indptr_ptr,
    indices_ptr,
    words_ptr,
    book_ptr,
    book_len,
    nnz,
    indptr2_ptr,
    indices2_ptr,
    words2_ptr,
    book2_ptr,
    book2_len,
    nnz2,
    e_ptr,
    stride_em,
    bias_ptr,
    M_BUCKET,
    WIDTH: tl.constexpr,
    WIDTH2: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    INIT: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ZERO_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``out[m, n] (+)= sum_j A[m, col_j] * val_j`` over the nonzeros ``j`` of CSR row ``n`` of ``S [N, K]``
    (``HAS_SECOND``: of ``S`` and then of a second CSR factor ``S2 [N, K]`` on the same ``A``).

    One program: ``BLOCK_M`` rows of ``A``/``out`` times ``BLOCK_R`` rows of ``S``; it owns those
    output elements (plain read-modify-write, no atomics). ``INIT``: write ``E + bias + ...``
    instead of adding to ``out`` (the first launch of a stage, no zero fill).

    ``HAS_SECOND``: the program walks the nonzeros of the same ``BLOCK_R`` rows of ``S2`` (``indptr2``,
    ``indices2``, ``words2``, ``book2``, ``book2_len``, ``nnz2``, codes of ``WIDTH2`` bits; its own tail)
    after those of ``S``, into the same accumulators, and stores once: one launch, one pass over ``out`` and
    one gather of ``A`` per nonzero for both factors (the widths may differ, each walk is specialized on its
    own). Without it, the second factor's arguments are unused and the compiled code is the one-factor kernel.

    ``a_ptr`` is ``A^T [K (+ 1), Mp]`` row-major, row stride ``stride_akv * VEC`` elements (``Mp``, a
    multiple of ``VEC``); ``ZERO_ROW``: ``Mp`` is a multiple of ``BLOCK_M`` (columns ``M .. Mp`` are
    padding, read but never stored) and row ``K`` is zeros, where every slot past its row's end or
    with a column outside ``[0, K)`` points, so the activation gather needs no mask. Else the gather is
    masked (``BLOCK_M`` must then be ``VEC``).

    A thread owns ``G = 4`` consecutive nonzero slots of one row, aligned to a multiple of 4 in the
    streams (slots before the row's start or past its end are masked): their column indices and 8-bit
    codes are one vector load each (8 / 4 bytes), their codebook entries one load per nonzero, and each
    nonzero's ``BLOCK_M`` activations ``BLOCK_M / VEC`` (at most 8) aligned vectors of ``VEC`` (16 bytes:
    8 fp16), each chunk with its own ``[BLOCK_R * BLOCK_J / G, VEC]`` accumulator. Nonzeros past the last
    whole group of the streams (fewer than 4) are a tail, added after the loop. The column indices of
    chunk ``j + 1`` are loaded while chunk ``j`` gathers (a register prefetch), so an iteration waits on
    one load latency, not two in a chain.
    """
    NCH: tl.constexpr = BLOCK_M // VEC
    G: tl.constexpr = 4
    tl.static_assert(BLOCK_M % VEC == 0 and NCH <= 8 and (ZERO_ROW or NCH == 1) and BLOCK_J % G == 0)
    QG: tl.constexpr = BLOCK_R * BLOCK_J // G
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    start, end = _row_range(indptr_ptr, rows, N, nnz)
    nnz_v = nnz - nnz % G  # whole groups: the vector loads never pass it
    m0 = pid_m * BLOCK_M
    a_ptrs = a_ptr + m0 + tl.arange(0, VEC)[None, :]  # [1, VEC]
    # elements per row of A^T (a multiple of VEC); with ZERO_ROW, offsets are products of two zero-extended
    # 32-bit values (one wide multiply, not a 64 x 64 one)
    row_elems = tl.full((), stride_akv * VEC, tl.uint32).to(tl.int64)
    acc0 = tl.zeros((QG, VEC), dtype=tl.float32)  # one accumulator per chunk, reduced over j after the loop
    acc1 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc2 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc3 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc4 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc5 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc6 = tl.zeros((QG, VEC), dtype=tl.float32)
    acc7 = tl.zeros((QG, VEC), dtype=tl.float32)
    accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_walk(
        *accs,
        a_ptrs,
        row_elems,
        start,
        end,
        nnz_v,
        indices_ptr,
        words_ptr,
        book_ptr,
        book_len,
        K,
        WIDTH,
        ZERO_ROW,
        NCH,
        VEC,
        BLOCK_R,
        BLOCK_J,
        G,
    )
    # the tail: each row's nonzeros in [nnz_v, nnz) (fewer than G), scalar loads
    t_off, t_ok, t_val = _csr_tail(
        indices_ptr, words_ptr, book_ptr, book_len, start, end, nnz_v, K, row_elems, WIDTH, ZERO_ROW, G
    )
    if HAS_SECOND:  # the second factor's rows: the same program, accumulators and output elements
        start2, end2 = _row_range(indptr2_ptr, rows, N, nnz2)
        nnz2_v = nnz2 - nnz2 % G
        accs = (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _csr_walk(
            *accs,
            a_ptrs,
            row_elems,
            start2,
            end2,
            nnz2_v,
            indices2_ptr,
            words2_ptr,
            book2_ptr,
            book2_len,
            K,
            WIDTH2,
            ZERO_ROW,
            NCH,
            VEC,
            BLOCK_R,
            BLOCK_J,
            G,
        )
        t2_off, t2_ok, t2_val = _csr_tail(
            indices2_ptr, words2_ptr, book2_ptr, book2_len, start2, end2, nnz2_v, K, row_elems, WIDTH2, ZERO_ROW, G
        )
    else:
        t2_off, t2_ok, t2_val = t_off, t_ok, t_val  # (unused)
    st = (t_off, t_ok, t_val, t2_off, t2_ok, t2_val, a_ptr, out_ptr, stride_om, e_ptr, stride_em, bias_ptr, M, N)
    _csr_store(acc0, 0, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc1, 1, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc2, 2, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc3, 3, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc4, 4, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc5, 5, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc6, 6, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)
    _csr_store(acc7, 7, *st, m0, pid_r, INIT, HAS_ADDEND, HAS_BIAS, ZERO_ROW, HAS_SECOND, NCH, VEC, BLOCK_R, BLOCK_J, G)


@triton.jit
def _decode_kernel(
    out_ptr,
    stride_o,
    rows,
    cols,
    words_ptr,
    book_ptr,
    book_len,
    indptr_ptr,
    indices_ptr,
    nnz,
    FMT: tl.constexpr,
    WIDTH: tl.constexpr,
    ACCUM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[:rows, :cols] (+)= deq(W)`` for a packed factor ``W`` of format ``FMT`` (1 dense codes, 2 CSR,
    3 bitmap): ``indptr`` / ``indices`` are its CSR row pointers and column indices, or its bitmap's group
    pointers and words; ``nnz`` the codes they may address.

    Dense codes and bitmaps: a program writes one tile of ``BLOCK_R`` rows and ``BLOCK_C`` columns (the
    bitmap with the tile kernel's decode; ``ACCUM``: adds to it). CSR: a program walks the nonzeros of
    ``BLOCK_R`` rows, ``BLOCK_C`` at a time, and adds each into ``out`` (always; a row's columns are distinct).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    if FMT == 2:
        start, end = _row_range(indptr_ptr, r, rows, nnz)
        rj = tl.arange(0, BLOCK_C)
        for j0 in range(0, tl.max(end - start, axis=0), BLOCK_C):
            jj = start[:, None] + j0 + rj[None, :]  # [BR, BC]
            ok = jj < end[:, None]
            col = tl.load(indices_ptr + jj, mask=ok, other=0).to(tl.int32)
            ok = ok & (col.to(tl.uint32, bitcast=True) < cols)  # (a negative column is >= cols unsigned)
            val = _dequant(words_ptr, book_ptr, book_len, jj, ok, WIDTH, 1)
            ptrs = out_ptr + r[:, None].to(tl.int64) * stride_o + col
            prev = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptrs, (prev + val).to(out_ptr.dtype.element_ty), mask=ok)
    else:
        k0 = tl.program_id(1) * BLOCK_C
        c = k0 + tl.arange(0, BLOCK_C)  # [BC]
        if FMT == 3:  # [BC, BR], the tile kernel's B^T layout
            base, rel, ok = _bitmap_index(indptr_ptr, indices_ptr, nnz, cols, rows, k0, c, r, GROUP, BLOCK_C)
            book = tl.zeros((1,), dtype=tl.float32)  # unused: the codebook is read from L1
            v = _tile_values(words_ptr, base, rel, ok, book_ptr, book_len, book, WIDTH, 1, False, BLOCK_C, BLOCK_R)
            mask = (c[:, None] < cols) & (r[None, :] < rows)
            ptrs = out_ptr + r[None, :].to(tl.int64) * stride_o + c[:, None]
        else:  # [BR, BC]
            mask = (r[:, None] < rows) & (c[None, :] < cols)
            v = _dequant(words_ptr, book_ptr, book_len, r[:, None].to(tl.int64) * cols + c[None, :], mask, WIDTH, 0)
            ptrs = out_ptr + r[:, None].to(tl.int64) * stride_o + c[None, :]
        if ACCUM:
            v += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _transpose_pad_kernel(
    x_ptr,
    out_ptr,
    M,
    K,
    stride_xm,
    stride_o,
    num_m,
    FLAT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``out [K + 1, Mp] = x^T`` padded with zeros (columns ``m >= M`` and row ``K``): the CSR kernel's activation
    operand in one launch (``F.pad(x.t(), ...)`` is two, a fill and a copy). Every element of ``out`` is written.

    A program reads a ``[BLOCK_M, BLOCK_K]`` tile of ``x [M, K]`` (rows of ``x``: ``K`` contiguous, vector loads
    when ``stride_xm`` is 16-divisible) and writes it transposed, ``[BLOCK_K, BLOCK_M]`` (rows of ``x^T``; the
    layout change goes through shared memory). ``FLAT`` (``BLOCK_M == stride_o == Mp``): the tile is ``BLOCK_K``
    whole rows of ``out``, one contiguous run, stored flat and unmasked (full 16-byte vectors even when a row is
    4 or 8 bytes) except in the last row block. 1-D grid, ``pid = pid_k * num_m + pid_m`` (no axis limit below
    2^31 programs); offsets in int64 (``M K`` and ``(K + 1) Mp`` may pass 2^31).
    """
    pid = tl.program_id(0)
    pid_k = pid // num_m
    pid_m = pid % num_m
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] rows of out
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] columns of out
    src = x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :]  # [BM, BK]
    v = tl.load(src, mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # zeros: row K, columns >= M
    vt = tl.trans(v)  # [BK, BM]
    if FLAT:
        o = pid_k.to(tl.int64) * (BLOCK_K * BLOCK_M) + tl.arange(0, BLOCK_K * BLOCK_M)
        flat = tl.reshape(vt, (BLOCK_K * BLOCK_M,))
        if (pid_k + 1) * BLOCK_K <= K + 1:  # a whole tile inside out: no mask, full-width vector stores
            tl.store(out_ptr + o, flat)
        else:
            row = pid_k * BLOCK_K + tl.arange(0, BLOCK_K * BLOCK_M) // BLOCK_M
            tl.store(out_ptr + o, flat, mask=row <= K)
    else:
        dst = out_ptr + k[:, None].to(tl.int64) * stride_o + m[None, :]
        tl.store(dst, vt, mask=(k[:, None] <= K) & (m[None, :] < stride_o))
