"""Triton kernel of ``sinkhorn``: Sinkhorn-Knopp of every class in one set of launches.

The class problems are segments of the ``(N, K)`` own-class score matrix. The
rows are sorted by class once (a stable ``torch.sort`` of each row's key, its
label, or C for ignored and non-finite rows, which sort last and take no part:
``sinkhorn_keys_kernel``, one launch), which turns every class into
a contiguous segment ``[offsets[c], offsets[c+1])`` of a sorted work buffer. A
pass is one launch over a ``(C, SPLIT)`` grid: program ``(c, j)`` owns the
j-th of SPLIT equal chunks of class c's segment, so a large class is spread
over SPLIT programs. Between passes, each program leaves its chunk's partial
column max or column sums (K values) in a ``(SPLIT, C, BLOCK_K)`` buffer; the
next pass merges the SPLIT partials of its class in a fixed order, so the
result is deterministic and needs no atomics and no host synchronisation.

Passes (2 + iters launches, independent of the data):
  0. column max of S per (class, prototype): the shift that keeps exp in range;
  1. L = exp((S - colmax) / eps) into the sorted buffer, and its column sums;
  2. per iteration, in one pass: scale each column to sum 1/K, each row to
     1/n_c (to 1 in the last iteration, which folds in the official L *= n_c),
     and sum the columns for the next iteration; the last pass scatters the
     rows back to the original order.
The official first step ``L /= sum(L)`` is a global scale that the first
column normalisation removes, as is the colmax shift (see protoseg_math.h).
Everything runs in float32 (float64 for float64 input): exp(1 / 0.05) is out
of float16's range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET_TILES, TL_DTYPE, acc_dtype, pow2, programs_per_segment, sorted_segments
from .device import _segment_chunk

PHASE_COLMAX = 0
PHASE_EXP = 1
PHASE_ITERATE = 2


@triton.jit
def _merged_columns(PIN_ptr, c, C, K, SPLIT, kk, ACC_DTYPE: tl.constexpr, PHASE: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    # The K column statistics of class c from the previous pass's SPLIT
    # partials, merged in a fixed order: PHASE 1 the column max (exp's
    # shift), PHASE 2 the column scale 1 / (K colsum) (each prototype column
    # of the class then sums to 1/K); PHASE 0 has none (zeros, unused)
    col = tl.zeros((BLOCK_K,), ACC_DTYPE)
    if PHASE == 1:
        col = tl.full((BLOCK_K,), float("-inf"), ACC_DTYPE)
        for sp in range(0, SPLIT):
            col = tl.maximum(col, tl.load(PIN_ptr + (sp * C + c) * BLOCK_K + kk))
    if PHASE == 2:
        for sp in range(0, SPLIT):
            col += tl.load(PIN_ptr + (sp * C + c) * BLOCK_K + kk)
        col = tl.where(col > 0, 1.0 / tl.where(col > 0, col * K, 1.0), 0.0)
    return col


@triton.jit
def _scaled_rows(W_ptr, w_off, m, col, n_c, LAST: tl.constexpr):
    # One Sinkhorn iteration on rows w_off of the work buffer: each column
    # scaled by col, then each row to 1/n_c (LAST: to 1, the official L *= n_c)
    v = tl.load(W_ptr + w_off, mask=m, other=0.0) * col[None, :]
    row_sum = tl.sum(v, axis=1)
    if LAST:
        den = row_sum
    else:
        den = row_sum * n_c
    rs = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, den, 1.0), 0.0)
    return v * rs[:, None]


@triton.jit
def sinkhorn_keys_kernel(
    OWN_ptr,  # own-class scores (N, K), any strides
    OWN_stride_n,
    OWN_stride_k,
    LAB_ptr,  # labels (N,), any integer dtype, stride LAB_stride
    LAB_stride,
    KEY_ptr,  # out (N,) int64: the row's class, or C where it takes no part
    N,
    K,
    C,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # key[n] = labels[n] when it is a class (in [0, C)) and own[n]'s K scores
    # are finite, else C: the sort key of the class segments. One read of the
    # labels and own, one write of the keys (memory-bound).
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < N
    kk = tl.arange(0, BLOCK_K)
    m = i_ok[:, None] & (kk < K)[None, :]
    s = tl.load(OWN_ptr + i[:, None] * OWN_stride_n + kk[None, :] * OWN_stride_k, mask=m, other=0.0).to(ACC_DTYPE)
    not_finite = tl.sum((~(tl.abs(s) < float("inf"))).to(tl.int32), axis=1)  # NaN or +-inf entries (padding: 0)
    lab = tl.load(LAB_ptr + i * LAB_stride, mask=i_ok, other=0).to(tl.int64)
    take = (not_finite == 0) & (lab >= 0) & (lab < C)
    tl.store(KEY_ptr + i, tl.where(take, lab, C), mask=i_ok)


@triton.jit
def sinkhorn_pass_kernel(
    OWN_ptr,  # own-class scores (N, K), any strides (read in phases 0 and 1)
    OWN_stride_n,
    OWN_stride_k,
    PERM_ptr,  # (N,) int64: original row of sorted position i
    OFFS_ptr,  # (C + 1,) int64: class segments of the sorted order
    W_ptr,  # work (N, BLOCK_K) acc dtype, sorted order, contiguous
    Q_ptr,  # out (N, K) acc dtype, original order, zero-initialised (last pass)
    PIN_ptr,  # (SPLIT, C, BLOCK_K) partials of the previous pass
    POUT_ptr,  # (SPLIT, C, BLOCK_K) partials of this pass
    C,
    K,
    SPLIT,
    eps: tl.float64,
    ACC_DTYPE: tl.constexpr,
    PHASE: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One pass over chunk j of class c's rows, BLOCK_N x BLOCK_K at a time.
    # The K column statistics of the class (max or sums) are merged from the
    # previous pass's SPLIT partials into registers first; the row-wise work
    # (exp, column scale, row normalisation) and the next pass's column sums
    # are fused so each iteration reads and writes the class's rows once.
    # GPU: BLOCK_N = 2048 / BLOCK_K rows (128 at K = 10) x BLOCK_K, 4 warps,
    # CUDA cores only; shared memory only for the column reductions
    # (registers per arch and phase: docs/kernels.md). Intensity: a few FLOPs per
    # 4-8 bytes of the work buffer (< 1 FLOP/B): memory-bound, 2 + iters
    # passes over N x BLOCK_K values. Padding: the work buffer's rows are
    # BLOCK_K = 16 wide for K = 10, 1.6x its traffic (masked lanes are not
    # read or written, but the rows are 64 B apart); a K-strided buffer would
    # remove that at the price of unaligned rows.
    c = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    lo, hi, n_c = _segment_chunk(OFFS_ptr, c, j, SPLIT)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    e = tl.full((), eps, ACC_DTYPE)
    col = _merged_columns(PIN_ptr, c, C, K, SPLIT, kk, ACC_DTYPE, PHASE, BLOCK_K)
    if PHASE == 0:
        part = tl.full((BLOCK_N, BLOCK_K), float("-inf"), ACC_DTYPE)
    else:
        part = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    for i0 in range(lo, hi, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        i_ok = i < hi
        m = i_ok[:, None] & k_ok[None, :]
        w_off = i[:, None] * BLOCK_K + kk[None, :]
        if PHASE <= 1:
            r = tl.load(PERM_ptr + i, mask=i_ok, other=0)
            s = tl.load(OWN_ptr + r[:, None] * OWN_stride_n + kk[None, :] * OWN_stride_k, mask=m, other=0.0)
            s = s.to(ACC_DTYPE)
            if PHASE == 0:
                part = tl.maximum(part, tl.where(m, s, float("-inf")))
            else:
                v = tl.where(m, tl.exp((s - col[None, :]) / e), 0.0)
                tl.store(W_ptr + w_off, v, mask=m)
                part += v
        else:
            v = _scaled_rows(W_ptr, w_off, m, col, n_c, LAST)
            if LAST:
                r = tl.load(PERM_ptr + i, mask=i_ok, other=0)
                tl.store(Q_ptr + r[:, None] * K + kk[None, :], v, mask=m)
            else:
                tl.store(W_ptr + w_off, v, mask=m)
                part += v
    if not LAST:
        if PHASE == 0:
            out = tl.max(part, axis=0)
        else:
            out = tl.sum(part, axis=0)
        tl.store(POUT_ptr + (j * C + c) * BLOCK_K + kk, out)


def class_keys(own, labels, num_classes, block_n=None):
    """``(N,)`` int64, one launch: each row's label where it is a class (in ``[0, num_classes)``) and its K
    scores in ``own (N, K)`` are finite, else ``num_classes`` (the row takes no part). ``block_n``: rows per
    program (tests)."""
    N, K = own.shape
    key = torch.empty(N, dtype=torch.int64, device=own.device)
    if N == 0:
        return key
    BLOCK_K = pow2(K)
    rows = block_n or max(1, (1 << 16 if INTERPRET_TILES else 2048) // BLOCK_K)
    sinkhorn_keys_kernel[(triton.cdiv(N, rows),)](own, own.stride(0), own.stride(1), labels, labels.stride(0), key, N,
                                                  K, int(num_classes), ACC_DTYPE=TL_DTYPE[acc_dtype(own.dtype)],
                                                  BLOCK_N=rows, BLOCK_K=BLOCK_K, num_warps=4)
    return key


def sinkhorn(own, labels, num_classes, iters, eps, split=None, block_n=None):
    """Launch Sinkhorn for every class; arguments already checked. Returns ``Q (N, K)``.

    ``split`` (programs per class) defaults to one per 4096 rows of N (capped
    at 256); it depends on the shape only, so the result is deterministic.
    ``block_n`` overrides the rows per step (tests).
    """
    N, K = own.shape
    C = int(num_classes)
    dev = own.device
    acc = acc_dtype(own.dtype)
    Q = torch.zeros((N, K), dtype=acc, device=dev)
    if N == 0 or K == 0:
        return Q
    BLOCK_K = pow2(K)
    perm, offsets = sorted_segments(class_keys(own, labels, C), C)
    if split is None:
        split = programs_per_segment(N, 4096, 256)
    BLOCK_N = block_n or (pow2(N, 16, 1024) if INTERPRET_TILES else max(16, 2048 // BLOCK_K))
    W = torch.empty((N, BLOCK_K), dtype=acc, device=dev)
    partials = torch.empty((3, split, C, BLOCK_K), dtype=acc, device=dev)
    grid = (C, split)

    def run(phase, pin, pout, last=False):
        sinkhorn_pass_kernel[grid](
            own, own.stride(0), own.stride(1), perm, offsets, W, Q, pin, pout, C, K, split, float(eps),
            ACC_DTYPE=TL_DTYPE[acc], PHASE=phase, LAST=last, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
        )

    run(PHASE_COLMAX, partials[0], partials[0])
    run(PHASE_EXP, partials[0], partials[1])
    for it in range(iters):
        pin, pout = partials[1 + it % 2], partials[1 + (it + 1) % 2]
        run(PHASE_ITERATE, pin, pout, last=it + 1 == iters)
    return Q
