"""``python -m protoseg_ext.info``: what was built, and which backends can run here and why not."""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import List, Optional, Tuple

import torch


def build_info() -> dict:
    """Build metadata of the compiled library (empty values when it did not load)."""
    from . import ops

    ext = ops.load_extension()
    info = {
        "protoseg_ext": None,
        "torch (running)": torch.__version__,
        "torch (built against)": None,
        "CUDA (built against)": None,
        "CUDA arch list": None,
        "compiled backends": [],
        "CPU kernels (ISA)": None,
        "compiled library error": ops.extension_error(),
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


# TORCH_CUDA_ARCH_LIST names (torch.utils.cpp_extension) and the capabilities they stand for
_NAMED_ARCHS = {
    "kepler": ["3.5+PTX"], "maxwell": ["5.0", "5.2+PTX"], "pascal": ["6.0", "6.1+PTX"], "volta": ["7.0+PTX"],
    "turing": ["7.5+PTX"], "ampere": ["8.0", "8.6+PTX"], "ada": ["8.9+PTX"], "hopper": ["9.0+PTX"],
}


def parse_arch_list(arch_list: str) -> List[Tuple[int, int, bool, bool]]:
    """``(major, minor, ptx, arch_specific)`` of each entry of a TORCH_CUDA_ARCH_LIST string.

    ``"8.0;9.0+PTX"`` gives ``[(8, 0, False, False), (9, 0, True, False)]``;
    ``"9.0a"`` is arch-specific (runs on 9.0 only). Unknown entries are skipped.
    """
    out = []
    for tok in re.split(r"[;\s,]+", arch_list.strip()):
        if not tok:
            continue
        for t in _NAMED_ARCHS.get(tok.lower(), [tok]):
            m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", t, flags=re.IGNORECASE)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), bool(m.group(4)), m.group(3).lower() == "a"))
    return out


def arch_covers(capability: Tuple[int, int], arch_list: str) -> Optional[bool]:
    """Whether a build for ``arch_list`` has code a GPU of ``capability`` runs.

    A cubin for X.Y runs on X.Z with Z >= Y (same major); PTX for X.Y is
    compiled by the driver for any newer GPU. None when the list says nothing
    we can read (empty, or unknown names).
    """
    entries = parse_arch_list(arch_list)
    if not entries:
        return None
    major, minor = capability
    for ma, mi, ptx, specific in entries:
        if specific:
            if (ma, mi) == (major, minor):
                return True
            continue
        if ma == major and mi <= minor:
            return True
        if ptx and (ma, mi) <= (major, minor):
            return True
    return False


def gpu_coverage(capabilities=None, arch_list=None, names=None) -> Optional[str]:
    """A plain statement if a GPU here is not covered by the build's CUDA arch list, else None.

    ``capabilities``: ``[(major, minor), ...]`` (default: every visible GPU);
    ``arch_list``: the TORCH_CUDA_ARCH_LIST the library was built with
    (default: the built library's); ``names``: the GPUs' names, for the
    message. None also when there is no GPU, no CUDA build or no readable list.
    """
    if capabilities is None:
        if not torch.cuda.is_available():
            return None
        n = torch.cuda.device_count()
        capabilities = [torch.cuda.get_device_capability(i) for i in range(n)]
        names = [torch.cuda.get_device_name(i) for i in range(n)]
    if arch_list is None:
        from . import ops

        ext = ops.load_extension()
        if ext is None or not ext.WITH_CUDA:
            return None
        arch_list = ext.BUILD_CUDA_ARCH_LIST
    names = list(names) if names is not None else [f"GPU {i}" for i in range(len(capabilities))]
    missing = []
    for i, cap in enumerate(capabilities):
        if arch_covers(tuple(cap), arch_list or "") is False:
            missing.append(f"{names[i]} (cuda:{i}, compute capability {cap[0]}.{cap[1]})")
    if not missing:
        return None
    caps = ";".join(sorted({f"{c[0]}.{c[1]}" for c in capabilities}))
    return (
        f"the CUDA kernels were built for TORCH_CUDA_ARCH_LIST='{arch_list}', which does not cover "
        f"{', '.join(missing)}: the cuda backend cannot run there ('no kernel image is available'). "
        f"Rebuild on this machine with TORCH_CUDA_ARCH_LIST unset (bash scripts/run.sh setup builds for the GPUs "
        f"it finds) or set to '{caps}', or add '+PTX' to the newest entry."
    )


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
    coverage = gpu_coverage()
    if coverage:
        print(f"  {'GPU coverage':24s} NOT COVERED: {coverage}")
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
