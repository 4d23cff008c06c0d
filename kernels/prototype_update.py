"""Triton kernels of ``prototype_sums`` and ``prototype_ema``.

prototype_sums: ``sums[s] = sum of feats[n]`` over the rows with ``slot[n] == s``
and an all-finite feature row, ``counts[s]`` how many. Two implementations:

* deterministic (sorted segmented reduction): a first kernel turns each row's
  slot into a sort key (``num_slots`` for rows that take no part, so they sort
  last); a stable ``torch.sort`` makes every slot a contiguous segment of a
  permutation; then program ``(s, d-block, j)`` sums the j-th of SPLIT chunks
  of slot s's rows for BLOCK_D columns, in a fixed order. No float atomics;
  the SPLIT partials (if any) are summed by ``torch.sum`` (fixed order too).
  Counts are segment lengths, exact.
* atomic: each program checks BLOCK_N rows for finiteness and adds them to
  ``sums[slot]`` with float atomics: one pass, no sort, but the order of the
  additions (so the last bits of the sums) varies from run to run.

prototype_ema: one program per prototype: normalise its sum, momentum update,
L2-normalise, all in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET_TILES, TL_DTYPE, acc_dtype, pow2, programs_per_segment, sorted_segments
from .device import _segment_chunk


@triton.jit
def _rows_taking_part(X_ptr, X_stride_n, X_stride_d, SLOT_ptr, SLOT_stride, rows, N, D, num_slots,
                      BLOCK_D: tl.constexpr):
    # (slot, take) of the rows `rows`: a row takes part when its slot is in
    # [0, num_slots) and its whole feature row is finite (a NaN pixel must
    # never reach the prototypes). Rows without a slot are not read at all
    # (masked loads).
    slot = tl.load(SLOT_ptr + rows * SLOT_stride, mask=rows < N, other=-1).to(tl.int64)
    take = (rows < N) & (slot >= 0) & (slot < num_slots)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = take[:, None] & (d < D)[None, :]
        # checked in the input dtype: a cast first (float64 -> float32) would
        # turn a finite 1e300 into inf and drop a row the sums take in float64
        x = tl.load(X_ptr + rows[:, None] * X_stride_n + d[None, :] * X_stride_d, mask=m, other=0.0)
        finite = tl.abs(x) < float("inf")  # False for NaN and +-inf
        take = take & (tl.min(finite.to(tl.int32), axis=1) > 0)
    return slot, take


@triton.jit
def prototype_slot_key_kernel(
    X_ptr,  # feats (N, D), any strides
    X_stride_n,
    X_stride_d,
    SLOT_ptr,  # (N,) integer: prototype slot of each row, < 0 for none
    SLOT_stride,
    KEY_ptr,  # out (N,) int64: slot, or num_slots when the row takes no part
    N,
    D,
    num_slots,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    # Sort key of BLOCK_N rows: their slot where they take part, else num_slots.
    # GPU: 32 rows x BLOCK_D 128, 4 warps (registers per arch:
    # docs/kernels.md; fp64 with an odd D, whose loads cannot be vectorised,
    # costs the most). Reads feats once and does no arithmetic
    # beyond the finiteness test: purely memory-bound (94 MB in bf16).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    slot, take = _rows_taking_part(X_ptr, X_stride_n, X_stride_d, SLOT_ptr, SLOT_stride, rows, N, D, num_slots,
                                   BLOCK_D)
    tl.store(KEY_ptr + rows, tl.where(take, slot, num_slots), mask=rows < N)


@triton.jit
def prototype_sums_segmented_kernel(
    X_ptr,  # feats (N, D), any strides
    X_stride_n,
    X_stride_d,
    PERM_ptr,  # (N,) int64: rows sorted by slot
    OFFS_ptr,  # (num_slots + 1,) int64: slot segments of the sorted order
    SUMS_ptr,  # out (SPLIT, num_slots, D) acc dtype: partial sums of chunk j
    D,
    num_slots,
    SPLIT,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    # Program (s, d-block, j): sum of feats[perm[i], d-block] over the j-th
    # chunk of slot s's segment, BLOCK_N rows at a time into a BLOCK_N x
    # BLOCK_D accumulator that is reduced once at the end. Each row of feats
    # is read once (gathered through perm); the fixed chunking and order make
    # the sums bitwise reproducible without atomics.
    # GPU: 64 rows (32 for fp64) x BLOCK_D 128 accumulator, 4 warps, a
    # (slot, D-block, split) grid; shared memory only for the final row
    # reduction (a 64-row fp64 accumulator spills). One add per element
    # read: 0.5 FLOP/B in bf16, memory-bound; the rows of a slot are gathered
    # through perm, so coalescing holds within a row only (D contiguous).
    s = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    lo, hi, _n = _segment_chunk(OFFS_ptr, s, j, SPLIT)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    for i0 in range(lo, hi, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        i_ok = i < hi
        r = tl.load(PERM_ptr + i, mask=i_ok, other=0)
        m = i_ok[:, None] & d_ok[None, :]
        x = tl.load(X_ptr + r[:, None] * X_stride_n + d[None, :] * X_stride_d, mask=m, other=0.0)
        acc += x.to(ACC_DTYPE)
    tl.store(SUMS_ptr + (j * num_slots + s) * D + d, tl.sum(acc, axis=0), mask=d_ok)


@triton.jit
def prototype_sums_atomic_kernel(
    X_ptr,  # feats (N, D), any strides
    X_stride_n,
    X_stride_d,
    SLOT_ptr,  # (N,) integer slot, < 0 for none
    SLOT_stride,
    SUMS_ptr,  # out (num_slots, D) acc dtype, zero-initialised
    COUNTS_ptr,  # out (num_slots,) acc dtype, zero-initialised
    N,
    D,
    num_slots,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    X_stride_d = tl.cast(X_stride_d, tl.int64)
    # BLOCK_N rows: first pass over D checks that each row is finite, second
    # pass adds the finite rows into sums[slot] with float atomics (the tile
    # is still in L1/L2). One kernel, no sort; non-deterministic bit-wise.
    # GPU: 32 rows x BLOCK_D 128, 4 warps. Memory-bound: feats is read twice
    # (the second time mostly from L2) and every element is one float atomic
    # into the (C*K, D) sums, which stay in L2 (190 x 720 x 4 B = 547 KB at
    # Cityscapes).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    slot, take = _rows_taking_part(X_ptr, X_stride_n, X_stride_d, SLOT_ptr, SLOT_stride, rows, N, D, num_slots,
                                   BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = take[:, None] & (d < D)[None, :]
        x = tl.load(X_ptr + rows[:, None] * X_stride_n + d[None, :] * X_stride_d, mask=m, other=0.0)
        tl.atomic_add(SUMS_ptr + slot[:, None] * D + d[None, :], x.to(ACC_DTYPE), mask=m, sem="relaxed")
    one = tl.full((BLOCK_N,), 1.0, ACC_DTYPE)
    tl.atomic_add(COUNTS_ptr + slot, one, mask=take, sem="relaxed")  # integers: exact in any order


@triton.jit
def _inv_norm(sq):
    # 1 / max(||v||, 1e-12) from the lanes' partial sums of squares sq
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), 1e-12)


@triton.jit
def _ema_chunk(P_ptr, SUMS_ptr, j, d, D, D_f, hit, g, inv_f, ACC_DTYPE: tl.constexpr):
    # columns d of prototype j after the momentum update, g p + (1 - g) f inv_f
    # with f its sum (only where it got pixels: hit; D_f = 0 otherwise)
    p = tl.load(P_ptr + j * D + d, mask=d < D, other=0.0).to(ACC_DTYPE)
    f = tl.load(SUMS_ptr + j * D + d, mask=d < D_f, other=0.0).to(ACC_DTYPE)
    return tl.where(hit, g * p + (1.0 - g) * (f * inv_f), p)


@triton.jit
def prototype_ema_kernel(
    P_ptr,  # protos (C*K, D) contiguous
    SUMS_ptr,  # (C*K, D) contiguous
    COUNTS_ptr,  # (C*K,)
    OUT_ptr,  # out (C*K, D) acc dtype
    D,
    gamma: tl.float64,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Prototype j: f = sums[j] / ||sums[j]||; p = gamma * p + (1 - gamma) * f
    # when counts[j] > 0; then p / ||p||. Three sweeps over D (norm of f,
    # updated p and its norm, scaled store), each re-reading the row from L1.
    # GPU: BLOCK_D 256 (3 chunks for D = 720; a 1024-wide float64 block
    # spills), 4 warps, one program per prototype (190 at Cityscapes). Tiny
    # and memory-bound (C*K*D values in and out).
    j = tl.program_id(0).to(tl.int64)
    g = tl.full((), gamma, ACC_DTYPE)
    hit = tl.load(COUNTS_ptr + j).to(ACC_DTYPE) > 0
    D_f = tl.where(hit, D, 0)  # columns of sums[j] to read: none when the prototype got no pixel
    sq_f = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        f = tl.load(SUMS_ptr + j * D + d, mask=d < D_f, other=0.0).to(ACC_DTYPE)
        sq_f += f * f
    inv_f = _inv_norm(sq_f)
    sq_p = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        p = _ema_chunk(P_ptr, SUMS_ptr, j, d, D, D_f, hit, g, inv_f, ACC_DTYPE)
        sq_p += p * p
    inv_p = _inv_norm(sq_p)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        p = _ema_chunk(P_ptr, SUMS_ptr, j, d, D, D_f, hit, g, inv_f, ACC_DTYPE)
        tl.store(OUT_ptr + j * D + d, p * inv_p, mask=d < D)


# ----------------------------------------------------------------- launchers


def prototype_sums(feats, slot, num_slots, deterministic=True, split=None, block_n=None, block_d=None, key=None,
                   out=None):
    """Launch the per-prototype sums; arguments already checked.

    Returns ``sums (num_slots, D)`` and ``counts (num_slots,)`` in the
    accumulation dtype. ``deterministic=False`` uses float atomics.
    ``split`` (programs per slot in the deterministic path) defaults to one per
    8192 rows of N (capped at 64); it depends on the shape only.
    ``block_n`` / ``block_d`` override the tile (tests). ``key``: each row's
    slot where it takes part (in range, finite row), else ``num_slots``,
    computed by the caller (``embed_rows_kernel``): no pass over feats to find
    them, and only the rows that take part are read (the others may hold
    anything). ``out``: ``(sums, counts)`` of that shape and dtype (contiguous)
    that the atomic path (``deterministic=False`` only) adds into and returns,
    instead of zeroing buffers of its own: a caller summing chunks zeroes once.
    """
    N, D = feats.shape
    S = int(num_slots)
    dev = feats.device
    acc = acc_dtype(feats.dtype)
    if out is not None and deterministic:
        raise ValueError("prototype_sums: out is for the atomic path (deterministic=False)")
    if N == 0 or S == 0:
        if out is not None:
            return out
        return torch.zeros((S, D), dtype=acc, device=dev), torch.zeros((S,), dtype=acc, device=dev)
    BLOCK_N = block_n or (pow2(N, 16, 256) if INTERPRET_TILES else 32)
    BLOCK_D = block_d or (pow2(D, 16, 256) if INTERPRET_TILES else 128)
    if not deterministic:
        if out is not None:
            sums, counts = out
        else:
            sums = torch.zeros((S, D), dtype=acc, device=dev)
            counts = torch.zeros((S,), dtype=acc, device=dev)
        if key is not None:  # rows with key num_slots are not read at all
            slot = key
        prototype_sums_atomic_kernel[(triton.cdiv(N, BLOCK_N),)](
            feats, feats.stride(0), feats.stride(1), slot, slot.stride(0), sums, counts, N, D, S,
            ACC_DTYPE=TL_DTYPE[acc], BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
        )
        return sums, counts
    if key is None:
        key = torch.empty((N,), dtype=torch.int64, device=dev)
        prototype_slot_key_kernel[(triton.cdiv(N, BLOCK_N),)](
            feats, feats.stride(0), feats.stride(1), slot, slot.stride(0), key, N, D, S,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
        )
    perm, offsets = sorted_segments(key, S)
    counts = (offsets[1:] - offsets[:-1]).to(acc)
    if split is None:
        split = programs_per_segment(N, 8192, 64)
    if D == 0:
        return torch.zeros((S, D), dtype=acc, device=dev), counts
    partial = torch.empty((split, S, D), dtype=acc, device=dev)
    # GPU: a 64 x 128 float32 (32 x 128 float64) accumulator, 64 values a thread at 4 warps
    BLOCK_N_SEG = block_n or (pow2(N, 16, 256) if INTERPRET_TILES else (64 if acc == torch.float32 else 32))
    grid = (S, triton.cdiv(D, BLOCK_D), split)
    prototype_sums_segmented_kernel[grid](
        feats, feats.stride(0), feats.stride(1), perm, offsets, partial, D, S, split,
        ACC_DTYPE=TL_DTYPE[acc], BLOCK_N=BLOCK_N_SEG, BLOCK_D=BLOCK_D, num_warps=4,
    )
    sums = partial[0] if split == 1 else partial.sum(dim=0)
    return sums, counts


def prototype_ema(protos, sums, counts, gamma):
    """Launch the momentum update; arguments already checked. Returns ``(C, K, D)`` in protos' dtype."""
    C, K, D = protos.shape
    acc = acc_dtype(protos.dtype)
    CK = C * K
    if CK == 0 or D == 0:
        return torch.empty_like(protos, memory_format=torch.contiguous_format)
    P = protos.reshape(CK, D).contiguous()
    Sm = sums.reshape(CK, D).contiguous()
    cnt = counts.reshape(CK).contiguous()
    out = torch.empty((CK, D), dtype=acc, device=protos.device)
    prototype_ema_kernel[(CK,)](
        P, Sm, cnt, out, D, float(gamma), ACC_DTYPE=TL_DTYPE[acc],
        BLOCK_D=pow2(D, 16, 4096 if INTERPRET_TILES else 256), num_warps=4,
    )
    return out.view(C, K, D).to(protos.dtype)
