"""Triton kernels of ``embed_similarity``, its backward and ``embed_prototype_sums``: the head's embedding fused in.

The head's embedding of a pixel is ``z = y / max(||y||, 1e-12)`` with ``y`` the
LayerNorm over D of its feature vector ``x`` (``y_d = (x_d - mu) r w_d + b_d``,
``r = 1 / sqrt(var + eps)``, biased variance), or ``y = x`` without the
LayerNorm. ``feats`` is read as the backbone gives it: rows (N, D), or a
(B, D, H, W) map as it lies (NCHW planes or channels-last; pixel
n = b*H*W + h*W + w), through (image, pixel, channel) strides. Nothing of size
(N, D) is allocated besides the returned gradient: never a permuted or
normalised copy of the map.

Per chunk of pixels (``CHUNK_PIXELS``, 65,536 by default: whole images, or a
pixel range of one image):

* statistics ``(mu, r, inv)`` of each pixel in the accumulation dtype
  (float32; float64 for float64 feats), and the two sums over D that the
  LayerNorm backward needs besides them (``s_yw = sum_d y_d w_d``,
  ``s_ywx = sum_d y_d w_d xhat_d``; 0 without the LayerNorm): the forward
  computes its pixel block's (``device._pixel_stats``) before its main loop,
  which then finds the block's rows in L2, and writes them to the op's
  ``stats`` (5, N) (NaN where not finite; the own-only forward:
  ``embed_stats_kernel`` writes them, the gathered kernel reads them). The
  backward and the sums given those stats read them instead of their own
  statistics pass (``device._block_stats``; a block with a NaN column
  computes its statistics as without stats, so both give the same
  results): the map is then read by the GEMMs alone; without stats each
  kernel computes its block's as the forward does;
* forward: ``similarity_fwd_kernel`` in EMBED mode (kernels/similarity.py; own
  alone: ``own_class_scores_kernel`` in EMBED mode, gathered by label): each
  feats tile is LayerNorm'd in registers before the dot, each S tile scaled by
  ``inv`` before the epilogue. Exact: w is not folded into the prototypes (no
  cancellation when |mean| / std is large), and half feats give y rounded to
  the dot dtype, as the eager half LayerNorm's output is;
* backward: ``embed_ds_kernel`` computes each 64-pixel block's statistics
  itself (feats' rows then sit in L2), recomputes S once per (pixel block,
  class block) over all of D, and writes dS ``(chunk, C*K)`` and six
  per-pixel scalars in the accumulation dtype: the L2 and LayerNorm backward's
  sums over D follow from the S and dS tiles (``sum_d g_d z_d = sum_j dS_j
  S_j`` and the like, with ``protos @ w`` and ``protos @ b``), so g = dS @
  protos is never stored; then ``embed_dx_kernel`` multiplies dS @ protos
  over the C*K real columns per (pixel block, D slice) and its epilogue
  writes d feats straight into the gradient in feats' own layout and dtype,
  with per-block partials ``(blocks, D)`` of d ln_weight and d ln_bias summed
  by ``torch.sum`` (deterministic, no atomics). Given the forward's S
  (``scores``: the op's cache within ``cache_bytes``, which the forward's
  kernel writes as it computes each tile, ``KEEP_SCORES``) ``embed_ds_kernel``
  reads each S tile instead of recomputing it (``GIVEN_SCORES``: no GEMM;
  given the stats too, no read of the map);
* sums: ``embed_rows_kernel`` (its own statistics, or the given ones) writes the z of the chunk's pixels
  that have a slot into a ``(chunk, D)`` buffer, and each pixel's sort key (its slot, or ``num_slots``
  where it has none or its z is not finite), and ``prototype_update.prototype_sums`` sums the rows by
  key, without a pass of its own over the buffer to find them; chunk results are added in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import prototype_update as _update
from . import similarity as _sim
from .common import INTERPRET_TILES, TL_DTYPE, acc_dtype, dot_config, dummy, gemm_kind, pow2, s_dots
from .device import (_block_stats, _class_columns, _ds_gathered, _ds_softmax, _ds_times_protos, _embed_tile,
                     _feats_chunk, _finite, _load_stats, _pixel_block, _pixel_rows, _pixel_stats, _row_block_and_slice,
                     _s_tile, _store_pixel_stats, _store_stats, _tile_columns, _upstream_rows)
from .tiles import EMBED_GPU_TILES, embed_dx_tiles

__all__ = ["CHUNK_PIXELS", "STATS_ROWS", "pixel_view", "pixel_chunks", "embed_similarity_forward",
           "embed_similarity_backward", "embed_prototype_sums"]

# pixels per chunk: the size of the statistics, d z and z buffers (tests lower it)
CHUNK_PIXELS = 1 << 16
# rows of embed_similarity's stats: mu, r, inv, and the LayerNorm backward's s_yw, s_ywx
STATS_ROWS = 5
# The traffic meter's view of the chunk loops (tools/triton_meter.py sets it while it meters):
# ``tile(chunk, pixels)`` at each chunk's start, ``tiles_end()`` after the loop. None: nothing called.
CHUNK_OBSERVER = None
MAX_IMAGES = 65535  # images per chunk: CUDA's limit on grid axis 1


@triton.jit
def embed_stats_kernel(
    X_ptr,  # feats: pixel hw of image b, channel d at b*X_stride_b + hw*X_stride_hw + d*X_stride_d
    X_stride_b,
    X_stride_hw,
    X_stride_d,
    W_ptr,  # LayerNorm weight (D,) (if LAYER_NORM)
    BIAS_ptr,  # LayerNorm bias (D,) (if LAYER_NORM)
    STAT_ptr,  # out (5, N) acc dtype, the op's stats: mu, r = 1/sqrt(var + eps), inv = 1/max(||y||, 1e-12),
    # s_yw = sum_d y_d w_d, s_ywx = sum_d y_d w_d xhat_d
    B0,  # first image of the chunk
    HW0,  # first pixel of the chunk in each image
    HWC,  # pixels of the chunk in each image
    HW,  # pixels per image: pixel n = b*HW + hw
    N,  # pixels of feats: the row length of stats
    D,
    eps: tl.float64,
    ACC_DTYPE: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The statistics of BLOCK_N pixels (_pixel_stats) for the own-only forward
    # and the op's stats (NaN where not finite: _store_pixel_stats).
    # GPU (kernels/tiles.py EMBED_GPU_TILES): CUDA-core FMAs; shared memory
    # only for the row reductions. Memory-bound: feats is read twice (the
    # second time from L2: 32 px x 720 channels are 90 KB in fp32), 12 B a
    # pixel written.
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    hw, row_ok, loc, x_row = _pixel_block(tl.program_id(0), B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N)
    mu, r, inv, norm, s_yw, s_ywx = _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps, ACC_DTYPE,
                                                 LAYER_NORM, True, BLOCK_N, BLOCK_D)
    # pixel n = n0 + loc, n0 = B0*HW + HW0 the chunk's first
    _store_pixel_stats(STAT_ptr + (tl.cast(B0, tl.int64) * HW + HW0), N, loc, row_ok, mu, r, inv, norm, s_yw, s_ywx)


@triton.jit
def _ln_backward_sums(t1, t2, t3, ds, ys, tile_ok, PW_ptr, PB_ptr, prow, col_ok, LAYER_NORM: tl.constexpr):
    # the dS tile's share of the L2 and LayerNorm backward's per-pixel sums:
    # t1 += sum_j dS_j (y . protos_j), t2 += sum_j dS_j (protos_j . w), t3 += sum_j dS_j (protos_j . b)
    t1 += tl.sum(tl.where(tile_ok, ds * ys, 0.0), axis=1)
    if LAYER_NORM:
        pw = tl.load(PW_ptr + prow, mask=col_ok, other=0.0)
        pb = tl.load(PB_ptr + prow, mask=col_ok, other=0.0)
        t2 += tl.sum(ds * pw[None, :], axis=1)
        t3 += tl.sum(ds * pb[None, :], axis=1)
    return t1, t2, t3


@triton.jit
def _store_backward_scalars(SC_ptr, loc, row_ok, mu, r, inv, norm, s_yw, s_ywx, t1, t2, t3, D,
                            ACC_DTYPE: tl.constexpr):
    # embed_dx_kernel's per-pixel scalars (mu, r, inv, a1, m1, m2) from the
    # statistics and the sums over the pixel's dS row (_ln_backward_sums), so
    # that g = dS @ protos is never stored (embed_dx_kernel makes its slice):
    #   a1 = sum_d g_d z_d = sum_j dS_j S_j = inv t1        (0 when ||y|| <= 1e-12)
    #   sum_d g_d w_d = t2,  sum_d g_d w_d xhat_d = t1 - t3    (y = xhat w + b)
    #   m1 = inv (sum g w - a1 sum z w) / D,  m2 = inv (sum g w xhat - a1 sum z w xhat) / D
    # then dx = r (inv (g - z a1) w - m1 - xhat m2)
    a1 = tl.where(norm > tl.full((), 1e-12, ACC_DTYPE), inv * t1, 0.0)
    m1 = inv * (t2 - a1 * inv * s_yw) / D
    m2 = inv * (t1 - t3 - a1 * inv * s_ywx) / D
    _store_stats(SC_ptr, loc, row_ok, mu, r, inv, 6)
    tl.store(SC_ptr + loc * 6 + 3, a1, mask=row_ok)
    tl.store(SC_ptr + loc * 6 + 4, m1, mask=row_ok)
    tl.store(SC_ptr + loc * 6 + 5, m2, mask=row_ok)


@triton.jit
def _block_bases(B0, HW0, HWC, HW, BLOCK_N: tl.constexpr):
    # (n0, l0, i): the block's first pixel n0 and its row l0 of the chunk in 64 bits, offsets i within the block
    # in 32 (the (n, j) tiles' addresses: the gradients and dS are contiguous, so i * row < 2**31; see _tile_ptrs)
    n0 = (B0 + tl.program_id(1).to(tl.int64)) * HW + HW0 + tl.program_id(0).to(tl.int64) * BLOCK_N
    l0 = tl.program_id(1).to(tl.int64) * HWC + tl.program_id(0).to(tl.int64) * BLOCK_N
    return n0, l0, tl.arange(0, BLOCK_N)


@triton.jit
def _ds_class_block(ys, cls, col_ok, prow, tile_ok, inv, lse, g_lse, t, lab, n0, l0, i, j_k, CK, t1, t2, t3,
                    GSEG_ptr, GSEG_stride_n, GSEG_stride_c, ARGK_ptr, ARGK_stride_n, ARGK_stride_c,
                    GOWN_ptr, GOWN_stride_n, GOWN_stride_k, DS_ptr, PW_ptr, PB_ptr, ACC_DTYPE: tl.constexpr,
                    LAYER_NORM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_LSE: tl.constexpr, HAS_OWN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    # one class block of embed_ds_kernel from its S tile ys (y . protos_j):
    # dS written, the L2 and LayerNorm backward's sums t1, t2, t3 updated
    ds = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)
    if HAS_LSE:
        ds = _ds_softmax(ys * inv[:, None], lse, g_lse, t, tile_ok)
    ds = _ds_gathered(ds, GSEG_ptr, GSEG_stride_n, GSEG_stride_c, ARGK_ptr, ARGK_stride_n, ARGK_stride_c,
                      GOWN_ptr, GOWN_stride_n, GOWN_stride_k, n0, i, cls, j_k, lab, tile_ok, ACC_DTYPE, HAS_SEG,
                      HAS_OWN, True)
    tl.store(DS_ptr + l0 * CK + (i[:, None] * CK + prow[None, :]), ds, mask=tile_ok)
    return _ln_backward_sums(t1, t2, t3, ds, ys, tile_ok, PW_ptr, PB_ptr, prow, col_ok, LAYER_NORM)


@triton.jit
def embed_ds_kernel(
    GSEG_ptr, GSEG_stride_n, GSEG_stride_c,  # d loss / d seg (N, C), contiguous (if HAS_SEG)
    GLSE_ptr, GLSE_stride,  # d loss / d lse (N,) (if HAS_LSE)
    GOWN_ptr, GOWN_stride_n, GOWN_stride_k,  # d loss / d own (N, K), contiguous (if HAS_OWN)
    # feats: pixel hw of image b, channel d at b*X_stride_b + hw*X_stride_hw + d*X_stride_d
    X_ptr, X_stride_b, X_stride_hw, X_stride_d,
    P_ptr,  # protos (C*K, D) contiguous
    PW_ptr, PB_ptr,  # (C*K,) acc dtype: protos @ ln_weight, protos @ ln_bias (if LAYER_NORM)
    LAB_ptr, LAB_stride,  # labels (N,) (if HAS_OWN)
    ARGK_ptr, ARGK_stride_n, ARGK_stride_c,  # saved arg-max k (N, C) uint8, contiguous (if HAS_SEG)
    LSE_ptr, LSE_stride,  # saved row log-sum-exp (N,) (if HAS_LSE)
    W_ptr, BIAS_ptr,  # LayerNorm weight, bias (D,) (if LAYER_NORM)
    DS_ptr,  # out (pixels of the chunk, C*K) acc dtype: dS = d loss / d S of the embedding
    SC_ptr,  # out (pixels of the chunk, 6) acc dtype: mu, r, inv, a1, m1, m2 (embed_dx_kernel's scalars)
    STAT_ptr,  # (5, N) acc dtype: the forward's stats (if GIVEN_STATS)
    SCORES_ptr,  # (N, C*K) acc dtype: the forward's S (if GIVEN_SCORES: its cache)
    B0,  # first image of the chunk (grid axis 1: its images)
    HW0,  # first pixel of the chunk in each image
    HWC,  # pixels of the chunk in each image
    HW,  # pixels per image: pixel n = b*HW + hw
    N,  # pixels of feats: the row length of stats
    D, C, K,
    temperature: tl.float64,
    eps: tl.float64,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    LAYER_NORM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_LSE: tl.constexpr, HAS_OWN: tl.constexpr,
    GIVEN_STATS: tl.constexpr, GIVEN_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The backward's first half, per BLOCK_N pixels: their statistics
    # (_pixel_stats: feats' rows then sit in L2 for the GEMM; GIVEN_STATS: the
    # forward's, _block_stats, the two sums the LayerNorm backward needs among
    # them), then, one class
    # block at a time, the S tile of the embedding z = y inv recomputed once
    # (full D), turned into
    #   dS[n, j] = softmax_j(S[n] / t) * grad_lse[n] / t            (PPC)
    #            + grad_seg[n, c]  if j == c*K + argk[n, c]          (max over K)
    #            + grad_own[n, k]  if j == labels[n]*K + k           (PPD, Sinkhorn)
    # and written (fp32: the PPC/PPD terms, ~1e-9, need its range and digits)
    # for embed_dx_kernel's GEMM g = dS @ protos (g = d loss / d z). The
    # per-pixel scalars of the L2 and LayerNorm backward follow from the S and
    # dS tiles, with no g (_ln_backward_sums, _store_backward_scalars).
    # GIVEN_SCORES: the S tiles are read from the forward's cache instead (no
    # GEMM; given the forward's stats too, the map is not read at all).
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    BLOCK_J: tl.constexpr = BLOCK_C * BLOCK_K
    rows, row_ok, loc, x_row = _pixel_rows(tl.program_id(0), B0, HW0, HWC, HW, X_stride_b, X_stride_hw, BLOCK_N)
    n0, l0, i = _block_bases(B0, HW0, HWC, HW, BLOCK_N)
    # (given stats: the LayerNorm backward's two sums over D are among them)
    mu, r, inv, norm, s_yw, s_ywx = _block_stats(STAT_ptr, N, rows, X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr,
                                                 D, eps, ACC_DTYPE, LAYER_NORM, True, GIVEN_STATS, BLOCK_N, BLOCK_D)
    CK = C * K
    j_cls, j_k = _tile_columns(BLOCK_C, BLOCK_K)
    t = tl.full((), temperature, ACC_DTYPE)
    lse, g_lse, lab = _upstream_rows(LSE_ptr, LSE_stride, GLSE_ptr, GLSE_stride, LAB_ptr, LAB_stride, rows, row_ok,
                                     t, ACC_DTYPE, HAS_LSE, HAS_OWN, BLOCK_N)
    t1 = tl.zeros((BLOCK_N,), ACC_DTYPE)  # sum_j dS_j (y . protos_j): a1 = inv t1
    t2 = tl.zeros((BLOCK_N,), ACC_DTYPE)  # sum_j dS_j (protos_j . w) = sum_d g_d w_d
    t3 = tl.zeros((BLOCK_N,), ACC_DTYPE)  # sum_j dS_j (protos_j . b): sum_d g_d w_d xhat_d = t1 - t3
    if GIVEN_SCORES:  # the cached tiles are S = ys inv: t1 sums dS_j S_j (divided by inv after the loop)
        s_scale = tl.full((BLOCK_N,), 1.0, ACC_DTYPE)
    else:
        s_scale = inv
    for c0 in range(0, C, BLOCK_C):
        cls, col_ok, prow = _class_columns(c0, j_cls, j_k, C, K, False)  # prow < C*K: 32-bit
        if GIVEN_SCORES:
            tile_ok = row_ok[:, None] & col_ok[None, :]
            ys = tl.load(SCORES_ptr + n0 * CK + (i[:, None] * CK + prow[None, :]), mask=tile_ok, other=0.0)
        else:
            tile_ok = row_ok[:, None] & col_ok[None, :]
            ys = _s_tile(X_ptr, x_row, rows, row_ok, X_stride_hw, X_stride_d, P_ptr, prow, col_ok, D, mu, r, W_ptr,
                         BIAS_ptr, ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, True, LAYER_NORM, BLOCK_N, BLOCK_J,
                         BLOCK_D)  # y . protos_j, recomputed; S = ys inv
        t1, t2, t3 = _ds_class_block(ys, cls, col_ok, prow, tile_ok, s_scale, lse, g_lse, t, lab, n0, l0, i, j_k, CK,
                                     t1, t2, t3, GSEG_ptr, GSEG_stride_n, GSEG_stride_c, ARGK_ptr, ARGK_stride_n,
                                     ARGK_stride_c, GOWN_ptr, GOWN_stride_n, GOWN_stride_k, DS_ptr, PW_ptr, PB_ptr,
                                     ACC_DTYPE, LAYER_NORM, HAS_SEG, HAS_LSE, HAS_OWN, BLOCK_N, BLOCK_J)
    if GIVEN_SCORES:
        t1 = t1 / inv
    if GIVEN_STATS:  # ||y|| > 1e-12 from inv (not kept live through the class loop)
        norm = tl.where(inv < 1.0 / tl.full((), 1e-12, ACC_DTYPE), 1.0, 0.0).to(ACC_DTYPE)
    _store_backward_scalars(SC_ptr, loc, row_ok, mu, r, inv, norm, s_yw, s_ywx, t1, t2, t3, D, ACC_DTYPE)


@triton.jit
def _ds_protos_slice(DS_ptr, P_ptr, loc, row_ok, dout, dout_ok, D, CK, ACC_DTYPE: tl.constexpr,
                     DS_DTYPE: tl.constexpr, DS_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, FMA: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DO: tl.constexpr):
    # g = dS @ protos[:, dout] for the pixels loc of the chunk, over the C*K
    # real columns in BLOCK_J chunks (no class padding)
    g = tl.zeros((BLOCK_N, BLOCK_DO), ACC_DTYPE)
    for j0 in range(0, CK, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        j_ok = jj < CK
        ds = tl.load(DS_ptr + loc[:, None] * CK + jj[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        p = tl.load(P_ptr + jj[:, None].to(tl.int64) * D + dout[None, :], mask=j_ok[:, None] & dout_ok[None, :],
                    other=0.0)
        g = _ds_times_protos(ds, p, g, DS_DTYPE, DS_PRECISION, DOT_UPCAST, ACC_DTYPE, FMA)
    return g


@triton.jit
def _store_embed_dx(g, X_ptr, x_row, X_stride_d, SC_ptr, loc, row_ok, W_ptr, BIAS_ptr, dout, dout_ok, DX_ptr, dx_row,
                    DX_stride_d, DW_ptr, DB_ptr, blk, D, ACC_DTYPE: tl.constexpr, LAYER_NORM: tl.constexpr):
    # g (d loss / d z) through the L2 normalisation and the LayerNorm with
    # embed_ds_kernel's scalars: dy = inv (g - z a1), dx = r (dy w - m1 - xhat m2)
    # (LayerNorm; else dx = dy), xhat = (x - mu) r and z = (xhat w + b) inv from
    # feats' slice; dx stored in feats' layout and dtype, and (LayerNorm) the
    # block's column sums of d w = dy xhat and d b = dy added into its row blk of
    # the partials (one program per entry and launch; the chunks add in order)
    mu, r, inv = _load_stats(SC_ptr, loc, row_ok, 6)
    a1 = tl.load(SC_ptr + loc * 6 + 3, mask=row_ok, other=0.0)
    m = row_ok[:, None] & dout_ok[None, :]
    x = tl.load(X_ptr + x_row[:, None] + dout[None, :] * X_stride_d, mask=m, other=0.0).to(ACC_DTYPE)
    if LAYER_NORM:
        m1 = tl.load(SC_ptr + loc * 6 + 4, mask=row_ok, other=0.0)
        m2 = tl.load(SC_ptr + loc * 6 + 5, mask=row_ok, other=0.0)
        w = tl.load(W_ptr + dout, mask=dout_ok, other=0.0).to(ACC_DTYPE)
        b = tl.load(BIAS_ptr + dout, mask=dout_ok, other=0.0).to(ACC_DTYPE)
        xh = tl.where(m, (x - mu[:, None]) * r[:, None], 0.0)
        y = tl.where(m, xh * w[None, :] + b[None, :], 0.0)
    else:
        y = x
    dy = tl.where(m, inv[:, None] * (g - y * inv[:, None] * a1[:, None]), 0.0)
    if LAYER_NORM:
        dx = r[:, None] * (dy * w[None, :] - m1[:, None] - xh * m2[:, None])
        pw = tl.load(DW_ptr + blk * D + dout, mask=dout_ok, other=0.0)
        pb = tl.load(DB_ptr + blk * D + dout, mask=dout_ok, other=0.0)
        tl.store(DW_ptr + blk * D + dout, pw + tl.sum(dy * xh, axis=0), mask=dout_ok)
        tl.store(DB_ptr + blk * D + dout, pb + tl.sum(dy, axis=0), mask=dout_ok)
    else:
        dx = dy
    tl.store(DX_ptr + dx_row[:, None] + dout[None, :] * DX_stride_d, dx.to(DX_ptr.dtype.element_ty), mask=m)


@triton.jit
def embed_dx_kernel(
    DS_ptr,  # (pixels of the chunk, C*K) acc dtype: dS (embed_ds_kernel)
    SC_ptr,  # (pixels of the chunk, 6) acc dtype: mu, r, inv, a1, m1, m2 (embed_ds_kernel)
    P_ptr,  # protos (C*K, D) contiguous
    X_ptr,  # feats, as in embed_ds_kernel
    X_stride_b,
    X_stride_hw,
    X_stride_d,
    W_ptr,  # LayerNorm weight (D,) (if LAYER_NORM)
    BIAS_ptr,  # LayerNorm bias (D,) (if LAYER_NORM)
    DX_ptr,  # out d feats, feats' shape, layout and dtype: (image, pixel, channel) strides below
    DX_stride_b,
    DX_stride_hw,
    DX_stride_d,
    DW_ptr,  # in/out (pixel blocks, D) acc dtype: this pixel block's part of d ln_weight added (if LAYER_NORM)
    DB_ptr,  # in/out (pixel blocks, D) acc dtype: this pixel block's part of d ln_bias added (if LAYER_NORM)
    B0,
    HW0,
    HWC,
    D,
    CK,  # C*K
    ACC_DTYPE: tl.constexpr,
    DS_DTYPE: tl.constexpr,
    DS_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    FMA_SECOND_GEMM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # d feats of BLOCK_N pixels and a BLOCK_DO slice of D (grid: pixel blocks
    # x D slices, the slices of one block adjacent: they share its dS rows in
    # L2): g = dS @ protos[:, slice] (_ds_protos_slice), then the epilogue
    # chains g through the L2 normalisation and the LayerNorm and writes dx
    # and the block's partials of d w and d b (_store_embed_dx: added into its
    # row, over the chunks in order; summed over the blocks by torch.sum once,
    # after the last chunk: deterministic, and no launch per chunk). The
    # product multiplies dS as TF32 (fp32 range) for half inputs, tf32x3 for
    # float32, FMAs for float64.
    X_stride_d, DX_stride_d = tl.cast(X_stride_d, tl.int64), tl.cast(DX_stride_d, tl.int64)
    pid_n, pid_d = _row_block_and_slice(D, BLOCK_DO)
    hw, row_ok, loc, x_row = _pixel_block(pid_n, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N)
    img = tl.program_id(1).to(tl.int64)
    blk = img * tl.cdiv(HWC, BLOCK_N) + pid_n  # row of the partials
    dx_row = (B0 + img) * DX_stride_b + hw * DX_stride_hw
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    g = _ds_protos_slice(DS_ptr, P_ptr, loc, row_ok, dout, dout_ok, D, CK, ACC_DTYPE, DS_DTYPE, DS_PRECISION,
                         DOT_UPCAST, FMA_SECOND_GEMM, BLOCK_N, BLOCK_J, BLOCK_DO)
    _store_embed_dx(g, X_ptr, x_row, X_stride_d, SC_ptr, loc, row_ok, W_ptr, BIAS_ptr, dout, dout_ok, DX_ptr, dx_row,
                    DX_stride_d, DW_ptr, DB_ptr, blk, D, ACC_DTYPE, LAYER_NORM)


@triton.jit
def embed_rows_kernel(
    X_ptr,  # feats, as in embed_stats_kernel
    X_stride_b,
    X_stride_hw,
    X_stride_d,
    W_ptr,  # LayerNorm weight (D,) (if LAYER_NORM)
    BIAS_ptr,  # LayerNorm bias (D,) (if LAYER_NORM)
    Z_ptr,  # out (pixels of the chunk, D) acc dtype: the embedding z = y inv of the rows with a slot
    STAT_ptr,  # (5, N) acc dtype: embed_similarity's stats (if GIVEN_STATS)
    SLOT_ptr,  # (N,) integer: each pixel's prototype slot, < 0 for none
    SLOT_stride,
    KEY_ptr,  # out (pixels of the chunk,) int64: the slot, or num_slots where the pixel takes no part
    num_slots,
    B0,
    HW0,
    HWC,
    HW,  # pixels per image: pixel n = b*HW + hw
    N,  # pixels of feats: the row length of stats
    D,
    eps: tl.float64,
    ACC_DTYPE: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    GIVEN_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The chunk's embedding rows for the prototype sums, and their sort keys
    # (prototype_sums' prototype_slot_key_kernel, without a pass over z): a
    # pixel takes part when its slot is in [0, num_slots) and its z row is
    # finite (a non-finite pixel gives a non-finite z: NaN mean, or inf * 0
    # without the LayerNorm; the test is the key kernel's, on the same z in
    # the accumulation dtype). Rows without a slot are computed but not
    # stored: prototype_sums reads only the rows its keys sort into a slot.
    # GPU: the stats kernel's tile. GIVEN_STATS: the statistics read from
    # embed_similarity's stats (_block_stats), so the rows are read once
    # instead of three times (twice without the LayerNorm).
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    rows, row_ok, loc, x_row = _pixel_rows(tl.program_id(0), B0, HW0, HWC, HW, X_stride_b, X_stride_hw, BLOCK_N)
    mu, r, inv, _norm, _syw, _sywx = _block_stats(STAT_ptr, N, rows, X_ptr, x_row, row_ok, X_stride_d, W_ptr,
                                                  BIAS_ptr, D, eps, ACC_DTYPE, LAYER_NORM, False, GIVEN_STATS,
                                                  BLOCK_N, BLOCK_D)
    slot = tl.load(SLOT_ptr + rows * SLOT_stride, mask=row_ok, other=-1).to(tl.int64)
    has_slot = row_ok & (slot >= 0) & (slot < num_slots)
    finite = has_slot
    for d0 in range(0, D, BLOCK_D):
        x, d, d_ok, m = _feats_chunk(X_ptr, x_row, X_stride_d, row_ok, d0, D, BLOCK_D)
        y = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, LAYER_NORM, ACC_DTYPE).to(ACC_DTYPE)
        z = y * inv[:, None]
        ok = _finite(z) | ~d_ok[None, :]
        finite = finite & (tl.min(ok.to(tl.int32), axis=1) > 0)
        tl.store(Z_ptr + loc[:, None] * D + d[None, :], z, mask=has_slot[:, None] & d_ok[None, :])
    tl.store(KEY_ptr + loc, tl.where(finite, slot, num_slots), mask=row_ok)


# ----------------------------------------------------------------- launchers


def pixel_view(t):
    """``(B, HW, stride_b, stride_hw, stride_d)`` of feats (N, D) (one image of N pixels) or (B, D, H, W).

    None when a map's (H, W) plane has no single pixel stride (a sliced view
    such as ``x[..., ::2]`` of a channels-last map is fine; ``x[:, :, :, :-1]``
    of an NCHW one is not).
    """
    if t.dim() == 2:
        return 1, t.shape[0], 0, t.stride(0), t.stride(1)
    B, _, H, W = t.shape
    if W == 1:
        s_hw = t.stride(2)
    elif H == 1 or t.stride(2) == W * t.stride(3):
        s_hw = t.stride(3)
    else:
        return None
    return B, H * W, t.stride(0), s_hw, t.stride(1)


def pixel_chunks(B: int, HW: int, chunk: int):
    """``(b0, nb, hw0, hwc)``: the chunks in pixel order, ``nb`` whole images of ``hwc = HW`` pixels
    (at most ``chunk`` pixels and 65,535 images), or ``hwc <= chunk`` pixels of one image from ``hw0``.

    Chunk ``(b0, nb, hw0, hwc)`` holds pixels ``[b0*HW + hw0, b0*HW + hw0 + nb*hwc)``.
    """
    chunk = max(1, int(chunk))
    if HW == 0:
        return
    if HW >= chunk:
        for b in range(B):
            for hw0 in range(0, HW, chunk):
                yield b, 1, hw0, min(chunk, HW - hw0)
        return
    per = min(MAX_IMAGES, max(1, chunk // HW))
    for b0 in range(0, B, per):
        yield b0, min(per, B - b0), 0, HW


def _readable(feats):
    """feats and its pixel view; a map whose plane has no pixel stride is copied (contiguous) first."""
    view = pixel_view(feats)
    if view is None:
        feats = feats.contiguous()
        view = pixel_view(feats)
    return feats, view


def _embed_cfg(D: int, hwc: int, acc, tiles) -> dict:
    """Block sizes of the stats and rows kernels (``EMBED_BLOCK_N`` / ``EMBED_BLOCK_D`` override)."""
    if INTERPRET_TILES:
        cfg = dict(BLOCK_N=pow2(hwc, 16, 256), BLOCK_D=pow2(D, 16, 256), num_warps=4)
    else:
        n, d, warps = EMBED_GPU_TILES[("embed", "fp64" if acc == torch.float64 else "fp32")]
        cfg = dict(BLOCK_N=n, BLOCK_D=d, num_warps=warps)
    tiles = tiles or {}
    if "EMBED_BLOCK_N" in tiles:
        cfg["BLOCK_N"] = tiles["EMBED_BLOCK_N"]
    if "EMBED_BLOCK_D" in tiles:
        cfg["BLOCK_D"] = tiles["EMBED_BLOCK_D"]
    return cfg


def _sim_cfg(pass_, feats, protos, N, C, K, D, layer_norm, tiles) -> dict:
    """Tiles of the similarity kernel's EMBED variant (``"fwd"``) or of ``embed_ds_kernel`` (``"bwd_ds"``)
    (:func:`similarity.tile_config`); ``tiles`` overrides them (its ``EMBED_*`` entries are the embedding
    kernels'; the dS kernel takes only the entries it has)."""
    cfg = _sim.tile_config(pass_, feats.dtype, protos.dtype, N, C, K, D, layer_norm=layer_norm)
    over = {k: v for k, v in (tiles or {}).items() if not k.startswith("EMBED_")}
    cfg.update(over if pass_ in ("fwd", "fwd_keep") else {k: v for k, v in over.items() if k in cfg})
    return cfg


class _Embedding:
    """What every launch of one call shares: feats' pixel view, the LayerNorm's tensors, the stats
    (``(5, N)``: the forward's output, or what its backward and the sums were given, else a dummy)."""

    def __init__(self, feats, ln_weight, ln_bias, ln_eps, tiles, chunk, stats=None):
        self.x, (self.B, self.HW, self.sb, self.shw, self.sd) = _readable(feats)
        self.D = feats.shape[1]
        self.N = self.B * self.HW
        self.acc = acc_dtype(feats.dtype)
        self.dev = feats.device
        self.ln = ln_weight is not None
        self.w = ln_weight.contiguous() if self.ln else dummy(self.acc, self.dev)
        self.b = ln_bias.contiguous() if self.ln else self.w
        self.eps = float(ln_eps)
        self.tiles = tiles
        self.chunk = int(chunk or CHUNK_PIXELS)
        # the largest chunk: (nb_max images) x (hwc_max pixels), `rows` pixels
        if self.HW >= self.chunk:
            self.nb_max, self.hwc_max = 1, self.chunk
        else:
            self.nb_max, self.hwc_max = min(MAX_IMAGES, self.B, max(1, self.chunk // max(1, self.HW))), self.HW
        self.rows = self.nb_max * self.hwc_max
        self.cfg = _embed_cfg(self.D, self.hwc_max, self.acc, tiles)  # one tile for every chunk
        self.given = stats is not None
        self.stats = stats if self.given else dummy(self.acc, self.dev)

    def chunks(self):
        observer = CHUNK_OBSERVER
        if observer is None:
            return pixel_chunks(self.B, self.HW, self.chunk)
        return self._observed_chunks(observer)

    def _observed_chunks(self, observer):
        try:
            for ch in pixel_chunks(self.B, self.HW, self.chunk):
                observer.tile(self.chunk, ch[1] * ch[3])
                yield ch
        finally:
            observer.tiles_end()

    def grid(self, hwc, nb, block_n):
        """The (pixel block, image) grid of a chunk of ``nb`` images of ``hwc`` pixels."""
        return (triton.cdiv(hwc, block_n), nb)

    def compute_stats(self, b0, nb, hw0, hwc):
        cfg = self.cfg
        embed_stats_kernel[self.grid(hwc, nb, cfg["BLOCK_N"])](
            self.x, self.sb, self.shw, self.sd, self.w, self.b, self.stats, b0, hw0, hwc, self.HW, self.N, self.D,
            self.eps,
            ACC_DTYPE=TL_DTYPE[self.acc], LAYER_NORM=self.ln, **cfg,
        )


def embed_similarity_forward(feats, ln_weight, ln_bias, ln_eps, protos, labels, temperature, compute_seg,
                             compute_lse, compute_own, tiles=None, chunk=None, scores=None):
    """Launch the embedded forward; arguments already checked. Returns ``(seg, argk, lse, own, stats)``,
    stats ``(5, N)`` in the accumulation dtype (each pixel's mu, r, inv, s_yw, s_ywx; NaN where not finite),
    written by the programs that compute them anyway; ``(0,)`` when nothing is computed.

    ``scores``: a contiguous ``(N, C*K)`` tensor of the accumulation dtype that the similarity kernel fills
    with S itself (column ``c*K + k``), for :func:`embed_similarity_backward` to read instead of
    recomputing S; only with ``compute_lse`` (the op's ``probs``); None or ``(0,)``: not kept.

    ``tiles`` overrides the similarity kernel's tiles (``BLOCK_N``, ``BLOCK_C``,
    ``BLOCK_D``) and, as ``EMBED_BLOCK_N`` / ``EMBED_BLOCK_D``, the stats
    kernel's; ``chunk`` the pixels per chunk (default :data:`CHUNK_PIXELS`).
    """
    any_out = compute_seg or compute_lse or compute_own
    rows_n = feats.shape[0] if feats.dim() == 2 else feats.shape[0] * feats.shape[2] * feats.shape[3]
    stats = feats.new_empty((STATS_ROWS, rows_n) if any_out else (0,), dtype=acc_dtype(feats.dtype))
    e = _Embedding(feats, ln_weight, ln_bias, ln_eps, tiles, chunk, stats)
    N, D, acc, dev = e.N, e.D, e.acc, e.dev
    C, K = protos.shape[0], protos.shape[1]
    outputs = _sim.forward_outputs(feats, N, C, K, compute_seg, compute_lse, compute_own) + (stats,)
    if N == 0 or not any_out:
        return outputs
    P = protos.reshape(C * K, D).contiguous()
    if compute_own and not (compute_seg or compute_lse):
        # own only: the K columns of each pixel's class, gathered by label, with the statistics embed_stats_kernel
        # wrote into stats
        ocfg = _sim.own_config(e.hwc_max, D, acc, embed=True, tiles=tiles)
        for b0, nb, hw0, hwc in e.chunks():
            e.compute_stats(b0, nb, hw0, hwc)
            _sim.own_class_scores_kernel[e.grid(hwc, nb, ocfg["BLOCK_N"])](
                e.x, e.shw, e.sd, P, labels, labels.stride(0), outputs[3], hwc, D, C, K,
                e.sb, e.w, e.b, e.stats, b0, hw0, e.HW, N, e.eps,
                ACC_DTYPE=TL_DTYPE[acc], EMBED=True, LAYER_NORM=e.ln, BLOCK_K=pow2(K), **ocfg,
            )
        return outputs
    lab = labels if compute_own else dummy(torch.int64, dev)
    keep = scores is not None and scores.numel() > 0
    if keep and not (compute_lse and tuple(scores.shape) == (N, C * K) and scores.dtype == acc
                     and scores.is_contiguous()):
        raise ValueError(f"scores must be a contiguous ({N}, {C * K}) {acc} tensor, kept with compute_lse")
    cfg = _sim_cfg("fwd_keep" if keep else "fwd", feats, protos, N, C, K, D, e.ln, tiles)
    outs = _sim.forward_kernel_outputs(outputs[:4], feats.dtype, dev, compute_seg, compute_lse, compute_own)
    consts = _sim.forward_constexprs(feats.dtype, protos.dtype, compute_seg, compute_lse, compute_own, embed=True,
                                     layer_norm=e.ln, keep_scores=keep)
    kept = scores if keep else dummy(acc, dev)
    for b0, nb, hw0, hwc in e.chunks():  # each program computes its pixels' statistics and writes them to stats
        _sim.similarity_fwd_kernel[e.grid(hwc, nb, cfg["BLOCK_N"])](
            e.x, e.shw, e.sd, P, lab, lab.stride(0), *outs,
            hwc, D, C, K, float(temperature), e.sb, e.w, e.b, e.eps, b0, hw0, e.HW, e.stats, N, kept, **consts, **cfg,
        )
    return outputs


def _backward_outputs(feats, e: _Embedding):
    """``(dx, its (image, pixel, channel) strides, d ln_weight, d ln_bias)``: d feats in feats' shape and
    layout (``torch.empty_like``; a non-dense view's suggested layout) and dtype, the LayerNorm's gradients
    zeroed in the accumulation dtype (``(0,)`` of feats' dtype without the LayerNorm)."""
    dx = torch.empty_like(feats)
    dx_view = pixel_view(dx)
    if dx_view is None:  # empty_like of a non-dense view: its suggested layout
        dx = torch.empty(feats.shape, dtype=feats.dtype, device=e.dev)
        dx_view = pixel_view(dx)
    gw = torch.zeros((e.D,) if e.ln else (0,), dtype=e.acc if e.ln else feats.dtype, device=e.dev)
    return dx, dx_view[2:], gw, torch.zeros_like(gw)


def embed_similarity_backward(grad_seg, grad_lse, grad_own, feats, ln_weight, ln_bias, ln_eps, protos, labels, argk,
                              lse, temperature, tiles=None, chunk=None, stats=None, scores=None):
    """Launch the embedded backward; arguments already checked (a None gradient is skipped). ``stats``:
    the forward's ``(5, N)``, read instead of each pixel block's statistics pass, or None. ``scores``: the
    forward's S ``(N, C*K)`` (:func:`embed_similarity_forward`), read instead of recomputing S, or None.

    Returns ``(d feats, d ln_weight, d ln_bias)``: d feats in feats' shape,
    layout (``torch.empty_like``) and dtype; the LayerNorm's gradients in its
    parameters' dtype, ``(0,)`` of feats' dtype without it.
    """
    e = _Embedding(feats, ln_weight, ln_bias, ln_eps, tiles, chunk, stats)
    N, D, acc, dev = e.N, e.D, e.acc, e.dev
    C, K = protos.shape[0], protos.shape[1]
    dx, dx_strides, gw, gb = _backward_outputs(feats, e)
    if N == 0 or D == 0 or (grad_seg is None and grad_lse is None and grad_own is None):
        dx.zero_()
        return (dx, gw.to(ln_weight.dtype), gb.to(ln_bias.dtype)) if e.ln else (dx, gw, gb)
    P = protos.reshape(C * K, D).contiguous()
    CK = C * K
    given_scores = scores is not None and scores.numel() > 0
    kept = scores if given_scores else dummy(acc, dev)
    cfg = _sim_cfg("bwd_ds_cached" if given_scores else "bwd_ds", feats, protos, N, C, K, D, e.ln, tiles)
    xcfg = embed_dx_tiles(gemm_kind(feats.dtype, protos.dtype), CK, D, e.hwc_max, INTERPRET_TILES)
    xcfg.update({k: v for k, v in (tiles or {}).items() if k in ("BLOCK_N", "BLOCK_J", "BLOCK_DO")})
    # contiguous (N, C) and (N, K) gradients: embed_ds_kernel's 32-bit offsets within a pixel block
    upstream, saved, flags = _sim.gradient_args(grad_seg, grad_lse, grad_own, labels, argk, lse, acc, dev,
                                                contiguous=True)
    if e.ln:  # protos . w and protos . b in the accumulation dtype: the LayerNorm backward's sums from dS
        pw = P.to(acc) @ e.w.to(acc)
        pb = P.to(acc) @ e.b.to(acc)
    else:
        pw = pb = dummy(acc, dev)
    ds = torch.empty((e.rows, CK), dtype=acc, device=dev)  # dS of one chunk
    sc = torch.empty((e.rows, 6), dtype=acc, device=dev)  # its per-pixel scalars
    most = e.nb_max * triton.cdiv(e.hwc_max, xcfg["BLOCK_N"])  # pixel blocks of a chunk, at most
    # the pixel blocks' partials of d w, d b: each chunk's block i adds into row i (zeroed once)
    parts = torch.zeros((2, most, D) if e.ln else (2, 1, 1), dtype=acc, device=dev)
    dots = dot_config(feats.dtype, protos.dtype)
    for b0, nb, hw0, hwc in e.chunks():
        embed_ds_kernel[e.grid(hwc, nb, cfg["BLOCK_N"])](
            *upstream, e.x, e.sb, e.shw, e.sd, P, pw, pb, *saved, e.w, e.b, ds, sc, e.stats, kept, b0, hw0, hwc, e.HW,
            N, D, C, K, float(temperature), e.eps, ACC_DTYPE=TL_DTYPE[acc], **s_dots(feats.dtype, protos.dtype),
            LAYER_NORM=e.ln, **flags, GIVEN_STATS=e.given, GIVEN_SCORES=given_scores, **cfg,
        )
        n_blocks = triton.cdiv(hwc, xcfg["BLOCK_N"])
        embed_dx_kernel[(n_blocks * triton.cdiv(D, xcfg["BLOCK_DO"]), nb)](
            ds, sc, P, e.x, e.sb, e.shw, e.sd, e.w, e.b, dx, *dx_strides, parts[0], parts[1], b0, hw0, hwc, D, CK,
            ACC_DTYPE=TL_DTYPE[acc], DS_DTYPE=dots["DS_DTYPE"], DS_PRECISION=dots["DS_PRECISION"],
            DOT_UPCAST=dots["DOT_UPCAST"], LAYER_NORM=e.ln, FMA_SECOND_GEMM=acc == torch.float64, **xcfg,
        )
    if e.ln:  # over the pixel blocks, in a fixed order
        torch.sum(parts[0], dim=0, out=gw)
        torch.sum(parts[1], dim=0, out=gb)
        return dx, gw.to(ln_weight.dtype), gb.to(ln_bias.dtype)
    return dx, gw, gb


def embed_prototype_sums(feats, ln_weight, ln_bias, ln_eps, slot, num_slots, deterministic=True, tiles=None,
                         chunk=None, stats=None):
    """Per-prototype sums ``(num_slots, D)`` and counts of the embedding of the finite pixels with ``slot >= 0``.

    Arguments already checked. Chunk by chunk: z (of the pixels with a slot) into a ``(chunk, D)`` buffer
    and each pixel's sort key, then ``prototype_sums`` given those keys (deterministic or atomic, see
    kernels/prototype_update.py); the chunks' results are added in order (the atomic path adds them
    straight into the returned sums: nothing zeroed per chunk). ``stats``: embed_similarity's
    ``(5, N)`` of the same feats and LayerNorm, read instead of the statistics pass, or None.
    """
    e = _Embedding(feats, ln_weight, ln_bias, ln_eps, tiles, chunk, stats)
    N, D, acc, dev = e.N, e.D, e.acc, e.dev
    S = int(num_slots)
    sums = torch.zeros((S, D), dtype=acc, device=dev)
    counts = torch.zeros((S,), dtype=acc, device=dev)
    if N == 0 or S == 0 or D == 0:
        if D == 0 and N and S:  # no channel to be non-finite: every pixel with a slot counts
            ok = slot[(slot >= 0) & (slot < S)].long()
            counts += torch.bincount(ok, minlength=S).to(acc)
        return sums, counts
    z = torch.empty((e.rows, D), dtype=acc, device=dev)
    key = torch.empty((e.rows,), dtype=torch.int64, device=dev)
    cfg = e.cfg
    for b0, nb, hw0, hwc in e.chunks():  # each program computes its pixels' statistics, z and sort keys
        embed_rows_kernel[e.grid(hwc, nb, cfg["BLOCK_N"])](
            e.x, e.sb, e.shw, e.sd, e.w, e.b, z, e.stats, slot, slot.stride(0), key, S, b0, hw0, hwc, e.HW, N, D,
            e.eps, ACC_DTYPE=TL_DTYPE[acc], LAYER_NORM=e.ln, GIVEN_STATS=e.given, **cfg,
        )
        n0 = b0 * e.HW + hw0
        rows = nb * hwc
        # the atomic path adds into sums and counts itself; the sorted one returns the chunk's, added here
        s, c = _update.prototype_sums(z[:rows], slot[n0:n0 + rows], S, deterministic=deterministic, key=key[:rows],
                                      out=None if deterministic else (sums, counts))
        if deterministic:
            sums += s
            counts += c
    return sums, counts
