#!/usr/bin/env python
"""Registers and spills of every CUDA kernel of protoseg_ext, per architecture.

Compiles each ``csrc/cuda/*.cu`` with one nvcc invocation (device code only,
``--fatbin``, one ``-gencode`` per architecture, ``-Xptxas -v``) using the same
include paths and flags as the extension build, parses ptxas's report and
prints a table: kernel, architecture, registers, stack, spill stores and
loads, shared memory.

A kernel whose comment block contains ``Hot kernel: must not spill`` is hot;
the script exits 1 if a hot kernel spills (``--strict``: if any kernel does),
2 if a file does not compile, else 0.

Architectures: ``--arch``, else ``TORCH_CUDA_ARCH_LIST``, else ``9.0``
(entries separated by ``;``, ``,`` or spaces; ``+PTX`` is ignored here).
nvcc: ``--nvcc``, else ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH.

    CUDA_HOME=/usr/local/cuda python tools/ptxas_report.py --arch "8.0;9.0"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HOT_MARK = "hot kernel: must not spill"


@dataclass
class KernelUsage:
    file: str
    arch: str
    mangled: str
    name: str = ""
    registers: Optional[int] = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    hot: bool = False

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class FileResult:
    file: str
    ok: bool
    seconds: float
    kernels: List[KernelUsage] = field(default_factory=list)
    error: str = ""


def parse_arch_list(text: str) -> List[str]:
    """'8.0;9.0+PTX' -> ['80', '90']."""
    out = []
    for item in re.split(r"[;,\s]+", text.strip()):
        item = item.strip().upper().replace("+PTX", "")
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([AF]?)", item)
        if not m:
            raise SystemExit(f"ptxas_report: cannot read architecture {item!r} (expected e.g. 9.0 or 9.0a)")
        code = m.group(1) + m.group(2) + m.group(3).lower()
        if code not in out:
            out.append(code)
    if not out:
        raise SystemExit("ptxas_report: empty architecture list")
    return out


def find_nvcc(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        raise SystemExit("ptxas_report: nvcc not found (set CUDA_HOME or pass --nvcc)")
    return found


def build_flags(archs: List[str]) -> List[str]:
    """Include paths and defines of the extension build (torch.utils.cpp_extension)."""
    import torch
    from torch.utils import cpp_extension

    flags = []
    for path in cpp_extension.include_paths(device_type="cuda") + [CSRC, sysconfig.get_paths()["include"]]:
        flags += ["-I", path]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"]
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str, file: str) -> List[KernelUsage]:
    """Kernels (entry functions) of a ptxas -v report, one per (kernel, arch)."""
    kernels: Dict[Tuple[str, str], KernelUsage] = {}
    frames: Dict[Tuple[str, str], Tuple[int, int, int]] = {}
    entry: Optional[Tuple[str, str]] = None
    props: Optional[str] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry = (m.group(1), m.group(2).replace("sm_", ""))
            kernels.setdefault(entry, KernelUsage(file=file, arch=entry[1], mangled=entry[0]))
            props = None
            continue
        m = _PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props is not None and entry is not None:
            frames[(props, entry[1])] = tuple(int(x) for x in m.groups())
            props = None
            continue
        m = _USED.search(line)
        if m and entry is not None:
            k = kernels[entry]
            k.registers = int(m.group(1))
            s = _SMEM.search(m.group(2))
            k.smem = int(s.group(1)) if s else 0
    for key, k in kernels.items():
        if key in frames:
            k.stack, k.spill_stores, k.spill_loads = frames[key]
    return list(kernels.values())


def demangle(names: List[str]) -> Dict[str, str]:
    """Mangled -> short readable name (no namespaces, no parameter list)."""
    out = {n: n for n in names}
    tool = shutil.which("c++filt")
    if tool and names:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0:
            for n, d in zip(names, res.stdout.splitlines()):
                out[n] = d
    for n, d in out.items():
        d = re.sub(r"^void ", "", d)
        d = d.replace("(anonymous namespace)::", "").replace("protoseg::cuda::", "").replace("protoseg::", "")
        d = d.replace("c10::", "")
        depth, cut = 0, len(d)  # drop the parameter list: the first '(' outside template brackets
        for i, ch in enumerate(d):
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        out[n] = d[:cut]
    return out


def hot_kernels(source: str) -> List[str]:
    """Names of the kernels whose comment block says 'Hot kernel: must not spill'."""
    hot = []
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if "__global__" not in line:
            continue
        decl = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", " ".join(lines[i : i + 3]).split("__global__", 1)[1])
        m = re.search(r"\bvoid\s+(\w+)\s*\(", decl)
        if not m:
            continue
        name = m.group(1)
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("template"):
            j -= 1
        comment = []
        while j >= 0 and lines[j].strip().startswith("//"):
            comment.append(lines[j])
            j -= 1
        if HOT_MARK in " ".join(comment).lower():
            hot.append(name)
    return hot


def compile_file(nvcc: str, path: str, flags: List[str], verbose: bool) -> FileResult:
    rel = os.path.relpath(path, ROOT)
    with tempfile.TemporaryDirectory(prefix="ptxas_report_") as tmp:
        cmd = [nvcc, *flags, "--fatbin", path, "-o", os.path.join(tmp, "out.fatbin")]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.time() - t0
    text = res.stdout + res.stderr
    if res.returncode != 0:
        errors = [l for l in text.splitlines() if "error" in l.lower()]
        return FileResult(rel, False, secs, error="\n".join(errors[:20]) or text[-4000:])
    kernels = parse_ptxas(text, rel)
    names = demangle([k.mangled for k in kernels])
    hot = hot_kernels(open(path).read())
    for k in kernels:
        k.name = names[k.mangled]
        base = k.name.split("<", 1)[0]
        k.hot = base in hot
    kernels.sort(key=lambda k: (k.name, k.arch))
    return FileResult(rel, True, secs, kernels)


def print_table(results: List[FileResult]) -> None:
    header = ("kernel", "arch", "regs", "stack", "spill st", "spill ld", "smem", "")
    body = {
        r.file: [
            (
                k.name,
                f"sm_{k.arch}",
                str(k.registers),
                str(k.stack),
                str(k.spill_stores),
                str(k.spill_loads),
                str(k.smem),
                " ".join(x for x in ("hot" if k.hot else "", "SPILLS" if k.spills else "") if x),
            )
            for k in r.kernels
        ]
        for r in results
    }
    rows = [header] + [row for rs in body.values() for row in rs]
    width = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def fmt(row):
        cells = [row[0].ljust(width[0])] + [c.rjust(width[i]) for i, c in enumerate(row[1:-1], 1)] + [row[-1]]
        return "  ".join(cells).rstrip()

    print(fmt(header))
    print("  ".join("-" * w for w in width[:-1]))
    for file, rs in body.items():
        print(f"{file}:")
        for row in rs:
            print(fmt(row))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", help="architectures, e.g. '8.0;9.0' (default: TORCH_CUDA_ARCH_LIST or 9.0)")
    ap.add_argument("--nvcc", help="path of nvcc (default: $CUDA_HOME/bin/nvcc)")
    ap.add_argument("--strict", action="store_true", help="fail if any kernel spills, not only hot ones")
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the nvcc command lines")
    ap.add_argument("files", nargs="*", help="the .cu files (default: csrc/cuda/*.cu)")
    args = ap.parse_args(argv)

    archs = parse_arch_list(args.arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0")
    nvcc = find_nvcc(args.nvcc)
    files = args.files or sorted(
        os.path.join(CSRC, "cuda", f) for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cu")
    )
    flags = build_flags(archs)
    print(f"ptxas report: {len(files)} file(s), arch {', '.join('sm_' + a for a in archs)}, nvcc {nvcc}")
    results = []
    for path in files:
        r = compile_file(nvcc, os.path.abspath(path), flags, args.verbose)
        state = f"{len(r.kernels)} kernels" if r.ok else "FAILED"
        print(f"   {r.file}: {state} ({r.seconds:.0f} s)", flush=True)
        results.append(r)
    print()
    print_table([r for r in results if r.ok])

    status = 0
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\nERROR: {r.file} does not compile:\n{r.error}", file=sys.stderr)
    kernels = [k for r in results for k in r.kernels]
    bad = [k for k in kernels if k.spills and (k.hot or args.strict)]
    for k in bad:
        print(
            f"ERROR: {'hot ' if k.hot else ''}kernel {k.name} spills on sm_{k.arch} "
            f"({k.spill_stores} B stores, {k.spill_loads} B loads)",
            file=sys.stderr,
        )
    hot_names = sorted({k.name.split("<", 1)[0] for k in kernels if k.hot})
    print(f"\nhot kernels (must not spill): {', '.join(hot_names) or 'none marked'}")
    spilling = sum(k.spills for k in kernels)
    print(f"{len(kernels)} kernel instances, {spilling} spilling, {len(failed)} file(s) failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(k) for k in kernels], f, indent=1)
    if failed:
        status = 2
    elif bad:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
