"""What every kernel launcher of ``protoseg_ext.kernels`` shares.

* ``INTERPRET``: ``TRITON_INTERPRET=1`` was set when triton was imported; the
  kernels then run on CPU tensors (tests) and the launchers choose large blocks,
  since the interpreter's cost is per program instance (``INTERPRET_TILES``;
  ``PROTOSEG_TRITON_GPU_TILES=1`` keeps the GPU's tiles under the interpreter,
  for the traffic meter).
* dtype maps: the accumulation dtype of an input (float64 for float64, else
  float32), the GEMM kind of a dtype pair and the dtypes and precisions the
  GEMM tiles are fed to ``tl.dot`` in;
* launch helpers: the one-element dummy passed for a pointer a
  specialisation never reads, the segments of a sorted key (Sinkhorn's
  classes, the prototype sums' slots) and the programs per segment.

The ``@triton.jit`` functions the kernels share are in ``device.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tiles import kind_of
from .tiles import pow2  # noqa: F401  (re-exported: the launchers' block sizes)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the launchers' tile choice: the interpreter's large tiles, unless PROTOSEG_TRITON_GPU_TILES=1 asks for the
# GPU's (tools/gpu_model.py meters the kernels under the interpreter as a GPU would launch them)
INTERPRET_TILES = INTERPRET and os.environ.get("PROTOSEG_TRITON_GPU_TILES", "0") != "1"

TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working dtype: float64 for float64 inputs, else float32 (as the C++ kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemm_kind(feats_dtype: torch.dtype, protos_dtype: torch.dtype) -> str:
    """GEMM kind of an input dtype pair (``tiles.kind_of``): "half", "fp32" (also mixed dtypes) or "fp64"."""
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    return kind_of(name(feats_dtype), name(protos_dtype))


def dummy(dtype: torch.dtype, device, dims: int = 1) -> torch.Tensor:
    """A one-element tensor (``dims`` dimensions) for a pointer argument the launched specialisation never reads."""
    return torch.empty((1,) * dims, dtype=dtype, device=device)


def sorted_segments(key: torch.Tensor, num_segments: int):
    """``(perm, offsets)``: the stable sort of the int64 ``key`` (its permutation) and where each segment
    ``0 .. num_segments - 1`` starts in it (``num_segments + 1`` offsets; keys >= num_segments sort last)."""
    sorted_key, perm = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(num_segments + 1, device=key.device, dtype=torch.int64))
    return perm, offsets


def programs_per_segment(N: int, rows_per_program: int, most: int) -> int:
    """Programs that share one segment of a segmented reduction: one per ``rows_per_program`` rows of N, at
    most ``most``; one under the interpreter's tiles. Depends on the shape only (deterministic results)."""
    return 1 if INTERPRET_TILES else min(most, triton.cdiv(N, rows_per_program))


def s_dots(feats_dtype: torch.dtype, protos_dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """The constexprs of :func:`dot_config` that the S products take (``DOT_DTYPE``, ``DOT_PRECISION``,
    ``DOT_UPCAST``): the forward's and the embedded dS kernel's."""
    cfg = dot_config(feats_dtype, protos_dtype, interpret)
    return {k: cfg[k] for k in ("DOT_DTYPE", "DOT_PRECISION", "DOT_UPCAST")}


def dot_config(feats_dtype: torch.dtype, protos_dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """GEMM constexprs of the similarity kernels: what the operands are rounded to, and how they multiply.

    ``DOT_DTYPE`` / ``DOT_PRECISION``: the S = feats @ protos^T tiles. Half
    inputs (both the same half type) use the tensor cores in their own dtype
    with fp32 accumulation. float32 uses ``tf32x3`` (three TF32 products,
    about fp32-accurate: Sinkhorn's exp(S / 0.05) magnifies a TF32 error of
    1e-3 in S 20-fold). float64 and mixed dtypes compute in the accumulation
    dtype.

    ``DS_DTYPE`` / ``DS_PRECISION``: the backward's dS @ protos. dS is never
    rounded to a half type: the PPC/PPD terms of dS (0.01 / n_valid times a
    softmax weight, 1e-9 at Cityscapes sizes) underflow fp16 and keep three
    digits in bf16. Half inputs multiply it as TF32 (fp32's exponent range,
    fp16's 10-bit mantissa; the half prototypes are exact in TF32).

    ``DOT_UPCAST``: the interpreter has no bf16 matmul and no TF32; it rounds
    the operands to DOT_DTYPE / DS_DTYPE as a GPU would, then multiplies them
    in the accumulation dtype ("ieee"), so the tests see the GPU's roundings.
    """
    acc = acc_dtype(feats_dtype)
    half = feats_dtype == protos_dtype and feats_dtype in (torch.float16, torch.bfloat16)
    dot_dtype = TL_DTYPE[feats_dtype] if half else TL_DTYPE[acc]
    if interpret:
        precision = ds_precision = "ieee"
    elif acc == torch.float64:
        precision = ds_precision = "ieee"
    else:
        precision = "ieee" if half else "tf32x3"
        ds_precision = "tf32" if half else "tf32x3"
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, DOT_UPCAST=interpret,
                DS_DTYPE=TL_DTYPE[acc], DS_PRECISION=ds_precision)


