"""The check both backends' ``tools/gpu_model.py --json`` tests share (test_cuda_sim.py, test_triton_meter.py):
run the tool, parse its one JSON object and hold it to the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KERNEL_KEYS = {"name", "launches", "bytes_loaded", "bytes_stored", "sectors", "ideal_sectors", "unique_bytes", "flops",
               "unit", "modelled_us"}
STEP_KEYS = {"compulsory_bytes", "unique_bytes", "flops", "modelled_us", "roofline_us", "launches", "launch_counts",
             "keeps_scores"}
LAUNCH_KEYS = {"kernels", "gemms", "aten", "total", "units", "per_unit", "fixed", "linear"}
CITYSCAPES_GEMM_FLOPS = 2 * 65536 * 720 * 190  # one GEMM of the cityscapes size: 2 N D CK


def run_gpu_model_json(backend: str, size: str = "cityscapes", dtype: str = "fp32", **env) -> dict:
    """``tools/gpu_model.py --backend BACKEND --size SIZE --dtype DTYPE --json``, checked: exit status 0, one
    object ``{"kernels", "step"}``, every kernel with the kernel keys, the step with the step keys, and the
    step's modelled time the sum of its kernels'. Returns the object."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_model.py"), "--backend", backend, "--size", size,
                        "--dtype", dtype, "--json"], capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert set(out) == {"kernels", "step"}
    assert out["kernels"] and all(set(k) == KERNEL_KEYS for k in out["kernels"])
    step = out["step"]
    assert set(step) == STEP_KEYS and isinstance(step["keeps_scores"], bool)
    assert abs(step["modelled_us"] - sum(k["modelled_us"] for k in out["kernels"])) < 1e-6 * step["modelled_us"]
    lc = step["launch_counts"]
    assert set(lc) == LAUNCH_KEYS and lc["linear"] and lc["total"] == step["launches"]
    assert lc["total"] == lc["kernels"] + lc["gemms"] + lc["aten"]
    for key in ("kernels", "gemms", "aten", "total"):  # fixed + per tile (chunk) x the size's tiles
        assert abs(lc[key] - (lc["fixed"][key] + lc["per_unit"][key] * lc["units"])) <= 0.5, (key, lc)
    return out


def per_unit_launches(out) -> dict:
    """The launches per tile (cuda) or chunk (triton) of a run_gpu_model_json result."""
    return out["step"]["launch_counts"]["per_unit"]
