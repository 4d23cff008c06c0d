"""The label-range check of the Triton ops in one launch.

``labels_ok(labels, hi, ignore_index)`` returns a one-element int32 tensor on
the labels' device: 1 when every label is in ``[0, hi)`` or equals
``ignore_index``, else 0. ``protoseg_ext.triton_ops`` turns it into a
device-side assert on a GPU (no host sync) and, under the interpreter, into
the host check's ``ValueError`` naming the first bad entry. Built from ATen
ops the same check is six elementwise and reduction launches (two compares,
their ``or``, the ``ignore_index`` compare, the combination, ``all``); here it
is the flag's fill and this kernel, each program reading its block of labels
once (int64 labels: 8 bytes a pixel, memory-bound) and clearing the flag when
the block holds a bad label. Every program that clears it stores the same
value, so the order of the stores does not matter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET_TILES

# labels per program: 1,024 on a GPU (4 warps, 8 a thread), the interpreter's cost is per program
BLOCK_GPU = 1024
BLOCK_INTERPRET = 1 << 16


@triton.jit
def label_check_kernel(
    LAB_ptr,  # labels (N,), any integer dtype, stride LAB_stride
    LAB_stride,
    N,
    hi,  # labels must be in [0, hi) ...
    ignore_index,  # ... or equal ignore_index
    OK_ptr,  # (1,) int32, 1 on entry: cleared when a label of this block is bad
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = i < N
    lab = tl.load(LAB_ptr + i * LAB_stride, mask=m, other=0).to(tl.int64)
    bad = m & ((lab < 0) | (lab >= hi)) & (lab != ignore_index)
    n_bad = tl.sum(bad.to(tl.int32), axis=0)
    tl.store(OK_ptr, tl.zeros((), tl.int32), mask=n_bad > 0)


def labels_ok(labels: torch.Tensor, hi: int, ignore_index: int) -> torch.Tensor:
    """``(1,)`` int32 on ``labels``' device: 1 when every entry of the integer ``(N,)`` ``labels`` is in
    ``[0, hi)`` or equals ``ignore_index``, else 0 (two launches: the flag's fill and the check)."""
    ok = torch.ones(1, dtype=torch.int32, device=labels.device)
    N = labels.shape[0]
    if N:
        block = BLOCK_INTERPRET if INTERPRET_TILES else BLOCK_GPU
        label_check_kernel[(triton.cdiv(N, block),)](labels, labels.stride(0), N, int(hi), int(ignore_index), ok,
                                                     BLOCK_N=block, num_warps=4)
    return ok
