"""Triton kernels of ``ppc_ppd`` and ``ppc_ppd_backward``: the PPC and PPD losses from the row
log-sum-exp ``lse (N,)`` and the own-class scores ``own (N, K)`` (``csrc/protoseg.cpp`` states the
op; ``protoseg_ext.reference.losses_from_scores`` is its reference).

Forward: program ``p`` of a grid fixed by N sums its own contiguous run of pixels in float64 and
writes three partials (the sums of ``lse - s / tau``, ``(1 - s)^2`` and the count); one more
program adds the partials in order and divides. No atomics: the same bits on every run.
Backward: one program per ``BLOCK_E`` entries of ``grad_own (N, K)``; the entries of column 0
also write ``grad_lse``. The upstream gradients and the count are read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET_TILES

MAX_PROGRAMS = 1024  # partials of the forward, at most
BLOCK_N = 1024  # pixels per step of a forward program
BLOCK_E = 1024  # entries of grad_own per backward program
BLOCK_P = 1024  # partials per step of the finishing program


@triton.jit
def _own_column(t, K):
    # t mod K in [0, K) (floor mod, as torch.remainder): the same under C's and Python's remainder
    k = t % K
    return tl.where(k < 0, k + K, k)


@triton.jit
def ppc_ppd_partials_kernel(
    LSE_ptr,  # (N,) float32/float64
    LSE_stride,
    OWN_ptr,  # (N, K), lse's dtype
    OWN_stride_n,
    OWN_stride_k,
    T_ptr,  # (N,) integer targets
    T_stride,
    PART_ptr,  # out (programs, 3) float64
    N,
    K,
    ignore_index,
    inv_temp: tl.float64,  # 1 / temperature, in float64 as the sums
    rows_per_program,
    BLOCK_N: tl.constexpr,
):
    # Program p: pixels [p * rows_per_program, (p + 1) * rows_per_program) within N, BLOCK_N at a
    # time; the sums of lse - s / tau, (1 - s)^2 and 1 over those that take part (target !=
    # ignore_index, s = own[n, target mod K]), in float64. Memory-bound: N * (2 + 1) loads.
    pid = tl.program_id(0).to(tl.int64)
    K = tl.cast(K, tl.int64)
    start = pid * rows_per_program
    sc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    sd = tl.zeros((BLOCK_N,), dtype=tl.float64)
    cnt = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for r0 in range(0, rows_per_program, BLOCK_N):
        rows = start + r0 + tl.arange(0, BLOCK_N)
        inside = rows < N
        t = tl.load(T_ptr + rows * T_stride, mask=inside, other=ignore_index).to(tl.int64)
        take = inside & (t != ignore_index)
        k = _own_column(t, K)
        s = tl.load(OWN_ptr + rows * OWN_stride_n + k * OWN_stride_k, mask=take, other=0.0).to(tl.float64)
        lse = tl.load(LSE_ptr + rows * LSE_stride, mask=take, other=0.0).to(tl.float64)
        sc += tl.where(take, lse - s * inv_temp, 0.0)
        sd += tl.where(take, (1.0 - s) * (1.0 - s), 0.0)
        cnt += take.to(tl.float64)
    tl.store(PART_ptr + pid * 3, tl.sum(sc, axis=0))
    tl.store(PART_ptr + pid * 3 + 1, tl.sum(sd, axis=0))
    tl.store(PART_ptr + pid * 3 + 2, tl.sum(cnt, axis=0))


@triton.jit
def ppc_ppd_finish_kernel(
    PART_ptr,  # (programs, 3) float64
    programs,
    PPC_ptr,  # out, one value each, lse's dtype
    PPD_ptr,
    CNT_ptr,
    BLOCK_P: tl.constexpr,
):
    # One program: the partials added BLOCK_P at a time, in order, then divided by max(count, 1).
    sc = tl.zeros((BLOCK_P,), dtype=tl.float64)
    sd = tl.zeros((BLOCK_P,), dtype=tl.float64)
    cnt = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for p0 in range(0, programs, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m = p < programs
        sc += tl.load(PART_ptr + p * 3, mask=m, other=0.0)
        sd += tl.load(PART_ptr + p * 3 + 1, mask=m, other=0.0)
        cnt += tl.load(PART_ptr + p * 3 + 2, mask=m, other=0.0)
    n = tl.sum(cnt, axis=0)
    denom = tl.maximum(n, 1.0)
    out_ty = PPC_ptr.dtype.element_ty
    tl.store(PPC_ptr, (tl.sum(sc, axis=0) / denom).to(out_ty))
    tl.store(PPD_ptr, (tl.sum(sd, axis=0) / denom).to(out_ty))
    tl.store(CNT_ptr, n.to(out_ty))


@triton.jit
def ppc_ppd_backward_kernel(
    GPPC_ptr,  # one value each: d loss / d ppc, d loss / d ppd, the forward's count (own's dtype)
    GPPD_ptr,
    COUNT_ptr,
    OWN_ptr,  # (N, K)
    OWN_stride_n,
    OWN_stride_k,
    T_ptr,  # (N,) integer targets
    T_stride,
    GLSE_ptr,  # out (N,) contiguous
    GOWN_ptr,  # out (N, K) contiguous
    N,
    K,
    ignore_index,
    inv_temp: tl.float64,  # 1 / temperature, in float64 as the sums
    BLOCK_E: tl.constexpr,
):
    # Entries e of grad_own (row e // K, column e % K): the own-class column of a pixel that takes
    # part gets -g_ppc / (tau n) - 2 g_ppd (1 - s) / n, every other entry 0; column 0 also writes
    # grad_lse (g_ppc / n, or 0). n = max(count, 1). Each output entry is written once.
    pid = tl.program_id(0).to(tl.int64)
    K = tl.cast(K, tl.int64)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    inside = e < N * K
    row = e // K
    col = e - row * K
    t = tl.load(T_ptr + row * T_stride, mask=inside, other=ignore_index).to(tl.int64)
    take = inside & (t != ignore_index)
    own_col = take & (col == _own_column(t, K))
    s = tl.load(OWN_ptr + row * OWN_stride_n + col * OWN_stride_k, mask=own_col, other=0.0).to(tl.float64)
    denom = tl.maximum(tl.load(COUNT_ptr).to(tl.float64), 1.0)
    g_ppc = tl.load(GPPC_ptr).to(tl.float64)
    g_ppd = tl.load(GPPD_ptr).to(tl.float64)
    out_ty = GOWN_ptr.dtype.element_ty
    v = tl.where(own_col, -g_ppc * inv_temp / denom - 2.0 * g_ppd * (1.0 - s) / denom, 0.0)
    tl.store(GOWN_ptr + e, v.to(out_ty), mask=inside)
    g_lse = tl.where(take, g_ppc / denom, 0.0)
    tl.store(GLSE_ptr + row, g_lse.to(out_ty), mask=inside & (col == 0))


def _rows_per_program(N: int) -> int:
    """Pixels per forward program: a multiple of BLOCK_N, at most MAX_PROGRAMS programs (one under the
    interpreter's tiles). A function of N alone."""
    if INTERPRET_TILES:
        return max(BLOCK_N, triton.cdiv(N, BLOCK_N) * BLOCK_N)
    return triton.cdiv(max(1, triton.cdiv(N, MAX_PROGRAMS)), BLOCK_N) * BLOCK_N


def ppc_ppd(lse: torch.Tensor, own: torch.Tensor, target: torch.Tensor, ignore_index: int, temperature: float):
    """``(ppc, ppd, count)`` 0-dim tensors of lse's dtype (arguments checked by the caller)."""
    N, K = own.shape
    ppc, ppd, count = (torch.empty((), dtype=lse.dtype, device=lse.device) for _ in range(3))
    rows = _rows_per_program(N)
    programs = triton.cdiv(N, rows)
    part = torch.empty((max(1, programs), 3), dtype=torch.float64, device=lse.device)
    if programs > 0:
        ppc_ppd_partials_kernel[(programs,)](
            lse, lse.stride(0), own, own.stride(0), own.stride(1), target, target.stride(0), part, N, K,
            int(ignore_index), 1.0 / float(temperature), rows, BLOCK_N=BLOCK_N,
        )
    ppc_ppd_finish_kernel[(1,)](part, programs, ppc, ppd, count, BLOCK_P=BLOCK_P)
    return ppc, ppd, count


def ppc_ppd_backward(grad_ppc, grad_ppd, own, target, count, ignore_index: int, temperature: float):
    """``(grad_lse (N,), grad_own (N, K))`` in own's dtype (arguments checked by the caller)."""
    N, K = own.shape
    grad_lse = torch.empty(N, dtype=own.dtype, device=own.device)
    grad_own = torch.empty((N, K), dtype=own.dtype, device=own.device)
    if N == 0:
        return grad_lse, grad_own
    one = [t.reshape(1).to(own.dtype) for t in (grad_ppc, grad_ppd, count)]
    block = min(1 << 16, max(BLOCK_E, triton.next_power_of_2(N * K))) if INTERPRET_TILES else BLOCK_E
    ppc_ppd_backward_kernel[(triton.cdiv(N * K, block),)](
        *one, own, own.stride(0), own.stride(1), target, target.stride(0), grad_lse, grad_own, N, K,
        int(ignore_index), 1.0 / float(temperature), BLOCK_E=block,
    )
    return grad_lse, grad_own
