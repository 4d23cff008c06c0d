"""``python -m protoseg_ext.info``: what was built, and which backends can run here and why not."""

from __future__ import annotations

import os
import platform
import sys

import torch


def build_info() -> dict:
    """Build metadata of the compiled library (empty values when it did not load)."""
    from . import backends

    ext = backends.load_extension()
    info = {
        "protoseg_ext": None,
        "torch (running)": torch.__version__,
        "torch (built against)": None,
        "CUDA (built against)": None,
        "CUDA arch list": None,
        "compiled backends": [],
        "CPU kernels (ISA)": None,
        "compiled library error": backends._ext_error,
    }
    from . import __version__

    info["protoseg_ext"] = __version__
    if ext is not None:
        info["torch (built against)"] = ext.BUILD_TORCH_VERSION
        info["CUDA (built against)"] = ext.BUILD_CUDA_VERSION or "none (CPU-only build)"
        info["CUDA arch list"] = ext.BUILD_CUDA_ARCH_LIST or "-"
        info["compiled backends"] = ["cpu"] + (["cuda"] if ext.WITH_CUDA else [])
        info["CPU kernels (ISA)"] = cpu_isa_report(ext)
    return info


def cpu_isa_report(ext) -> str:
    """Which instruction-set variant the CPU kernels run, which ones this CPU runs and which were built."""
    if not hasattr(ext, "cpu_isa"):
        return "baseline (a build without the variants)"
    try:
        isa = ext.cpu_isa()
    except (RuntimeError, ValueError) as e:  # PROTOSEG_CPU_ISA asks for one that cannot run
        return f"none: {e}"
    forced = os.environ.get("PROTOSEG_CPU_ISA", "auto") not in ("", "auto")
    how = "forced by PROTOSEG_CPU_ISA" if forced else "the best this CPU runs; PROTOSEG_CPU_ISA forces one"
    return (
        f"{isa} ({how}; built: {ext.CPU_ISA_BUILT.replace(',', ', ')}; runs here: {', '.join(ext.cpu_isa_supported())};"
        f" torch's own kernels: {torch.backends.cpu.get_cpu_capability()})"
    )


def backend_report() -> list:
    """``(name, available, reasons)`` for every backend on this machine's devices."""
    from . import backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in backends.BACKENDS:
        be = backends.get_backend(name)
        ok = [d for d in devices if not be.not_supported_reasons(torch.device(d))]
        # why not: asked on the device the backend is made for
        home = "cuda" if name == "cuda" or (name == "triton" and not be.interpreted()) else "cpu"
        reasons = [] if ok else be.not_supported_reasons(torch.device(home))
        rows.append((name, ok, reasons))
    return rows


def main() -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report below says the same, in full
        info = build_info()
        rows = backend_report()
    print("protoseg_ext build")
    for k, v in info.items():
        if k == "compiled library error" and v is None:
            continue
        print(f"  {k:24s} {', '.join(v) if isinstance(v, list) else v}")
    print(f"  {'python':24s} {sys.version.split()[0]} ({platform.machine()})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  {'GPU':24s} {gpu}")
    try:
        import triton

        print(f"  {'triton':24s} {triton.__version__}")
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"  {'triton':24s} not importable ({type(e).__name__})")
    print("\nbackends")
    for name, ok, reasons in rows:
        state = f"available on {', '.join(ok)}" if ok else "not available: " + "; ".join(reasons)
        print(f"  {name:10s} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
