"""Triton kernels of ``similarity`` and ``similarity_backward``.

``S = feats @ protos.view(C*K, D).T`` is never written to memory. Both kernels
tile S as (BLOCK_N pixels) x (BLOCK_C classes x BLOCK_K prototypes): a tile
holds every prototype of its classes, so the per-class max over K, the
own-class scores and the softmax weights are all formed in the tile's epilogue,
while it is still in registers. Column ``j`` of a tile is class
``c0 + j // BLOCK_K``, prototype ``j % BLOCK_K`` (K padded to a power of two,
padded columns masked); the tile is reshaped to (BLOCK_N, BLOCK_C, BLOCK_K) for
the per-class reductions. The steps the kernels share with kernels/embed.py
(the S tile, the dS terms, the pixel addressing and statistics) are the
device functions of kernels/device.py.

The forward reads feats through (image, pixel, channel) strides: pixel ``hw``
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
the GEMM) and writes them to the op's stats (5, N); the gathered own-class
kernel reads them there (``embed_stats_kernel`` wrote them). The plain calls
compile with EMBED = False and pay nothing for it. The backward here takes rows (N, D); the embedded backward
has its own kernels (kernels/embed.py: ``embed_ds_kernel``,
``embed_dx_kernel``).

Costs at Cityscapes (N = 65,536, D = 720, C = 19, K = 10; bf16). GPU tiles:
kernels/tiles.py (the choice); their registers, shared memory and pipelining
per arch: docs/kernels.md (generated).

* Forward: 17.9 GFLOP of real S against 102 MB of compulsory HBM traffic
  (feats once, seg/argk/lse/own out): 176 FLOP/B, under the H100's bf16 ridge
  (295 FLOP/B), so the fused forward is memory-bound at heart. The padded
  tiles execute 36.2 GFLOP (356 FLOP/B, compute-bound). Per BLOCK_D step a
  tile multiplies 24 KB of staged operands: 43 FLOP/B from L2/shared memory;
  feats is read once from HBM and ceil(C / BLOCK_C) = 3 times from L2. The
  half tile's D loop streams its operands through a cp.async shared-memory
  ring (wgmma on sm_90, mma.sync on sm_80); fp32 multiplies tf32x3 and so
  takes a shorter BLOCK_D. Wider tiles spill because the epilogue holds the
  S tile, its exp and its (n, c, k) view at once. Padding: K = 10 -> BLOCK_K
  16 (1.6x) and C = 19 -> 3 blocks of 8 = 24 classes: 384 columns for 190,
  2.02x (a 16-class tile: 32 classes, 2.69x). 4-class tiles give 20 classes,
  1.68x (5 passes over the feats tile in L2); the K padding stays with any
  tile of whole classes: only a k-major column order (the k-th prototype of
  every class in one tile, the max over K across tiles) drops it, and that
  pads C to 32 instead (1.68x). ADE20K (C = 150): 19 blocks of 8 = 152
  classes, 1.62x. EMBED with the LayerNorm takes narrower tiles
  (tiles.EMBED_GPU_TILES: the normalised tile, its statistics and w, b are
  live too); L2 only keeps the plain tiles.
* Backward: two GEMMs of 17.9 GFLOP against 196 MB of HBM traffic (feats in,
  d feats out, the saved and upstream vectors): 183 FLOP/B, memory-bound at
  heart. As tiled it executes 120.8 GFLOP (3.37x): S is recomputed once per
  D slice (3 of 4 GEMM passes) on 320 padded columns (5 blocks of 4 classes =
  20 classes x 16 for 190, 1.68x). One 720-wide slice would cut that to 2
  passes but needs the (32, 720) fp32 d feats tile in registers (90 values a
  thread): it spills. fp16/bf16: 4 classes x 16 columns, D slices of 256 (3
  for D = 720); the S recompute streams through a cp.async ring (3 stages:
  with 2 there is a single buffer); the second product multiplies dS as TF32
  at half the fp16 tensor-core rate, and dS in fp32 is why 8-class tiles
  spill. fp32 (tf32x3 both products): a narrower slice (the tf32x3 split
  keeps a big and a small copy of each operand; a 128 slice spills). fp64:
  small tiles, FMA second product. Padding: C = 19 -> 20 (a tile of 2
  classes gives the same 20, 8 classes give 24, 2.02x); ADE20K (C = 150): 38
  blocks of 4 = 152 classes.
* Own-class scores alone (``own_class_scores_kernel``): 2*N*K*D = 0.94 GFLOP
  against 94 MB of feats: 10 FLOP/B, memory-bound; the gathered prototype
  rows (N*K*D elements) come from L2 (190 rows, 270 KB). No padding beyond
  BLOCK_K = 16 lanes of the (n, k) accumulator. CUDA-core FMAs (no MMA: each
  pixel has its own K prototypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, INTERPRET_TILES, TL_DTYPE, acc_dtype, dot_config, dummy, gemm_kind, pow2, s_dots
from .device import (_block_stats, _class_columns, _ds_gathered, _ds_softmax, _ds_times_protos, _embed_tile,
                     _pixel_rows, _pixel_stats, _row_block_and_slice, _s_tile, _store_pixel_stats, _tile_columns,
                     _upstream_rows)
from .tiles import own_tiles, similarity_tiles


# the interpreter's arg-max raises on an all-NaN slice (numpy's nanargmax): there, _store_class_max sets
# NaN scores aside before it (a GPU's arg-max takes any slice; the compiled kernels do not pay for this)
_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def _online_lse(m_i, l_i, s, col_ok, t):
    # fold the S tile into the running (max, sum) of each row's log-sum-exp of S / t (online softmax)
    z = tl.where(col_ok[None, :], s / t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _store_class_max(s, SEG_ptr, ARGK_ptr, rows, row_ok, cc, kk, C, K, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # seg[n, c] = max_k S[n, c*K + k] and argk its first arg-max, for the classes cc of the tile
    # (NaN when a score of the class is NaN, as torch.max)
    s3 = tl.reshape(s, (BLOCK_N, BLOCK_C, BLOCK_K))
    s3 = tl.where((kk < K)[None, None, :], s3, float("-inf"))
    s3m = s3
    if _INTERPRETED:  # NaN scores set aside (a NaN class's seg is NaN below, its argk any of its k)
        s3m = tl.where(s3 != s3, float("-inf"), s3)
    best = tl.max(s3m, axis=2)  # (BLOCK_N, BLOCK_C): nearest prototype of each class
    best_k = tl.argmax(s3m, axis=2)  # first k on ties
    has_nan = tl.max(tl.where(s3 != s3, 1, 0), axis=2) > 0
    best = tl.where(has_nan, float("nan"), best)
    out_ok = row_ok[:, None] & (cc < C)[None, :]
    off = rows[:, None] * C + cc[None, :]
    tl.store(SEG_ptr + off, best.to(SEG_ptr.dtype.element_ty), mask=out_ok)
    tl.store(ARGK_ptr + off, best_k.to(tl.uint8), mask=out_ok)


@triton.jit
def _store_own_scores(s, OWN_ptr, rows, row_ok, lab, c0, cc, kk, C, K, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # own[n, k] = S[n, labels[n]*K + k] for the pixels whose class is in the tile's block from c0
    s3o = tl.reshape(s, (BLOCK_N, BLOCK_C, BLOCK_K))
    hit = cc[None, :, None] == lab[:, None, None]
    own = tl.sum(tl.where(hit, s3o, 0.0), axis=1)  # (BLOCK_N, BLOCK_K)
    mine = row_ok & (lab >= c0) & (lab < c0 + BLOCK_C) & (lab < C)
    tl.store(OWN_ptr + rows[:, None] * K + kk[None, :], own, mask=mine[:, None] & (kk < K)[None, :])


@triton.jit
def _forward_rows(pid, X_ptr, X_stride_b, X_stride_hw, X_stride_d, W_ptr, BIAS_ptr, D, eps, B0, HW0, HWC, HW,
                  STAT_ptr, N, ACC_DTYPE: tl.constexpr, EMBED: tl.constexpr, LAYER_NORM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # (rows, row_ok, x_row, mu, r, inv) of program pid's pixels. EMBED: the chunk's pixel block and its statistics,
    # computed here (no statistics launch; feats' rows then sit in L2 for the GEMM) and written to the op's stats
    # (5, N) (20 or 40 B a pixel: with the LayerNorm backward's two sums over D).
    # Plain: rows of (N, D) in int64 (rows * X_stride_hw cannot overflow), the plain
    # kernel's addressing with no extra registers; the rest unused
    if EMBED:
        rows, row_ok, loc, x_row = _pixel_rows(pid, B0, HW0, HWC, HW, X_stride_b, X_stride_hw, BLOCK_N)
        mu, r, inv, norm, s_yw, s_ywx = _pixel_stats(X_ptr, x_row, row_ok, X_stride_d, W_ptr, BIAS_ptr, D, eps,
                                                     ACC_DTYPE, LAYER_NORM, True, BLOCK_N, BLOCK_D)
        _store_pixel_stats(STAT_ptr, N, rows, row_ok, mu, r, inv, norm, s_yw, s_ywx)
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < HWC
        x_row, mu, r, inv = rows, rows, rows, rows
    return rows, row_ok, x_row, mu, r, inv


@triton.jit
def similarity_fwd_kernel(
    # feats: pixel hw of image b, channel d at b*X_stride_b + hw*X_stride_hw + d*X_stride_d (plain: rows, n = hw)
    X_ptr, X_stride_hw, X_stride_d,
    P_ptr,  # protos (C*K, D) contiguous; row c*K + k is prototype k of class c
    LAB_ptr, LAB_stride,  # labels (N,) integer (read if COMPUTE_OWN)
    SEG_ptr,  # out (N, C) feats dtype: max_k S[n, c*K + k]
    ARGK_ptr,  # out (N, C) uint8: its arg-max k
    LSE_ptr,  # out (N,) acc dtype: logsumexp_j S[n, j] / temperature
    OWN_ptr,  # out (N, K) acc dtype, zero-initialised: S[n, labels[n]*K + k]
    HWC,  # pixels of the chunk in each image (plain: N)
    D, C, K,
    temperature: tl.float64,
    # EMBED only (after the plain kernel's arguments, which keep their order)
    X_stride_b,
    W_ptr, BIAS_ptr,  # LayerNorm weight, bias (D,) (if LAYER_NORM)
    eps: tl.float64,  # LayerNorm eps
    B0,  # first image of the chunk (grid axis 1: its images)
    HW0,  # first pixel of the chunk in each image
    HW,  # pixels per image: pixel n = b*HW + hw
    STAT_ptr,  # out (5, N) acc dtype: each pixel's mu, r, inv, s_yw, s_ywx (the op's stats; NaN where not finite)
    N_STATS,  # pixels of feats: the row length of stats
    SCORES_ptr,  # out (N, C*K) acc dtype: S itself, the backward's cache (if KEEP_SCORES; EMBED only)
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    EMBED: tl.constexpr, LAYER_NORM: tl.constexpr,
    COMPUTE_SEG: tl.constexpr, COMPUTE_LSE: tl.constexpr, COMPUTE_OWN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    KEEP_SCORES: tl.constexpr,
):
    # One program: BLOCK_N pixels against all C*K prototypes, BLOCK_C classes
    # at a time. Each (BLOCK_N, BLOCK_C*BLOCK_K) tile of S is a GEMM over D in
    # BLOCK_D chunks; its epilogue writes seg/argk for its classes, folds the
    # tile into the running (max, sum) of the row log-sum-exp (online softmax),
    # and writes the K scores of the pixel's own class when the tile holds it.
    # Fused so that S costs registers only: N*(C + C + 1 + K) values leave the
    # chip instead of N*C*K. EMBED: the S tile is of the embedding (the feats
    # tile LayerNorm'd in registers, the tile scaled by the inverse norms).
    # KEEP_SCORES: each S tile is also written to SCORES (N*C*K values, within
    # the op's cache_bytes), so that the backward reads S instead of the map.
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    BLOCK_J: tl.constexpr = BLOCK_C * BLOCK_K
    rows, row_ok, x_row, mu, r, inv = _forward_rows(tl.program_id(0).to(tl.int64), X_ptr, X_stride_b, X_stride_hw,
                                                    X_stride_d, W_ptr, BIAS_ptr, D, eps, B0, HW0, HWC, HW,
                                                    STAT_ptr, N_STATS, ACC_DTYPE, EMBED, LAYER_NORM, BLOCK_N,
                                                    BLOCK_D)
    j_cls, j_k = _tile_columns(BLOCK_C, BLOCK_K)
    kk = tl.arange(0, BLOCK_K)
    t = tl.full((), temperature, ACC_DTYPE)
    if COMPUTE_OWN:
        lab = tl.load(LAB_ptr + rows * LAB_stride, mask=row_ok, other=-1).to(tl.int64)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)  # running row max of S / t
    l_i = tl.zeros((BLOCK_N,), ACC_DTYPE)  # running sum of exp(S / t - m_i)
    for c0 in range(0, C, BLOCK_C):
        cls, col_ok, prow = _class_columns(c0, j_cls, j_k, C, K, True)
        s = _s_tile(X_ptr, x_row, rows, row_ok, X_stride_hw, X_stride_d, P_ptr, prow, col_ok, D, mu, r, W_ptr,
                    BIAS_ptr, ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, EMBED, LAYER_NORM, BLOCK_N, BLOCK_J,
                    BLOCK_D)
        if EMBED:
            s = s * inv[:, None]  # the L2 normalisation: S of z = y / max(||y||, 1e-12)
        if KEEP_SCORES:  # 32-bit offsets within the block (BLOCK_N * C*K < 2**31), from its first pixel's row
            ii = tl.arange(0, BLOCK_N)
            jj = (c0 + j_cls) * K + j_k
            tl.store(SCORES_ptr + tl.min(rows, axis=0) * (C * K) + (ii[:, None] * (C * K) + jj[None, :]), s,
                     mask=row_ok[:, None] & col_ok[None, :])
        if COMPUTE_LSE:
            m_i, l_i = _online_lse(m_i, l_i, s, col_ok, t)
        cc = c0 + tl.arange(0, BLOCK_C)
        if COMPUTE_SEG:
            _store_class_max(s, SEG_ptr, ARGK_ptr, rows, row_ok, cc, kk, C, K, BLOCK_N, BLOCK_C, BLOCK_K)
        if COMPUTE_OWN:
            _store_own_scores(s, OWN_ptr, rows, row_ok, lab, c0, cc, kk, C, K, BLOCK_N, BLOCK_C, BLOCK_K)
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
    STAT_ptr,  # (5, N_STATS) acc dtype: each pixel's stats (embed_stats_kernel: the op's stats)
    B0,
    HW0,
    HW,
    N_STATS,  # pixels of feats: the row length of stats
    eps: tl.float64,  # LayerNorm eps
    ACC_DTYPE: tl.constexpr,
    EMBED: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # own[n, k] = feats[n] . protos[labels[n], k] for BLOCK_N pixels: only the
    # K columns of S that Sinkhorn needs, gathered by label (N*K*D FLOPs
    # instead of N*C*K*D). Used when neither seg nor lse is asked for
    # (prototype learning outside the head's fused step). The feats tile is
    # read once per D chunk and dotted with the K gathered prototype rows.
    # EMBED: grid (pixel block, image of the chunk); the feats tile is
    # LayerNorm'd in registers (and rounded to feats' dtype, as the eager half
    # LayerNorm's output is), the scores scaled by the pixels' inverse norms.
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    pid = tl.program_id(0).to(tl.int64)
    if EMBED:
        rows, row_ok, loc, x_row = _pixel_rows(pid, B0, HW0, N, HW, X_stride_b, X_stride_n, BLOCK_N)
        # the statistics embed_stats_kernel wrote (a block with a non-finite pixel computes them again)
        mu, r, inv, _norm, _syw, _sywx = _block_stats(STAT_ptr, N_STATS, rows, X_ptr, x_row, row_ok, X_stride_d,
                                                      W_ptr, BIAS_ptr, D, eps, ACC_DTYPE, LAYER_NORM, False, True,
                                                      BLOCK_N, BLOCK_D)
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
    GSEG_ptr, GSEG_stride_n, GSEG_stride_c,  # d loss / d seg (N, C), any strides (if HAS_SEG)
    GLSE_ptr, GLSE_stride,  # d loss / d lse (N,) (if HAS_LSE)
    GOWN_ptr, GOWN_stride_n, GOWN_stride_k,  # d loss / d own (N, K), any strides (if HAS_OWN)
    X_ptr, X_stride_n, X_stride_d,  # feats (N, D), any strides
    P_ptr,  # protos (C*K, D) contiguous
    LAB_ptr, LAB_stride,  # labels (N,) (if HAS_OWN)
    ARGK_ptr, ARGK_stride_n, ARGK_stride_c,  # saved arg-max k (N, C) uint8 (if HAS_SEG)
    LSE_ptr, LSE_stride,  # saved row log-sum-exp (N,) (if HAS_LSE)
    DX_ptr,  # out (N, D) contiguous: d feats in feats' dtype
    N, D, C, K,
    temperature: tl.float64,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    DS_DTYPE: tl.constexpr, DS_PRECISION: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_LSE: tl.constexpr, HAS_OWN: tl.constexpr, FMA_SECOND_GEMM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
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
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    BLOCK_J: tl.constexpr = BLOCK_C * BLOCK_K
    pid_n, pid_d = _row_block_and_slice(D, BLOCK_DO)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    j_cls, j_k = _tile_columns(BLOCK_C, BLOCK_K)
    t = tl.full((), temperature, ACC_DTYPE)
    lse, g_lse, lab = _upstream_rows(LSE_ptr, LSE_stride, GLSE_ptr, GLSE_stride, LAB_ptr, LAB_stride, rows, row_ok,
                                     t, ACC_DTYPE, HAS_LSE, HAS_OWN, BLOCK_N)
    dx = tl.zeros((BLOCK_N, BLOCK_DO), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cls, col_ok, prow = _class_columns(c0, j_cls, j_k, C, K, True)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        ds = tl.zeros((BLOCK_N, BLOCK_J), ACC_DTYPE)  # dS tile
        if HAS_LSE:
            s = _s_tile(X_ptr, rows, rows, row_ok, X_stride_n, X_stride_d, P_ptr, prow, col_ok, D, rows, rows,
                        X_ptr, X_ptr, ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, DOT_UPCAST, False, False, BLOCK_N,
                        BLOCK_J, BLOCK_D)  # S tile, recomputed
            ds = _ds_softmax(s, lse, g_lse, t, col_ok[None, :])
        ds = _ds_gathered(ds, GSEG_ptr, GSEG_stride_n, GSEG_stride_c, ARGK_ptr, ARGK_stride_n, ARGK_stride_c,
                          GOWN_ptr, GOWN_stride_n, GOWN_stride_k, 0, rows, cls, j_k, lab, tile_ok, ACC_DTYPE, HAS_SEG,
                          HAS_OWN, False)
        p_out = tl.load(P_ptr + prow[:, None] * D + dout[None, :], mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
        dx = _ds_times_protos(ds, p_out, dx, DS_DTYPE, DS_PRECISION, DOT_UPCAST, ACC_DTYPE, FMA_SECOND_GEMM)
    tl.store(
        DX_ptr + rows[:, None] * D + dout[None, :],
        dx.to(DX_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dout_ok[None, :],
    )


# ----------------------------------------------------------------- launchers

def tile_config(pass_: str, feats_dtype, protos_dtype, N: int, C: int, K: int, D: int,
                interpret: bool = INTERPRET_TILES, layer_norm: bool = False) -> dict:
    """Block sizes and launch options of the forward (``"fwd"``), backward (``"bwd"``) or embedded dS
    (``"bwd_ds"``) kernel.

    See :func:`protoseg_ext.kernels.tiles.similarity_tiles`: GPU tiles from
    ``tiles.GPU_TILES`` (``layer_norm``: the EMBED + LAYER_NORM variant's,
    ``tiles.EMBED_GPU_TILES``), the interpreter's largest within Triton's
    element limit.
    """
    return similarity_tiles(pass_, gemm_kind(feats_dtype, protos_dtype), C, K, D, N, interpret,
                            layer_norm=layer_norm)


def own_config(N: int, D: int, acc, embed: bool, tiles=None) -> dict:
    """Block sizes of ``own_class_scores_kernel`` (:func:`protoseg_ext.kernels.tiles.own_tiles`) and its
    launch options; ``tiles`` overrides ``BLOCK_N`` / ``BLOCK_D``."""
    cfg = own_tiles(N, D, acc == torch.float64, embed, INTERPRET_TILES)
    cfg.update({k: v for k, v in (tiles or {}).items() if k in cfg})
    return dict(cfg, num_warps=4)


def forward_outputs(feats, N, C, K, compute_seg, compute_lse, compute_own):
    """``(seg, argk, lse, own)`` for N pixels of ``feats``' dtype and device, as the schema has them
    (``own`` zeroed: ignored pixels keep zero rows)."""
    acc = acc_dtype(feats.dtype)
    seg = feats.new_empty((N, C) if compute_seg else (0,))
    argk = feats.new_empty((N, C) if compute_seg else (0,), dtype=torch.uint8)
    lse = feats.new_empty((N,) if compute_lse else (0,), dtype=acc)
    own = feats.new_zeros((N, K) if compute_own else (0,), dtype=acc)
    return seg, argk, lse, own


def forward_kernel_outputs(outputs, feats_dtype, device, compute_seg, compute_lse, compute_own) -> tuple:
    """``(seg, argk, lse, own)`` as ``similarity_fwd_kernel`` takes them: a one-element dummy of the
    kernel's dtype for each output not computed."""
    seg, argk, lse, own = outputs
    acc = acc_dtype(feats_dtype)
    return (seg if compute_seg else dummy(feats_dtype, device), argk if compute_seg else dummy(torch.uint8, device),
            lse if compute_lse else dummy(acc, device), own if compute_own else dummy(acc, device))


def forward_constexprs(feats_dtype, protos_dtype, compute_seg, compute_lse, compute_own, embed=False,
                       layer_norm=False, keep_scores=False) -> dict:
    """The constexprs of ``similarity_fwd_kernel`` other than its tiles."""
    return dict(ACC_DTYPE=TL_DTYPE[acc_dtype(feats_dtype)], **s_dots(feats_dtype, protos_dtype), EMBED=embed,
                LAYER_NORM=layer_norm, COMPUTE_SEG=compute_seg, COMPUTE_LSE=compute_lse, COMPUTE_OWN=compute_own,
                KEEP_SCORES=keep_scores)


def gradient_args(grad_seg, grad_lse, grad_own, labels, argk, lse, acc, device, contiguous=False):
    """``(upstream, saved, flags)``: the backward kernels' gradient arguments ``(grad_seg, its 2 strides,
    grad_lse, its stride, grad_own, its 2 strides)``, saved arguments ``(labels, its stride, argk, its 2
    strides, lse, its stride)`` and ``HAS_SEG`` / ``HAS_LSE`` / ``HAS_OWN``; a dummy for each absent
    gradient and what only it reads. ``contiguous``: grad_seg, argk and grad_own made contiguous."""
    has_seg, has_lse, has_own = grad_seg is not None, grad_lse is not None, grad_own is not None
    dense = (lambda t: t.contiguous()) if contiguous else (lambda t: t)
    gs = dense(grad_seg) if has_seg else dummy(acc, device, 2)
    ak = dense(argk) if has_seg else dummy(torch.uint8, device, 2)
    gl = grad_lse if has_lse else dummy(acc, device)
    ls = lse if has_lse else dummy(acc, device)
    go = dense(grad_own) if has_own else dummy(acc, device, 2)
    lab = labels if has_own else dummy(torch.int64, device)
    upstream = (gs, gs.stride(0), gs.stride(1), gl, gl.stride(0), go, go.stride(0), go.stride(1))
    saved = (lab, lab.stride(0), ak, ak.stride(0), ak.stride(1), ls, ls.stride(0))
    return upstream, saved, dict(HAS_SEG=has_seg, HAS_LSE=has_lse, HAS_OWN=has_own)


def similarity_forward(feats, protos, labels, temperature, compute_seg, compute_lse, compute_own, tiles=None):
    """Launch the forward; arguments already checked. Returns ``(seg, argk, lse, own)``.

    ``tiles`` overrides entries of :func:`tile_config` (tests use small tiles
    to run several row, class and D blocks).
    """
    N, D = feats.shape
    C, K = protos.shape[0], protos.shape[1]
    dev = feats.device
    acc = acc_dtype(feats.dtype)
    outputs = forward_outputs(feats, N, C, K, compute_seg, compute_lse, compute_own)
    if N == 0:
        return outputs
    P = protos.reshape(C * K, D).contiguous()
    lab = labels if compute_own else dummy(torch.int64, dev)
    if compute_own and not (compute_seg or compute_lse):
        cfg = own_config(N, D, acc, embed=False, tiles=tiles)
        own_class_scores_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            feats, feats.stride(0), feats.stride(1), P, lab, lab.stride(0), outputs[3], N, D, C, K,
            0, outputs[3], outputs[3], outputs[3], 0, 0, N, N, 0.0,
            ACC_DTYPE=TL_DTYPE[acc], EMBED=False, LAYER_NORM=False, BLOCK_K=pow2(K), **cfg,
        )
        return outputs
    cfg = tile_config("fwd", feats.dtype, protos.dtype, N, C, K, D)
    cfg.update(tiles or {})
    # the rows as one image of N pixels (stride_b unused), no statistics
    none = dummy(acc, dev)
    similarity_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), 1)](
        feats, feats.stride(0), feats.stride(1), P, lab, lab.stride(0),
        *forward_kernel_outputs(outputs, feats.dtype, dev, compute_seg, compute_lse, compute_own),
        N, D, C, K, float(temperature), 0, none, none, 0.0, 0, 0, N, none, N, none,
        **forward_constexprs(feats.dtype, protos.dtype, compute_seg, compute_lse, compute_own), **cfg,
    )
    return outputs


def similarity_backward(grad_seg, grad_lse, grad_own, feats, protos, labels, argk, lse, temperature, tiles=None):
    """Launch the backward; arguments already checked (a None gradient is skipped). Returns d feats (N, D)."""
    N, D = feats.shape
    C, K = protos.shape[0], protos.shape[1]
    acc = acc_dtype(feats.dtype)
    if N == 0 or D == 0 or (grad_seg is None and grad_lse is None and grad_own is None):
        return feats.new_zeros((N, D))
    dx = feats.new_empty((N, D))
    P = protos.reshape(C * K, D).contiguous()
    cfg = tile_config("bwd", feats.dtype, protos.dtype, N, C, K, D)
    cfg.update(tiles or {})
    upstream, saved, flags = gradient_args(grad_seg, grad_lse, grad_own, labels, argk, lse, acc, feats.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(D, cfg["BLOCK_DO"]),)
    similarity_bwd_kernel[grid](
        *upstream, feats, feats.stride(0), feats.stride(1), P, *saved, dx, N, D, C, K, float(temperature),
        ACC_DTYPE=TL_DTYPE[acc], **dot_config(feats.dtype, protos.dtype), **flags,
        FMA_SECOND_GEMM=acc == torch.float64, **cfg,
    )
    return dx
