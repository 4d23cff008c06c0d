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
    """One metered step: the modelled time and the step's roofline (us), and the commit it was metered at."""

    step_us: float
    roofline_us: float
    commit: str


# (backend, N, D, C, K, dtype name) -> Modelled. The meter's maps are (2, D, 128, 256)
# at N = 65,536, (1, 720, 1024, 2048) at full resolution.
MODELLED_H100: dict = {
    ("cuda", 65536, 720, 19, 10, "bfloat16"): Modelled(508.0, 120.0, "2e7f78d"),
    ("cuda", 65536, 720, 19, 10, "float32"): Modelled(1127.0, 835.0, "3603d15"),
    ("cuda", 65536, 720, 150, 10, "bfloat16"): Modelled(2239.0, 432.0, "3603d15"),
    ("cuda", 2097152, 720, 19, 10, "bfloat16"): Modelled(18200.0, 3800.0, "3603d15"),
    ("triton", 65536, 720, 19, 10, "bfloat16"): Modelled(661.0, 120.0, "2e7f78d"),
    ("triton", 65536, 720, 19, 10, "float32"): Modelled(1413.0, 835.0, "3603d15"),
    ("triton", 65536, 720, 150, 10, "bfloat16"): Modelled(4089.0, 432.0, "3603d15"),
}


def modelled_step(backend: str, shape: Tuple[int, int, int, int], dtype) -> Optional[Modelled]:
    """The metered step of ``backend`` at ``shape = (N, D, C, K)`` and ``dtype``; None where none was metered."""
    name = str(dtype).replace("torch.", "")
    return MODELLED_H100.get((backend, *(int(s) for s in shape), name))
