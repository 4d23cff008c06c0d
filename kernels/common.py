"""What every kernel launcher of ``protoseg_ext.kernels`` shares.

* ``INTERPRET``: ``TRITON_INTERPRET=1`` was set when triton was imported; the
  kernels then run on CPU tensors (tests) and the launchers choose large blocks,
  since the interpreter's cost is per program instance.
* dtype maps: the accumulation dtype of an input (float64 for float64, else
  float32) and the dtype the GEMM tiles are fed to ``tl.dot`` in.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working dtype: float64 for float64 inputs, else float32 (as the C++ kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_config(feats_dtype: torch.dtype, protos_dtype: torch.dtype):
    """``(tl dtype, input_precision)`` of the similarity GEMM tiles.

    Half inputs (both the same half type) use the tensor cores in their own
    dtype with fp32 accumulation. float32 uses ``tf32x3`` (three TF32 products,
    about fp32-accurate: Sinkhorn's exp(S / 0.05) magnifies a TF32 error of
    1e-3 in S 20-fold). float64 and mixed dtypes compute in the accumulation
    dtype. The interpreter has no bf16 matmul and no TF32: it always computes
    in the accumulation dtype, exactly ("ieee").
    """
    acc = acc_dtype(feats_dtype)
    if INTERPRET or feats_dtype != protos_dtype or feats_dtype in (torch.float32, torch.float64):
        precision = "tf32x3" if (acc == torch.float32 and not INTERPRET) else "ieee"
        return TL_DTYPE[acc], precision
    return TL_DTYPE[feats_dtype], "ieee"


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """``triton.next_power_of_2(n)`` clamped to ``[lo, hi]``."""
    p = max(lo, triton.next_power_of_2(max(1, int(n))))
    return min(p, hi) if hi is not None else p
