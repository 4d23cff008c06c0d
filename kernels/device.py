"""The ``@triton.jit`` device functions the kernels of ``protoseg_ext.kernels`` share.

Triton inlines them into each kernel that calls them (no call, no extra
register), so a step written once here compiles as if written out in every
kernel; ``tests/compile_kernels.py`` compiles them inside their kernels. They
are named after the step they take:

* GEMM tiles of ``S = feats @ protos.T`` (``similarity.py``, ``embed.py``):
  :func:`_tile_columns` and :func:`_class_columns` (a tile's columns, whole
  classes of BLOCK_K prototypes), :func:`_s_tile` (the S tile, a GEMM over D,
  the feats tile LayerNorm'd in registers in EMBED mode), :func:`_dot` and
  :func:`_ds_times_protos` (the products, rounded as the GPU rounds them);
* the backward's dS tile: :func:`_upstream_rows` (the saved and upstream
  per-pixel vectors), :func:`_ds_softmax` (the PPC term),
  :func:`_ds_gathered` (the max-over-K and own-class terms); the d feats
  kernels' grid: :func:`_row_block_and_slice` (a program's row block and D
  slice);
* the head's embedding (``embed.py`` and the EMBED mode of ``similarity.py``):
  :func:`_pixel_block` / :func:`_pixel_rows` (a block's pixels in a chunk and
  in feats), :func:`_pixel_stats` (LayerNorm and L2 statistics;
  :func:`_layer_norm_sums` its second pass), :func:`_store_pixel_stats` (the
  op's stats (5, N)), :func:`_block_stats` (a block's statistics, from given
  stats or computed), :func:`_embed_tile` (the LayerNorm of a feats tile),
  :func:`_store_stats` / :func:`_load_stats` (the per-pixel rows of a chunk
  buffer);
* segmented reductions (``sinkhorn.py``, ``prototype_update.py``):
  :func:`_segment_chunk` (program j's share of a sorted segment).

Every kernel reads d * stride_d in 64 bits (``tl.cast(X_stride_d, tl.int64)``
at its top): the product passes 2**31 when D * H * W does.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------- products


@triton.jit
def _dot(a, b, acc, OPERAND_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
         ACC_DTYPE: tl.constexpr):
    # acc + a @ b with both operands rounded to OPERAND_DTYPE, as the tensor
    # cores see them. UPCAST (interpreter): multiply the rounded operands in
    # the accumulation dtype instead (exact for half operands), so the
    # interpreter rounds exactly where a GPU does.
    a = a.to(OPERAND_DTYPE)
    b = b.to(OPERAND_DTYPE)
    if UPCAST:
        a = a.to(ACC_DTYPE)
        b = b.to(ACC_DTYPE)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _ds_times_protos(ds, p, acc, DS_DTYPE: tl.constexpr, DS_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, FMA: tl.constexpr):
    # acc + dS @ protos (the backward's second product). dS stays in the
    # accumulation dtype, never rounded to fp16/bf16: its PPC/PPD terms
    # (0.01 / n_valid times a softmax weight, ~1e-9) would underflow or lose
    # digits; half inputs multiply it as TF32 on a GPU (fp32's exponent range).
    # FMA (float64): Triton's fp64 MMA cannot take an operand from registers.
    if FMA:
        return acc + tl.sum(ds[:, :, None] * p.to(ACC_DTYPE)[None, :, :], axis=1)
    else:
        return _dot(ds, p, acc, DS_DTYPE, DS_PRECISION, DOT_UPCAST, ACC_DTYPE)


# ----------------------------------------------------------------- S tiles


@triton.jit
def _tile_columns(BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # (j_cls, j_k) of the tile's columns: column j is prototype j % BLOCK_K of
    # class j // BLOCK_K of the class block (K padded to BLOCK_K)
    jj = tl.arange(0, BLOCK_C * BLOCK_K)
    return jj // BLOCK_K, jj % BLOCK_K


@triton.jit
def _class_columns(c0, j_cls, j_k, C, K, WIDE: tl.constexpr):
    # (cls, col_ok, prow) of the columns of the class block from c0: their
    # class, whether they are a real prototype (padded classes and k >= K
    # masked) and their row of protos (C*K, D); WIDE: the row in 64 bits
    # (else 32: C*K rows fit, and the tile of rows costs half the registers)
    cls = c0 + j_cls
    col_ok = (cls < C) & (j_k < K)
    if WIDE:
        prow = cls.to(tl.int64) * K + j_k
    else:
        prow = cls * K + j_k
    return cls, col_ok, prow


@triton.jit
def _s_tile(X_ptr, x_row, rows, row_ok, X_stride_hw, X_stride_d, P_ptr, prow, col_ok, D, mu, r, W_ptr, BIAS_ptr,
            ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
            EMBED: tl.constexpr, LAYER_NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
            BLOCK_D: tl.constexpr):
    # The (BLOCK_N, BLOCK_J) tile of S for the pixels `rows` and the prototype
    # rows `prow`: a GEMM over D in BLOCK_D chunks. Plain: feats row n at
    # rows * X_stride_hw (as the plain kernels always addressed it: fewer live
    # registers than a hoisted offset); EMBED: at x_row, each feats chunk
    # LayerNorm'd in registers (_embed_tile) before the product (the caller
    # scales the tile by the pixels' inverse norms). mu, r, x_row are unused
    # without EMBED.
    acc = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        if EMBED:
            x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            x = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, LAYER_NORM, ACC_DTYPE)
        else:
            x_ptrs = X_ptr + rows[:, None] * X_stride_hw + d[None, :] * X_stride_d
            x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        p = tl.load(P_ptr + prow[None, :].to(tl.int64) * D + d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                    other=0.0)
        acc = _dot(x, p, acc, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, ACC_DTYPE)
    return acc


@triton.jit
def _row_block_and_slice(D, BLOCK_DO: tl.constexpr):
    # (pid_n, pid_d): the row block and BLOCK_DO slice of D of program_id(0) in a 1-D grid with the D slices
    # of one row block adjacent: they run together and share its rows in L2, which leave HBM about once
    n_slices = tl.cdiv(D, BLOCK_DO)
    pid = tl.program_id(0).to(tl.int64)
    return pid // n_slices, pid % n_slices


@triton.jit
def _upstream_rows(LSE_ptr, LSE_stride, GLSE_ptr, GLSE_stride, LAB_ptr, LAB_stride, rows, row_ok, t,
                   ACC_DTYPE: tl.constexpr, HAS_LSE: tl.constexpr, HAS_OWN: tl.constexpr, BLOCK_N: tl.constexpr):
    # (lse, grad_lse / t, labels) of the pixels `rows`: the saved row
    # log-sum-exp and its gradient (if HAS_LSE), the labels (if HAS_OWN; -1
    # for masked rows); zeros where not needed
    lse = tl.zeros((BLOCK_N,), ACC_DTYPE)
    g_lse = lse
    lab = tl.zeros((BLOCK_N,), tl.int64)
    if HAS_LSE:
        lse = tl.load(LSE_ptr + rows * LSE_stride, mask=row_ok, other=0.0).to(ACC_DTYPE)
        g_lse = tl.load(GLSE_ptr + rows * GLSE_stride, mask=row_ok, other=0.0).to(ACC_DTYPE) / t
    if HAS_OWN:
        lab = tl.load(LAB_ptr + rows * LAB_stride, mask=row_ok, other=-1).to(tl.int64)
    return lse, g_lse, lab


@triton.jit
def _ds_softmax(s, lse, g_lse, t, mask):
    # the PPC term of dS: softmax_j(S[n] / t) * grad_lse[n] / t from the
    # saved lse (g_lse = grad_lse / t), 0 outside `mask`
    return tl.where(mask, tl.exp(s / t - lse[:, None]) * g_lse[:, None], 0.0)


@triton.jit
def _tile_ptrs(BASE_ptr, row0, n, col, stride_n, stride_col, BLOCK_OFFSETS: tl.constexpr):
    # The (len(n), len(col)) tile of pointers to rows n, columns col of a
    # matrix at BASE_ptr. BLOCK_OFFSETS: n and col are 32-bit offsets within
    # the block of rows from the 64-bit row0, summed before the one pointer add
    # (a tile of 64-bit addresses costs twice the registers). Otherwise n are
    # 64-bit rows (row0 unused), added to the pointer first.
    if BLOCK_OFFSETS:
        return BASE_ptr + row0 * stride_n + (n[:, None] * stride_n + col[None, :] * stride_col)
    else:
        return BASE_ptr + n[:, None] * stride_n + col[None, :] * stride_col


@triton.jit
def _ds_gathered(ds, GSEG_ptr, GSEG_stride_n, GSEG_stride_c, ARGK_ptr, ARGK_stride_n, ARGK_stride_c, GOWN_ptr,
                 GOWN_stride_n, GOWN_stride_k, row0, n, cls, j_k, lab, tile_ok, ACC_DTYPE: tl.constexpr,
                 HAS_SEG: tl.constexpr, HAS_OWN: tl.constexpr, BLOCK_OFFSETS: tl.constexpr):
    # ds + the seg and own terms of dS for rows n of the gradients (rows
    # row0 + n with BLOCK_OFFSETS, see _tile_ptrs):
    #   grad_seg[n, c]  at j == c*K + argk[n, c]        (the max over K)
    #   grad_own[n, k]  at j == labels[n]*K + k          (PPD, Sinkhorn)
    # gathered straight into the tile's (n, j) layout (grad_seg and argk of
    # column j's class, read BLOCK_K times from L1): no (BLOCK_N, BLOCK_C,
    # BLOCK_K) view, so no layout change.
    if HAS_SEG:
        g_seg = tl.load(_tile_ptrs(GSEG_ptr, row0, n, cls, GSEG_stride_n, GSEG_stride_c, BLOCK_OFFSETS), mask=tile_ok,
                        other=0.0).to(ACC_DTYPE)
        arg_k = tl.load(_tile_ptrs(ARGK_ptr, row0, n, cls, ARGK_stride_n, ARGK_stride_c, BLOCK_OFFSETS), mask=tile_ok,
                        other=0).to(tl.int32)
        ds += tl.where(arg_k == j_k[None, :], g_seg, 0.0)
    if HAS_OWN:
        mine = tile_ok & (cls[None, :] == lab[:, None])  # column j is prototype j_k of the pixel's class
        ds += tl.load(_tile_ptrs(GOWN_ptr, row0, n, j_k, GOWN_stride_n, GOWN_stride_k, BLOCK_OFFSETS), mask=mine,
                      other=0.0).to(ACC_DTYPE)
    return ds


# ----------------------------------------------------------------- the head's embedding


@triton.jit
def _pixel_block(block, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N: tl.constexpr):
    # EMBED addressing: (hw, row_ok, loc, x_row) of the BLOCK_N pixels of pixel
    # block `block` of image program_id(1) of the chunk; loc is the pixel
    # within the chunk (the chunk buffers' row: statistics, dS), x_row its
    # offset in feats (int64: no offset can overflow)
    img = tl.program_id(1).to(tl.int64)
    hw = HW0 + block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = hw < HW0 + HWC
    loc = img * HWC + (hw - HW0)
    x_row = (B0 + img) * X_stride_b + hw * X_stride_hw
    return hw, row_ok, loc, x_row


@triton.jit
def _pixel_rows(block, B0, HW0, HWC, HW, X_stride_b, X_stride_hw, BLOCK_N: tl.constexpr):
    # _pixel_block's (row_ok, loc, x_row) and rows, the pixels' n = b*HW + hw:
    # their row of the labels and of the per-pixel inputs and outputs
    hw, row_ok, loc, x_row = _pixel_block(block, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N)
    rows = (B0 + tl.program_id(1).to(tl.int64)) * HW + hw
    return rows, row_ok, loc, x_row


@triton.jit
def _sqrt(x):
    # correctly rounded: sqrt_rn for float32 (tl.sqrt is the approximate one there), sqrt for float64
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, LAYER_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # The LayerNorm of a (BLOCK_N, BLOCK_D) feats tile in registers, (x - mu) r w + b
    # in the accumulation dtype, exactly (w is not folded into the prototypes,
    # so no cancellation when |mean| >> std); masked lanes 0. Half feats are
    # then rounded to the dot dtype by _dot, as the eager LayerNorm's half
    # output is. Without the LayerNorm the tile is used as loaded (L2 only).
    if LAYER_NORM:
        w = tl.load(W_ptr + d, mask=d_ok, other=0.0).to(ACC_DTYPE)
        b = tl.load(BIAS_ptr + d, mask=d_ok, other=0.0).to(ACC_DTYPE)
        y = (x.to(ACC_DTYPE) - mu[:, None]) * r[:, None] * w[None, :] + b[None, :]
        return tl.where(row_ok[:, None] & d_ok[None, :], y, 0.0)
    else:
        return x


@triton.jit
def _feats_chunk(X_ptr, x_row, X_stride_d, row_ok, d0, D, BLOCK_D: tl.constexpr):
    # (x, d, d_ok, mask) of the D chunk from d0 of the pixels at x_row: the
    # (BLOCK_N, BLOCK_D) feats tile as stored (masked lanes 0)
    d = d0 + tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = row_ok[:, None] & d_ok[None, :]
    x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=m, other=0.0)
    return x, d, d_ok, m


@triton.jit
def _add_ln_sums(s_yw, s_ywx, x, y, m, mu, r, W_ptr, d, d_ok, ACC_DTYPE: tl.constexpr):
    # (s_yw, s_ywx) plus the feats chunk x's terms of sum_d y_d w_d and sum_d y_d w_d xhat_d (y: its
    # LayerNorm'd tile, m: its mask), the LayerNorm backward's sums over D
    w = tl.load(W_ptr + d, mask=d_ok, other=0.0).to(ACC_DTYPE)
    xh = tl.where(m, (x.to(ACC_DTYPE) - mu[:, None]) * r[:, None], 0.0)
    yw = y * w[None, :]
    return s_yw + tl.sum(yw, axis=1), s_ywx + tl.sum(yw * xh, axis=1)


@triton.jit
def _layer_norm_sums(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, mu, r, ACC_DTYPE: tl.constexpr,
                     BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # (sq, s_yw, s_ywx) of the LayerNorm'd pixels y = (x - mu) r w + b, one
    # pass over D: ||y||^2 and (BACKWARD; else 0) sum_d y_d w_d and
    # sum_d y_d w_d xhat_d, which the LayerNorm backward needs
    sq = tl.zeros((BLOCK_N,), ACC_DTYPE)
    s_yw = tl.zeros((BLOCK_N,), ACC_DTYPE)
    s_ywx = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        x, d, d_ok, m = _feats_chunk(X_ptr, x_row, X_stride_d, row_ok, d0, D, BLOCK_D)
        y = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, True, ACC_DTYPE)
        sq += tl.sum(y * y, axis=1)
        if BACKWARD:
            s_yw, s_ywx = _add_ln_sums(s_yw, s_ywx, x, y, m, mu, r, W_ptr, d, d_ok, ACC_DTYPE)
    return sq, s_yw, s_ywx


@triton.jit
def _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps, ACC_DTYPE: tl.constexpr,
                 LAYER_NORM: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # The statistics of BLOCK_N pixels (rows x_row of feats), over D in BLOCK_D
    # chunks: (mu, r, inv, norm, s_yw, s_ywx). LayerNorm: pass 1 sums x - shift
    # and its square, shift = the pixel's channel 0 (the variance keeps its
    # digits when |mean| >> std), pass 2 sums ||y||^2 of the LayerNorm'd pixel
    # (and, BACKWARD, sum_d y_d w_d and sum_d y_d w_d xhat_d, which the
    # LayerNorm backward needs); without it one pass of ||x||^2 (mu = 0, r = 1).
    # norm = ||y||, inv = 1 / max(norm, 1e-12).
    sq = tl.zeros((BLOCK_N,), ACC_DTYPE)
    s_yw = tl.zeros((BLOCK_N,), ACC_DTYPE)
    s_ywx = tl.zeros((BLOCK_N,), ACC_DTYPE)
    if LAYER_NORM:
        shift = tl.load(X_ptr + x_row, mask=row_ok & (D > 0), other=0.0).to(ACC_DTYPE)
        s1 = tl.zeros((BLOCK_N,), ACC_DTYPE)
        s2 = tl.zeros((BLOCK_N,), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            x, d, d_ok, m = _feats_chunk(X_ptr, x_row, X_stride_d, row_ok, d0, D, BLOCK_D)
            v = tl.where(m, x.to(ACC_DTYPE) - shift[:, None], 0.0)
            s1 += tl.sum(v, axis=1)
            s2 += tl.sum(v * v, axis=1)
        m1 = s1 / D
        mu = shift + m1
        var = tl.maximum(s2 / D - m1 * m1, 0.0)  # biased, as F.layer_norm
        r = 1.0 / _sqrt(var + tl.full((), eps, ACC_DTYPE))
        sq, s_yw, s_ywx = _layer_norm_sums(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, mu, r, ACC_DTYPE,
                                           BACKWARD, BLOCK_N, BLOCK_D)
    else:
        mu = tl.zeros((BLOCK_N,), ACC_DTYPE)
        r = tl.full((BLOCK_N,), 1.0, ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            x, d, d_ok, m = _feats_chunk(X_ptr, x_row, X_stride_d, row_ok, d0, D, BLOCK_D)
            x = x.to(ACC_DTYPE)
            sq += tl.sum(x * x, axis=1)
    norm = _sqrt(sq)
    # F.normalize's eps, in the accumulation dtype (a bare literal is float32: 1e-12 * (1 - 4e-9))
    inv = 1.0 / tl.maximum(norm, tl.full((), 1e-12, ACC_DTYPE))
    return mu, r, inv, norm, s_yw, s_ywx


@triton.jit
def _finite(v):
    # v is neither NaN nor +-inf
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _store_pixel_stats(STAT_ptr, N, rows, row_ok, mu, r, inv, norm, s_yw, s_ywx):
    # embed_similarity's stats (5, N) of the pixels `rows` (int64): rows mu,
    # r, inv, then the LayerNorm backward's sums over D, s_yw = sum_d y_d w_d
    # and s_ywx = sum_d y_d w_d xhat_d (0 without the LayerNorm), each N long;
    # NaN in all five for a pixel whose statistics are not finite (a NaN or
    # inf entry makes mu or norm so; sums of squares that overflow make norm
    # inf, or the variance inf and so r = 0)
    N = tl.cast(N, tl.int64)
    ok = _finite(mu) & _finite(r) & (r > 0) & _finite(norm)
    tl.store(STAT_ptr + rows, tl.where(ok, mu, float("nan")), mask=row_ok)
    tl.store(STAT_ptr + N + rows, tl.where(ok, r, float("nan")), mask=row_ok)
    tl.store(STAT_ptr + 2 * N + rows, tl.where(ok, inv, float("nan")), mask=row_ok)
    tl.store(STAT_ptr + 3 * N + rows, tl.where(ok, s_yw, float("nan")), mask=row_ok)
    tl.store(STAT_ptr + 4 * N + rows, tl.where(ok, s_ywx, float("nan")), mask=row_ok)


@triton.jit
def _block_stats(STAT_ptr, N, rows, X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps,
                 ACC_DTYPE: tl.constexpr, LAYER_NORM: tl.constexpr, BACKWARD: tl.constexpr, GIVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # _pixel_stats' (mu, r, inv, norm, s_yw, s_ywx) of the pixels `rows`.
    # GIVEN: from embed_similarity's stats (5, N) instead of the statistics
    # pass (s_yw, s_ywx only for BACKWARD with the LayerNorm, else 0; norm is
    # then a stand-in, 1 where ||y|| > 1e-12, i.e. where inv < 1 / 1e-12,
    # else 0: all the backward asks of it). A
    # block with a NaN column (a pixel whose statistics were not finite)
    # computes its statistics as without stats, so that the results are the
    # same either way.
    if GIVEN:
        N = tl.cast(N, tl.int64)
        mu = tl.load(STAT_ptr + rows, mask=row_ok, other=0.0)
        r = tl.load(STAT_ptr + N + rows, mask=row_ok, other=1.0)
        inv = tl.load(STAT_ptr + 2 * N + rows, mask=row_ok, other=1.0)
        if tl.max(tl.where(row_ok & (inv != inv), 1, 0), axis=0) > 0:
            mu, r, inv, norm, s_yw, s_ywx = _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps,
                                                         ACC_DTYPE, LAYER_NORM, BACKWARD, BLOCK_N, BLOCK_D)
        else:
            inv_max = 1.0 / tl.full((), 1e-12, ACC_DTYPE)  # inv of ||y|| <= 1e-12, rounded as _pixel_stats does
            norm = tl.where(inv < inv_max, 1.0, 0.0).to(ACC_DTYPE)
            s_yw = tl.zeros((BLOCK_N,), ACC_DTYPE)
            s_ywx = tl.zeros((BLOCK_N,), ACC_DTYPE)
            if BACKWARD and LAYER_NORM:
                s_yw = tl.load(STAT_ptr + 3 * N + rows, mask=row_ok, other=0.0)
                s_ywx = tl.load(STAT_ptr + 4 * N + rows, mask=row_ok, other=0.0)
    else:
        mu, r, inv, norm, s_yw, s_ywx = _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps,
                                                     ACC_DTYPE, LAYER_NORM, BACKWARD, BLOCK_N, BLOCK_D)
    return mu, r, inv, norm, s_yw, s_ywx


@triton.jit
def _store_stats(STAT_ptr, loc, row_ok, mu, r, inv, WIDTH: tl.constexpr):
    # (mu, r, inv) into the first three columns of the pixels' rows loc of a (chunk, WIDTH) buffer
    tl.store(STAT_ptr + loc * WIDTH, mu, mask=row_ok)
    tl.store(STAT_ptr + loc * WIDTH + 1, r, mask=row_ok)
    tl.store(STAT_ptr + loc * WIDTH + 2, inv, mask=row_ok)


@triton.jit
def _load_stats(STAT_ptr, loc, row_ok, WIDTH: tl.constexpr):
    # (mu, r, inv) of the pixels loc: the first three columns of their rows of a (chunk, WIDTH) buffer
    mu = tl.load(STAT_ptr + loc * WIDTH, mask=row_ok, other=0.0)
    r = tl.load(STAT_ptr + loc * WIDTH + 1, mask=row_ok, other=0.0)
    inv = tl.load(STAT_ptr + loc * WIDTH + 2, mask=row_ok, other=0.0)
    return mu, r, inv


# ----------------------------------------------------------------- segmented reductions


@triton.jit
def _segment_chunk(OFFS_ptr, seg, j, SPLIT):
    # (lo, hi, n): the j-th of SPLIT equal chunks [lo, hi) of segment `seg`
    # [offsets[seg], offsets[seg + 1]) of a sorted order, and the segment's length n
    start = tl.load(OFFS_ptr + seg)
    end = tl.load(OFFS_ptr + seg + 1)
    n = end - start
    chunk = tl.cdiv(n, SPLIT)
    lo = start + j * chunk
    hi = tl.minimum(lo + chunk, end)
    return lo, hi, n
