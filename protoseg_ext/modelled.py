"""Modelled H100 SXM times of the head's training step, per backend, size and dtype.

Not timings: ``tools/gpu_model.py`` (in the source tree) meters the traffic and
flops of the step ``ProtoSegHead`` runs (NCHW map, feat_norm on, forward,
prototype update, CE + 0.01 PPC + 0.001 PPD, backward) in the cuda_sim emulator
or the Triton interpreter and turns them into an H100 SXM time (3.35 TB/s HBM,
989.5 TFLOPS dense 16-bit, 67 TFLOPS fp32; NVIDIA datasheet). The figures
below are its output at the commit named beside each; the README's GPU table
prints the same ones. ``python -m protoseg_ext.selftest`` prints them beside
the step times it measures on a GPU, so that the first user with an H100 can
tell how far the model is from the device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple


class Modelled(NamedTuple):
    """One metered step: the modelled time and the step's roofline (us), the commit it was metered at, and
    the GPU launches the step makes at that size (kernels, GEMMs and other ATen ops, as the meter counts
    them: a lower bound where an ATen op runs several kernels)."""

    step_us: float
    roofline_us: float
    commit: str
    launches: int


# (backend, N, D, C, K, dtype name) -> Modelled. The meter's maps are (2, D, 128, 256) at N = 65,536,
# (1, 720, 1024, 2048) and (2, 256, 1024, 2048) at full resolution.
_CS, _ADE = (65536, 720, 19, 10), (65536, 720, 150, 10)
_FULL, _FULL_ADE = (2097152, 720, 19, 10), (4194304, 256, 150, 10)
MODELLED_H100: dict = {
    ("cuda", *_CS, "bfloat16"): Modelled(387.0, 120.0, "32e7185", 83),
    ("cuda", *_CS, "float32"): Modelled(859.0, 567.0, "32e7185", 74),
    ("cuda", *_ADE, "bfloat16"): Modelled(1284.0, 374.0, "32e7185", 215),
    ("cuda", *_ADE, "float32"): Modelled(4970.0, 4270.0, "32e7185", 206),
    ("cuda", *_FULL, "bfloat16"): Modelled(12498.0, 3806.0, "32e7185", 633),
    ("cuda", *_FULL_ADE, "bfloat16"): Modelled(76940.0, 9876.0, "a609894", 14117),
    ("triton", *_CS, "bfloat16"): Modelled(412.0, 120.0, "263a66f", 69),
    ("triton", *_CS, "float32"): Modelled(720.0, 264.0, "e6adcf0", 60),
    ("triton", *_ADE, "bfloat16"): Modelled(2312.0, 374.0, "263a66f", 69),
    ("triton", *_ADE, "float32"): Modelled(4030.0, 1736.0, "e6adcf0", 60),
    ("triton", *_FULL, "bfloat16"): Modelled(13425.0, 3806.0, "263a66f", 223),
    ("triton", *_FULL_ADE, "bfloat16"): Modelled(92124.0, 9876.0, "263a66f", 384),
}


def modelled_step(backend: str, shape: Tuple[int, int, int, int], dtype) -> Optional[Modelled]:
    """The metered step of ``backend`` at ``shape = (N, D, C, K)`` and ``dtype``; None where none was metered."""
    name = str(dtype).replace("torch.", "")
    return MODELLED_H100.get((backend, *(int(s) for s in shape), name))
