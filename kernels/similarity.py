"""Triton kernels of ``similarity`` and ``similarity_backward``.

``S = feats @ protos.view(C*K, D).T`` is never written to memory. Both kernels
tile S as (BLOCK_N pixels) x (BLOCK_C classes x BLOCK_K prototypes): a tile
holds every prototype of its classes, so the per-class max over K, the
own-class scores and the softmax weights are all formed in the tile's epilogue,
while it is still in registers. Column ``j`` of a tile is class
``c0 + j // BLOCK_K``, prototype ``j % BLOCK_K`` (K padded to a power of two,
padded columns masked); the tile is reshaped to (BLOCK_N, BLOCK_C, BLOCK_K) for
the per-class reductions.

Both kernels read feats through (image, pixel, channel) strides: pixel ``hw``
of image ``b``, channel ``d`` at ``X_ptr + b*stride_b + hw*stride_hw +
d*stride_d`` (rows (N, D): one image of N pixels; a (B, D, H, W) map as it
lies, NCHW planes or channels-last), with a grid over (pixel block, image)
and pixel n = b*HW + hw for every per-pixel input and output. In EMBED mode
(``protoseg_ext.kernels.embed``: the head's embedding fused in) each loaded
feats tile is normalised in registers before the dot, ``y = (x - mu) r w + b``
(the LayerNorm over D, when LAYER_NORM), and each S tile is scaled by the
pixel's ``inv = 1 / max(||y||, 1e-12)`` (the L2 normalisation) before its
epilogue; the forward computes its pixel block's ``mu, r, inv`` itself
(``_pixel_stats``, a pass over the block's rows that leaves them in L2 for
the GEMM), the gathered own-class kernel reads them from
``embed_stats_kernel``. The plain calls compile with EMBED = False and pay
nothing for it. The embedded backward has its own kernels
(kernels/embed.py: ``embed_ds_kernel``, ``embed_dx_kernel``); the EMBED
branch of ``similarity_bwd_kernel`` is no longer launched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET_TILES, TL_DTYPE, acc_dtype, dot_config, pow2
from .tiles import kind_of, similarity_tiles


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
def _sqrt(x):
    # correctly rounded: sqrt_rn for float32 (tl.sqrt is the approximate one there), sqrt for float64
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


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
            d = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (d < D)[None, :]
            x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=m, other=0.0).to(ACC_DTYPE)
            v = tl.where(m, x - shift[:, None], 0.0)
            s1 += tl.sum(v, axis=1)
            s2 += tl.sum(v * v, axis=1)
        m1 = s1 / D
        mu = shift + m1
        var = tl.maximum(s2 / D - m1 * m1, 0.0)  # biased, as F.layer_norm
        r = 1.0 / _sqrt(var + tl.full((), eps, ACC_DTYPE))
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            y = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, True, ACC_DTYPE)
            sq += tl.sum(y * y, axis=1)
            if BACKWARD:
                w = tl.load(W_ptr + d, mask=d_ok, other=0.0).to(ACC_DTYPE)
                m = row_ok[:, None] & d_ok[None, :]
                xh = tl.where(m, (x.to(ACC_DTYPE) - mu[:, None]) * r[:, None], 0.0)
                yw = y * w[None, :]
                s_yw += tl.sum(yw, axis=1)
                s_ywx += tl.sum(yw * xh, axis=1)
    else:
        mu = tl.zeros((BLOCK_N,), ACC_DTYPE)
        r = tl.full((BLOCK_N,), 1.0, ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (d < D)[None, :]
            x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=m, other=0.0).to(ACC_DTYPE)
            sq += tl.sum(x * x, axis=1)
    norm = _sqrt(sq)
    # F.normalize's eps, in the accumulation dtype (a bare literal is float32: 1e-12 * (1 - 4e-9))
    inv = 1.0 / tl.maximum(norm, tl.full((), 1e-12, ACC_DTYPE))
    return mu, r, inv, norm, s_yw, s_ywx


@triton.jit
def _pixel_block(block, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N: tl.constexpr):
    # EMBED addressing: (hw, row_ok, loc, x_row) of the BLOCK_N pixels of pixel
    # block `block` of image program_id(1) of the chunk; loc is the pixel
    # within the chunk (the chunk buffers' row: statistics, d z), x_row its
    # offset in feats (int64: no offset can overflow)
    img = tl.program_id(1).to(tl.int64)
    hw = HW0 + block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = hw < HW0 + HWC
    loc = img * HWC + (hw - HW0)
    x_row = (B0 + img) * X_stride_b + hw * X_stride_hw
    return hw, row_ok, loc, x_row


@triton.jit
def _load_stats(STAT_ptr, loc, row_ok):
    # (mu, rstd, inv) of the pixels loc of the chunk (embed_stats_kernel's rows of 3)
    mu = tl.load(STAT_ptr + loc * 3, mask=row_ok, other=0.0)
    r = tl.load(STAT_ptr + loc * 3 + 1, mask=row_ok, other=0.0)
    inv = tl.load(STAT_ptr + loc * 3 + 2, mask=row_ok, other=0.0)
    return mu, r, inv


@triton.jit
def similarity_fwd_kernel(
    X_ptr,  # feats: pixel hw of image b, channel d at b*X_stride_b + hw*X_stride_hw + d*X_stride_d
    X_stride_hw,
    X_stride_d,
    P_ptr,  # protos (C*K, D) contiguous; row c*K + k is prototype k of class c
    LAB_ptr,  # labels (N,) integer (read if COMPUTE_OWN)
    LAB_stride,
    SEG_ptr,  # out (N, C) feats dtype: max_k S[n, c*K + k]
    ARGK_ptr,  # out (N, C) uint8: its arg-max k
    LSE_ptr,  # out (N,) acc dtype: logsumexp_j S[n, j] / temperature
    OWN_ptr,  # out (N, K) acc dtype, zero-initialised: S[n, labels[n]*K + k]
    HWC,  # pixels of the chunk in each image (plain: N)
    D,
    C,
    K,
    temperature: tl.float64,
    # EMBED only (after the plain kernel's arguments, which keep their order)
    X_stride_b,
    W_ptr,  # LayerNorm weight (D,) (if LAYER_NORM)
    BIAS_ptr,  # LayerNorm bias (D,) (if LAYER_NORM)
    eps: tl.float64,  # LayerNorm eps
    B0,  # first image of the chunk (grid axis 1: its images)
    HW0,  # first pixel of the chunk in each image
    HW,  # pixels per image: pixel n = b*HW + hw
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    EMBED: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    COMPUTE_SEG: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    COMPUTE_OWN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)  # d * stride_d passes 2**31 when D * H * W does
    # One program: BLOCK_N pixels against all C*K prototypes, BLOCK_C classes
    # at a time. Each (BLOCK_N, BLOCK_C*BLOCK_K) tile of S is a GEMM over D in
    # BLOCK_D chunks; its epilogue writes seg/argk for its classes, folds the
    # tile into the running (max, sum) of the row log-sum-exp (online softmax),
    # and writes the K scores of the pixel's own class when the tile holds it.
    # Fused so that S costs registers only: N*(C + C + 1 + K) values leave the
    # chip instead of N*C*K.
    #
    # GPU tiles: kernels/tiles.py (the choice); their registers, shared memory
    # and pipelining per arch: docs/kernels.md (generated). The half tile's
    # D loop streams its operands through a cp.async shared-memory ring
    # (wgmma on sm_90, mma.sync on sm_80); fp32 multiplies tf32x3 and so takes
    # a shorter BLOCK_D. Wider tiles spill because the epilogue holds the S
    # tile, its exp and its (n, c, k) view at once.
    # Arithmetic intensity at Cityscapes (N = 65,536, D = 720, C = 19,
    # K = 10; bf16): 17.9 GFLOP of real S against 102 MB of compulsory HBM
    # traffic (feats once, seg/argk/lse/own out): 176 FLOP/B,
    # under the H100's bf16 ridge (295 FLOP/B), so the fused forward is
    # memory-bound at heart. The padded tiles execute 36.2 GFLOP (356 FLOP/B,
    # compute-bound). Per BLOCK_D step a tile multiplies 24 KB of staged
    # operands: 43 FLOP/B from L2/shared memory; feats is read once from HBM
    # and ceil(C / BLOCK_C) = 3 times from L2.
    # Padding: K = 10 -> BLOCK_K 16 (1.6x) and C = 19 -> 3 blocks of 8 = 24
    # classes: 384 columns for 190, 2.02x (a 16-class tile: 32 classes,
    # 2.69x). 4-class tiles give 20 classes, 1.68x (5 passes over the feats
    # tile in L2); the K padding stays with any tile of whole classes: only a
    # k-major column order (the k-th prototype of every class in one tile, the
    # max over K across tiles) drops it, and that pads C to 32 instead (1.68x).
    # ADE20K (C = 150): 19 blocks of 8 = 152 classes, 1.62x.
    # EMBED (the head's embedding fused in, kernels/embed.py): each feats tile
    # is LayerNorm'd in registers (_embed_tile) and the S tile scaled by the
    # pixels' inverse norms before the epilogue. With the LayerNorm it takes
    # narrower tiles (tiles.EMBED_GPU_TILES: the normalised tile, its
    # statistics and w, b are live too); L2 only keeps the plain tiles. The
    # plain calls (EMBED = False) keep the plain kernel's addressing.
    BLOCK_J: tl.constexpr = BLOCK_C * BLOCK_K
    pid = tl.program_id(0).to(tl.int64)
    if EMBED:
        hw, row_ok, loc, x_row = _pixel_block(pid, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N)
        rows = (B0 + tl.program_id(1).to(tl.int64)) * HW + hw  # pixel n: labels and the outputs
        # the block's statistics, computed here: no statistics launch, and feats' rows are in L2 for the GEMM
        mu, r, inv, _norm, _syw, _sywx = _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps,
                                                      ACC_DTYPE, LAYER_NORM, False, BLOCK_N, BLOCK_D)
    else:  # rows (N, D): one image, one chunk; the plain kernel's addressing, no extra registers
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rows * X_stride_hw cannot overflow
        row_ok = rows < HWC
    jj = tl.arange(0, BLOCK_J)
    j_cls = jj // BLOCK_K  # class of column j within the tile
    j_k = jj % BLOCK_K  # prototype of column j
    kk = tl.arange(0, BLOCK_K)
    t = tl.full((), temperature, ACC_DTYPE)
    if COMPUTE_OWN:
        lab = tl.load(LAB_ptr + rows * LAB_stride, mask=row_ok, other=-1).to(tl.int64)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)  # running row max of S / t
    l_i = tl.zeros((BLOCK_N,), ACC_DTYPE)  # running sum of exp(S / t - m_i)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + j_cls
        col_ok = (cls < C) & (j_k < K)
        prow = cls.to(tl.int64) * K + j_k  # row of protos (C*K, D)
        acc = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)  # S tile, BLOCK_N x BLOCK_C*BLOCK_K
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            if EMBED:
                x_ptrs = X_ptr + x_row[:, None] + d[None, :] * X_stride_d
            else:  # as the plain kernel always addressed it (fewer live registers than a hoisted x_row)
                x_ptrs = X_ptr + rows[:, None] * X_stride_hw + d[None, :] * X_stride_d
            x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if EMBED:
                x = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, LAYER_NORM, ACC_DTYPE)
            p = tl.load(P_ptr + prow[None, :] * D + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            acc = _dot(x, p, acc, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, ACC_DTYPE)
        if EMBED:
            acc = acc * inv[:, None]  # the L2 normalisation: S of z = y / max(||y||, 1e-12)
        if COMPUTE_LSE:
            z = tl.where(col_ok[None, :], acc / t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
        cc = c0 + tl.arange(0, BLOCK_C)
        if COMPUTE_SEG:
            s3 = tl.reshape(acc, (BLOCK_N, BLOCK_C, BLOCK_K))
            s3 = tl.where((kk < K)[None, None, :], s3, float("-inf"))
            best = tl.max(s3, axis=2)  # (BLOCK_N, BLOCK_C): nearest prototype of each class
            best_k = tl.argmax(s3, axis=2)  # first k on ties
            has_nan = tl.max(tl.where(s3 != s3, 1, 0), axis=2) > 0
            best = tl.where(has_nan, float("nan"), best)  # a NaN row gives NaN, as torch.max
            out_ok = row_ok[:, None] & (cc < C)[None, :]
            off = rows[:, None] * C + cc[None, :]
            tl.store(SEG_ptr + off, best.to(SEG_ptr.dtype.element_ty), mask=out_ok)
            tl.store(ARGK_ptr + off, best_k.to(tl.uint8), mask=out_ok)
        if COMPUTE_OWN:
            s3o = tl.reshape(acc, (BLOCK_N, BLOCK_C, BLOCK_K))
            hit = cc[None, :, None] == lab[:, None, None]
            own = tl.sum(tl.where(hit, s3o, 0.0), axis=1)  # (BLOCK_N, BLOCK_K)
            mine = row_ok & (lab >= c0) & (lab < c0 + BLOCK_C) & (lab < C)
            tl.store(OWN_ptr + rows[:, None] * K + kk[None, :], own, mask=mine[:, None] & (kk < K)[None, :])
    if COMPUTE_LSE:
        tl.store(LSE_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def own_class_scores_kernel(
    X_ptr,  # feats (N, D), any strides (EMBED: as in similarity_fwd_kernel)
    X_stride_n,  # EMBED: X_stride_hw, the pixel stride within an image
    X_stride_d,
    P_ptr,  # protos (C*K, D) contiguous
    LAB_ptr,  # labels (N,) integer
    LAB_stride,
    OWN_ptr,  # out (N, K) acc dtype, zero-initialised
    N,  # EMBED: HWC, the pixels of the chunk in each image
    D,
    C,
    K,
    # EMBED only (as in similarity_fwd_kernel)
    X_stride_b,
    W_ptr,
    BIAS_ptr,
    STAT_ptr,
    B0,
    HW0,
    HW,
    ACC_DTYPE: tl.constexpr,
    EMBED: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)  # d * stride_d passes 2**31 when D * H * W does
    # own[n, k] = feats[n] . protos[labels[n], k] for BLOCK_N pixels: only the
    # K columns of S that Sinkhorn needs, gathered by label (N*K*D FLOPs
    # instead of N*C*K*D). Used when neither seg nor lse is asked for
    # (prototype learning outside the head's fused step). The feats tile is
    # read once per D chunk and dotted with the K gathered prototype rows.
    # GPU: 32 px x BLOCK_D 64 (32 for fp64), 4 warps, CUDA-core FMAs (no MMA:
    # each pixel has its own K prototypes; registers: docs/kernels.md).
    # Intensity at Cityscapes: 2*N*K*D = 0.94 GFLOP against
    # 94 MB of feats (bf16): 10 FLOP/B, memory-bound; the gathered prototype
    # rows (N*K*D elements) come from L2 (190 rows, 270 KB). No padding
    # beyond BLOCK_K = 16 lanes of the (n, k) accumulator.
    # EMBED: grid (pixel block, image of the chunk); the feats tile is
    # LayerNorm'd in registers (and rounded to feats' dtype, as the eager half
    # LayerNorm's output is), the scores scaled by the pixels' inverse norms;
    # GPU: 32 px x BLOCK_D 32 (fp64: 16).
    pid = tl.program_id(0).to(tl.int64)
    if EMBED:
        hw, row_ok, loc, x_row = _pixel_block(pid, B0, HW0, N, X_stride_b, X_stride_n, BLOCK_N)
        rows = (B0 + tl.program_id(1).to(tl.int64)) * HW + hw
        mu, r, inv = _load_stats(STAT_ptr, loc, row_ok)
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
    lab = tl.load(LAB_ptr + rows * LAB_stride, mask=row_ok, other=-1).to(tl.int64)
    take = row_ok & (lab >= 0) & (lab < C)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = take[:, None] & (d < D)[None, :]
        if EMBED:
            x = tl.load(X_ptr + x_row[:, None] + d[None, :] * X_stride_d, mask=m, other=0.0)
            if LAYER_NORM:
                x = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d < D, take, True, ACC_DTYPE)
                x = x.to(X_ptr.dtype.element_ty)
            x = x.to(ACC_DTYPE)
        else:
            x = tl.load(X_ptr + rows[:, None] * X_stride_n + d[None, :] * X_stride_d, mask=m, other=0.0).to(ACC_DTYPE)
        for k in range(0, K):
            p = tl.load(P_ptr + (lab * K + k)[:, None] * D + d[None, :], mask=m, other=0.0).to(ACC_DTYPE)
            v = tl.sum(x * p, axis=1)
            acc = tl.where(kk[None, :] == k, acc + v[:, None], acc)
    if EMBED:
        acc = acc * inv[:, None]
    tl.store(OWN_ptr + rows[:, None] * K + kk[None, :], acc, mask=take[:, None] & (kk < K)[None, :])


@triton.jit
def similarity_bwd_kernel(
    GSEG_ptr,  # d loss / d seg (N, C), any strides (if HAS_SEG)
    GSEG_stride_n,
    GSEG_stride_c,
    GLSE_ptr,  # d loss / d lse (N,) (if HAS_LSE)
    GLSE_stride,
    GOWN_ptr,  # d loss / d own (N, K), any strides (if HAS_OWN)
    GOWN_stride_n,
    GOWN_stride_k,
    X_ptr,  # feats: pixel hw of image b, channel d at b*X_stride_b + hw*X_stride_hw + d*X_stride_d
    X_stride_hw,
    X_stride_d,
    P_ptr,  # protos (C*K, D) contiguous
    LAB_ptr,  # labels (N,) (if HAS_OWN)
    LAB_stride,
    ARGK_ptr,  # saved arg-max k (N, C) uint8 (if HAS_SEG)
    ARGK_stride_n,
    ARGK_stride_c,
    LSE_ptr,  # saved row log-sum-exp (N,) (if HAS_LSE)
    LSE_stride,
    DX_ptr,  # out (pixels of the chunk, D) contiguous: d feats in feats' dtype; EMBED: d z in the acc dtype
    HWC,  # pixels of the chunk in each image (plain: N)
    D,
    C,
    K,
    temperature: tl.float64,
    # EMBED only (after the plain kernel's arguments, which keep their order)
    X_stride_b,
    W_ptr,  # LayerNorm weight (D,) (if LAYER_NORM)
    BIAS_ptr,  # LayerNorm bias (D,) (if LAYER_NORM)
    STAT_ptr,  # (pixels of the chunk, 3) acc dtype: mu, rstd, inv
    B0,  # first image of the chunk (grid axis 1: its images)
    HW0,  # first pixel of the chunk in each image
    HW,  # pixels per image: pixel n = b*HW + hw
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DS_DTYPE: tl.constexpr,
    DS_PRECISION: tl.constexpr,
    EMBED: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_OWN: tl.constexpr,
    FMA_SECOND_GEMM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)  # d * stride_d passes 2**31 when D * H * W does
    # d feats[rows, dout] = dS @ protos[:, dout] for BLOCK_N pixels and a
    # BLOCK_DO slice of D (grid: row blocks x D slices), where
    #   dS[n, j] = softmax_j(S[n] / t) * grad_lse[n] / t            (PPC)
    #            + grad_seg[n, c]  if j == c*K + argk[n, c]          (max over K)
    #            + grad_own[n, k]  if j == labels[n]*K + k           (PPD, Sinkhorn)
    # As in the flash-attention backward, each (BLOCK_N, BLOCK_C*BLOCK_K) tile
    # of S is recomputed from feats and protos (full D), turned into dS with
    # the saved lse, and consumed at once by the second GEMM; neither S nor dS
    # is ever stored. The D slice keeps the d feats accumulator in registers
    # (BLOCK_N x BLOCK_DO); S is recomputed once per slice when HAS_LSE (the
    # seg and own terms need no S at all).
    # EMBED (kernels/embed.py): S is recomputed from the embedding z = y inv
    # (each feats tile LayerNorm'd in registers, the S tile scaled by inv),
    # and the kernel writes g = dS @ protos, the gradient w.r.t. z, in the
    # accumulation dtype into the chunk's buffer; embed_backward_kernel chains
    # it through the L2 normalisation and the LayerNorm (tiles.EMBED_GPU_TILES:
    # with the LayerNorm'd operand live the half tile takes BLOCK_D 32, fp64
    # a D slice of 16).
    BLOCK_J: tl.constexpr = BLOCK_C * BLOCK_K
    #
    # GPU tiles: kernels/tiles.py; their registers, shared memory and
    # pipelining per arch: docs/kernels.md (generated).
    #   fp16/bf16: 4 classes x 16 columns, D slices of 256 (3 for D = 720);
    #     the S recompute streams through a cp.async ring (3 stages: with 2
    #     there is a single buffer). The second product multiplies dS as TF32
    #     (fp32 range: the PPC/PPD terms of dS, ~1e-9, underflow fp16), at
    #     half the fp16 tensor-core rate; dS in fp32 is why 8-class tiles
    #     spill.
    #   fp32 (tf32x3 both products): a narrower slice (the tf32x3 split keeps
    #     a big and a small copy of each operand; a 128 slice spills).
    #   fp64: small tiles, FMA second product.
    # Arithmetic intensity (bf16): two GEMMs of 17.9 GFLOP against 196 MB of
    # HBM traffic (feats in, d feats out, the saved and upstream vectors):
    # 183 FLOP/B, memory-bound at heart. As tiled it executes 120.8 GFLOP
    # (3.37x): S is recomputed once per D slice (3 of 4 GEMM passes) on
    # 320 padded columns (5 blocks of 4 classes = 20 classes x 16 for 190,
    # 1.68x). One 720-wide slice would cut that to 2 passes but needs the
    # (32, 720) fp32 d feats tile in registers (90 values a thread): it spills.
    # Padding: K = 10 -> 16 (1.6x, as in the forward) and C = 19 -> 20; a
    # tile of 2 classes gives the same 20, 8 classes give 24 (2.02x); the K
    # padding goes only with a k-major column order (see the forward).
    # ADE20K (C = 150): 38 blocks of 4 = 152 classes.
    # 1-D grid, the D slices of one row block adjacent: they run together and
    # share its feats rows in L2, so feats leaves HBM about once
    n_slices = tl.cdiv(D, BLOCK_DO)
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // n_slices
    pid_d = pid % n_slices
    if EMBED:
        # loc: the pixel within the chunk, the output row (and its statistics)
        hw, row_ok, loc, x_row = _pixel_block(pid_n, B0, HW0, HWC, X_stride_b, X_stride_hw, BLOCK_N)
        rows = (B0 + tl.program_id(1).to(tl.int64)) * HW + hw  # pixel n: labels, the saved and upstream vectors
        if HAS_LSE:
            mu, r, inv = _load_stats(STAT_ptr, loc, row_ok)
    else:  # rows (N, D): one image, one chunk; the plain kernel's addressing
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < HWC
        loc = rows
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    jj = tl.arange(0, BLOCK_J)
    j_cls = jj // BLOCK_K
    j_k = jj % BLOCK_K
    t = tl.full((), temperature, ACC_DTYPE)
    if HAS_LSE:
        lse = tl.load(LSE_ptr + rows * LSE_stride, mask=row_ok, other=0.0).to(ACC_DTYPE)
        g_lse = tl.load(GLSE_ptr + rows * GLSE_stride, mask=row_ok, other=0.0).to(ACC_DTYPE) / t
    if HAS_OWN:
        lab = tl.load(LAB_ptr + rows * LAB_stride, mask=row_ok, other=-1).to(tl.int64)
    dx = tl.zeros((BLOCK_N, BLOCK_DO), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + j_cls
        col_ok = (cls < C) & (j_k < K)
        prow = cls.to(tl.int64) * K + j_k
        tile_ok = row_ok[:, None] & col_ok[None, :]
        ds = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)  # dS tile
        if HAS_LSE:
            s = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)  # S tile, recomputed
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                if EMBED:
                    x_ptrs = X_ptr + x_row[:, None] + d[None, :] * X_stride_d
                else:
                    x_ptrs = X_ptr + rows[:, None] * X_stride_hw + d[None, :] * X_stride_d
                x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if EMBED:
                    x = _embed_tile(x, mu, r, W_ptr, BIAS_ptr, d, d_ok, row_ok, LAYER_NORM, ACC_DTYPE)
                p = tl.load(P_ptr + prow[None, :] * D + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                s = _dot(x, p, s, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, ACC_DTYPE)
            if EMBED:
                s = s * inv[:, None]  # S of the L2-normalised embedding
            ds = tl.where(col_ok[None, :], tl.exp(s / t - lse[:, None]) * g_lse[:, None], 0.0)
        # The seg and own terms are gathered straight into the tile's (n, j)
        # layout (grad_seg and argk of column j's class, read BLOCK_K times
        # from L1): no (BLOCK_N, BLOCK_C, BLOCK_K) view, so no layout change.
        if HAS_SEG:
            g_seg = tl.load(GSEG_ptr + rows[:, None] * GSEG_stride_n + cls[None, :] * GSEG_stride_c, mask=tile_ok,
                            other=0.0).to(ACC_DTYPE)
            arg_k = tl.load(ARGK_ptr + rows[:, None] * ARGK_stride_n + cls[None, :] * ARGK_stride_c, mask=tile_ok,
                            other=0).to(tl.int32)
            ds += tl.where(arg_k == j_k[None, :], g_seg, 0.0)
        if HAS_OWN:
            mine = tile_ok & (cls[None, :] == lab[:, None])  # column j is prototype j_k of the pixel's class
            ds += tl.load(GOWN_ptr + rows[:, None] * GOWN_stride_n + j_k[None, :] * GOWN_stride_k, mask=mine,
                          other=0.0).to(ACC_DTYPE)
        p_out = tl.load(P_ptr + prow[:, None] * D + dout[None, :], mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
        if FMA_SECOND_GEMM:
            # float64: Triton's fp64 MMA cannot take an operand from registers
            dx += tl.sum(ds[:, :, None] * p_out.to(ACC_DTYPE)[None, :, :], axis=1)
        else:
            # dS stays fp32 (TF32 operands on a GPU for half inputs: fp32's
            # exponent range), never rounded to fp16/bf16, where the small
            # PPC/PPD terms (0.01 / n_valid * softmax) would underflow or lose digits
            dx = _dot(ds, p_out, dx, DS_DTYPE, DS_PRECISION, DOT_UPCAST, ACC_DTYPE)
    tl.store(
        DX_ptr + loc[:, None] * D + dout[None, :],
        dx.to(DX_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dout_ok[None, :],
    )


# ----------------------------------------------------------------- launchers

def tile_config(pass_: str, feats_dtype, protos_dtype, N: int, C: int, K: int, D: int,
                interpret: bool = INTERPRET_TILES) -> dict:
    """Block sizes and launch options of the forward (``"fwd"``) or backward (``"bwd"``) kernel.

    See :func:`protoseg_ext.kernels.tiles.similarity_tiles`: GPU tiles from
    ``tiles.GPU_TILES``, the interpreter's largest within Triton's element limit.
    """
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    return similarity_tiles(pass_, kind_of(name(feats_dtype), name(protos_dtype)), C, K, D, N, interpret)


def _dummy(dtype, device):
    return torch.empty(1, dtype=dtype, device=device)


def forward_outputs(feats, N, C, K, compute_seg, compute_lse, compute_own):
    """``(seg, argk, lse, own)`` for N pixels of ``feats``' dtype and device, as the schema has them
    (``own`` zeroed: ignored pixels keep zero rows)."""
    acc = acc_dtype(feats.dtype)
    seg = feats.new_empty((N, C) if compute_seg else (0,))
    argk = feats.new_empty((N, C) if compute_seg else (0,), dtype=torch.uint8)
    lse = feats.new_empty((N,) if compute_lse else (0,), dtype=acc)
    own = feats.new_zeros((N, K) if compute_own else (0,), dtype=acc)
    return seg, argk, lse, own


def similarity_forward(feats, protos, labels, temperature, compute_seg, compute_lse, compute_own, tiles=None):
    """Launch the forward; arguments already checked. Returns ``(seg, argk, lse, own)``.

    ``tiles`` overrides entries of :func:`tile_config` (tests use small tiles
    to run several row, class and D blocks).
    """
    N, D = feats.shape
    C, K = protos.shape[0], protos.shape[1]
    dev = feats.device
    acc = acc_dtype(feats.dtype)
    seg, argk, lse, own = forward_outputs(feats, N, C, K, compute_seg, compute_lse, compute_own)
    if N == 0:
        return seg, argk, lse, own
    P = protos.reshape(C * K, D).contiguous()
    lab = labels if compute_own else _dummy(torch.int64, dev)
    if compute_own and not (compute_seg or compute_lse):
        cfg = dict(BLOCK_N=pow2(N, 16, 256) if INTERPRET_TILES else 32,
                   BLOCK_D=pow2(D, 16, 256) if INTERPRET_TILES else (64 if acc == torch.float32 else 32))
        cfg.update({k: v for k, v in (tiles or {}).items() if k in cfg})
        own_class_scores_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            feats, feats.stride(0), feats.stride(1), P, lab, lab.stride(0), own, N, D, C, K,
            0, own, own, own, 0, 0, N,
            ACC_DTYPE=TL_DTYPE[acc], EMBED=False, LAYER_NORM=False, BLOCK_K=pow2(K), num_warps=4, **cfg,
        )
        return seg, argk, lse, own
    dots = dot_config(feats.dtype, protos.dtype)
    cfg = tile_config("fwd", feats.dtype, protos.dtype, N, C, K, D)
    cfg.update(tiles or {})
    # the rows as one image of N pixels (stride_b unused), no statistics
    dummy = _dummy(acc, dev)
    similarity_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), 1)](
        feats, feats.stride(0), feats.stride(1), P, lab, lab.stride(0),
        seg if compute_seg else _dummy(feats.dtype, dev),
        argk if compute_seg else _dummy(torch.uint8, dev),
        lse if compute_lse else dummy,
        own if compute_own else dummy,
        N, D, C, K, float(temperature), 0, dummy, dummy, 0.0, 0, 0, N,
        ACC_DTYPE=TL_DTYPE[acc], DOT_DTYPE=dots["DOT_DTYPE"], DOT_PRECISION=dots["DOT_PRECISION"],
        DOT_UPCAST=dots["DOT_UPCAST"], EMBED=False, LAYER_NORM=False, COMPUTE_SEG=compute_seg,
        COMPUTE_LSE=compute_lse, COMPUTE_OWN=compute_own, **cfg,
    )
    return seg, argk, lse, own


def similarity_backward(grad_seg, grad_lse, grad_own, feats, protos, labels, argk, lse, temperature, tiles=None):
    """Launch the backward; arguments already checked (a None gradient is skipped). Returns d feats (N, D)."""
    N, D = feats.shape
    C, K = protos.shape[0], protos.shape[1]
    dev = feats.device
    acc = acc_dtype(feats.dtype)
    has_seg, has_lse, has_own = grad_seg is not None, grad_lse is not None, grad_own is not None
    if N == 0 or D == 0 or not (has_seg or has_lse or has_own):
        return feats.new_zeros((N, D))
    dx = feats.new_empty((N, D))
    P = protos.reshape(C * K, D).contiguous()
    cfg = tile_config("bwd", feats.dtype, protos.dtype, N, C, K, D)
    cfg.update(tiles or {})
    gs = grad_seg if has_seg else _dummy(acc, dev).view(1, 1)
    ak = argk if has_seg else _dummy(torch.uint8, dev).view(1, 1)
    gl = grad_lse if has_lse else _dummy(acc, dev)
    ls = lse if has_lse else _dummy(acc, dev)
    go = grad_own if has_own else _dummy(acc, dev).view(1, 1)
    lab = labels if has_own else _dummy(torch.int64, dev)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(D, cfg["BLOCK_DO"]), 1)
    dummy = _dummy(acc, dev)
    similarity_bwd_kernel[grid](
        gs, gs.stride(0), gs.stride(1), gl, gl.stride(0), go, go.stride(0), go.stride(1),
        feats, feats.stride(0), feats.stride(1), P, lab, lab.stride(0),
        ak, ak.stride(0), ak.stride(1), ls, ls.stride(0), dx,
        N, D, C, K, float(temperature), 0, dummy, dummy, dummy, 0, 0, N,
        ACC_DTYPE=TL_DTYPE[acc], **dot_config(feats.dtype, protos.dtype), EMBED=False, LAYER_NORM=False,
        HAS_SEG=has_seg, HAS_LSE=has_lse, HAS_OWN=has_own, FMA_SECOND_GEMM=acc == torch.float64, **cfg,
    )
    return dx
