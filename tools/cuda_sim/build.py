"""Compile the project's CUDA kernels (csrc/cuda/*.cu) for the cuda_sim CPU emulator.

``load(root)`` rewrites the .cu sources of the checkout at ``root`` and
compiles them as C++ against tools/cuda_sim/include/cuda_sim.h, then loads
the library: its ops are ``torch.ops.protoseg_cudasim.*`` with the schemas of
csrc/protoseg.cpp, running the CUDA kernels on CPU tensors. The library is
cached by a hash of every input (sources, emulator, compiler, torch), under
``$PROTOSEG_SIM_CACHE``, else ``ROOT/build/cuda_sim``, else
``~/.cache/protoseg_ext/cuda_sim``.

What the rewrite changes (line numbers are kept, and ``#line`` maps every
message back to the original file):
  - ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
    ``cudasim::launch("kernel", __FILE__, __LINE__, LaunchConfig(grid, block,
    smem, stream), kernel, args)``;
  - in ``__global__`` and ``__device__`` functions, pointers become
    ``cudasim::gptr<T>`` (bounds-checked, and every access noted for the race
    checker of runtime.cpp), ``__shared__`` arrays come from the block's
    shared memory (``__shared__ T a[n][m]`` a ``gptr<T[m]>``: every index
    checked; a scalar ``__shared__ T x`` a one-entry array, each later use
    of ``x`` in the function a checked ``*x``), and ``__launch_bounds__(n,
    ...)`` checks the block size;
  - local arrays ``T a[n]`` become ``cudasim::local_array<T, n>`` (every
    index checked, entries poisoned);
  - ``t.data_ptr<T>()`` in host code registers t's storage and the extent of
    the view t (the extent its pointer carries into a kernel), and
    ``at::empty`` / ``empty_like`` / ``empty_strided`` / ``t.new_empty`` there,
    and in the headers of csrc/, return poisoned memory (cuda_sim.h:
    ``PROTOSEG_SIM_POISON``);
  - ``at::mm_out`` / ``at::mm`` / ``at::mv`` in host code go through the
    traffic meter, and ``at::mm_out(out, a, b, at::kFloat)`` (the 16-bit GEMM
    with fp32 output, no CPU kernel in ATen) runs as an fp32 GEMM of the
    upcast operands;
  - ``TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m)`` registers for CPU tensors
    in the namespace ``protoseg_cudasim``, whose schemas come from
    ``TORCH_LIBRARY(protoseg_ext, m)`` of csrc/protoseg.cpp.
The library is compiled with ``-g1``: a race report names source lines from
its line table (``addr2line``).
Everything else, the host code around the launches included, is compiled
as written (its ATen calls, the GEMMs among them, run on the CPU tensors).
tools/cuda_sim/selftest.cu, the emulator's own check kernels, goes through
the same rewrite into the same library.

Device code that the rewrite does not cover fails to compile rather than run
unchecked: a pointer reinterpreted as another type (``reinterpret_cast<const
float4*>(p)`` on a checked pointer; use ``p.raw()`` under ``#ifdef CUDASIM``
or load element by element), cooperative groups, WMMA fragments, inline PTX.

Command line: ``python tools/cuda_sim/build.py [ROOT]`` builds (or finds) the
library and prints its path; ``--mutate FILE:LINE`` is for the mutation check
(see tests/test_cuda_sim.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMESPACE = "protoseg_cudasim"
LIB_NAME = "libprotoseg_cudasim.so"

# --------------------------------------------------------------------------- rewrite

_BUILTIN_TYPES = {
    "float", "double", "int", "unsigned", "long", "short", "char", "bool", "void", "size_t", "ptrdiff_t",
    "Half", "BFloat16", "half", "__half", "__nv_bfloat16", "__half2", "__nv_bfloat162",
    "float2", "float3", "float4", "double2", "int2", "int4", "uint2", "uint4", "longlong2",
}
_TYPE = (
    r"(?:const\s+)?(?:unsigned\s+long\s+long|unsigned\s+int|unsigned\s+char|long\s+long|"
    r"(?:[A-Za-z_]\w*::)*[A-Za-z_]\w*(?:<[^<>;(){}]*>)?)(?:\s+const)?"
)
_POINTER_DECL = re.compile(r"(?<![\w:.>])(" + _TYPE + r")\s*\*\s*(?:__restrict__\s*)?(?=[A-Za-z_]\w*\s*(?:[,)=;]))")
_SHARED = re.compile(r"(?<!extern )__shared__\s+(?:__align__\(\d+\)\s*)?(" + _TYPE + r")\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s*)?(" + _TYPE + r")\s+(\w+)\s*\[\s*\]\s*;")
_LOCAL_ARRAY = re.compile(r"(?<![\w:.>])(" + _TYPE + r")\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\])+)\s*(=\s*\{[^;{}]*\})?\s*;")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DATA_PTR = re.compile(r"(?<![\w.>])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\.|->)(data_ptr|const_data_ptr|mutable_data_ptr)<")
_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*protoseg_ext\s*,\s*CUDA\s*,\s*(\w+)\s*\)")


def _blank_comments_and_strings(src: str) -> str:
    """src with comments and string/char literals replaced by spaces (same length, same newlines)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * (j - i - 2) + c if j - i >= 2 else c)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _device_spans(code: str):
    """(start, body_open, end) of every __global__/__device__ function with a body (code: comments blanked)."""
    spans = []
    pos = 0
    for m in re.finditer(r"\b__(?:global|device)__\b", code):
        if m.start() < pos:
            continue
        i, depth = m.end(), 0
        while i < len(code):
            ch = code[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif depth == 0 and ch in ";{":
                break
            i += 1
        if i >= len(code) or code[i] == ";":
            continue  # a declaration without a body
        open_at, depth = i, 0
        while i < len(code):
            if code[i] == "{":
                depth += 1
            elif code[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        # the template header and return type before the marker belong to it too
        spans.append((m.start(), open_at, i + 1))
        pos = i + 1
    return spans


def _type_names(src: str) -> set:
    names = set(_BUILTIN_TYPES)
    names |= set(re.findall(r"\b(?:typename|class|struct)\s+([A-Za-z_]\w*)", src))
    names |= set(re.findall(r"\b(\w+_t)\b", src))
    return names


def _base_type_name(t: str) -> str:
    t = re.sub(r"<.*>", "", t)
    t = re.sub(r"\bconst\b", "", t).strip()
    return t.split("::")[-1].split()[-1]


def rewrite_device_code(text: str, types: set) -> str:
    """Pointers -> gptr, __shared__ -> block shared memory, in one device function's text."""

    def ptr(m):
        t = m.group(1)
        if _base_type_name(t) not in types:
            return m.group(0)
        return f"::cudasim::gptr<{t}> "

    text = _POINTER_DECL.sub(ptr, text)
    text = _EXTERN_SHARED.sub(lambda m: f"::cudasim::gptr<{m.group(1)}> {m.group(2)} = ::cudasim::shared_dynamic<{m.group(1)}>();", text)
    scalars = []

    def shared(m):
        t, name, dims = m.group(1), m.group(2), re.findall(r"\[([^\]]+)\]", m.group(3))
        if not dims:  # a scalar: a checked pointer to one entry, every later use of the name dereferences it
            scalars.append((name, m.start()))
            return (f"::cudasim::gptr<{t}> {name}__cudasim_shared = "
                    f'::cudasim::shared_array<{t}>(CUDASIM_TAG, 1, "{name}");')
        # an array: a bounds-checked pointer to its first row (decays like the array)
        inner = "".join(f"[{d}]" for d in dims[1:])
        return (f"::cudasim::gptr<{t}{inner}> {name} = "
                f'::cudasim::shared_array<{t}{inner}>(CUDASIM_TAG, {dims[0]}, "{name}");')

    text = _SHARED.sub(shared, text)
    for name, _ in scalars:  # uses after the declaration (the rewritten one ends with `;`)
        decl = text.index(f"{name}__cudasim_shared = ")
        end = text.index(";", decl) + 1
        text = text[:end] + re.sub(rf"(?<![\w.>:])\b{name}\b", f"(*{name}__cudasim_shared)", text[end:])

    def local(m):
        t, name, dims = m.group(1), m.group(2), re.findall(r"\[([^\]]+)\]", m.group(3))
        if _base_type_name(t) not in types or t.split()[0] in ("return", "else", "case", "goto"):
            return m.group(0)
        ty = t
        for d in reversed(dims):
            ty = f"::cudasim::local_array<{ty}, {d}>"
        init = f', {m.group(4).split("=", 1)[1].strip()}' if m.group(4) else ""
        return f'{ty} {name}("{name}"{init});'

    text = _LOCAL_ARRAY.sub(local, text)
    return text


def rewrite_cuda_source(src: str, relpath: str) -> str:
    """The emulator's version of one .cu/.cuh file (same line numbers)."""
    code = _blank_comments_and_strings(src)
    types = _type_names(code)
    pieces, last = [], 0
    for start, open_at, end in _device_spans(code):
        pieces.append(src[last:start])
        head, body = src[start:open_at + 1], src[open_at + 1:end]
        lb = re.search(r"__launch_bounds__\(\s*([^,()]+)", head)
        check = ""
        if lb and "__global__" in head:
            plain = re.sub(r"__launch_bounds__\([^()]*\)", "", code[start:open_at])
            name = re.search(r"__global__\s+void\s+(\w+)\s*\(", plain)
            kname = name.group(1) if name else "kernel"
            check = f' ::cudasim::check_launch_bounds({lb.group(1).strip()}, "{kname}");'
        pieces.append(rewrite_device_code(head, types) + check + rewrite_device_code(body, types))
        last = end
    pieces.append(src[last:])
    out = "".join(pieces)

    def launch(m):
        name = re.sub(r"\s+", " ", m.group(1)).strip()
        after = out[m.end():].lstrip()
        sep = "" if after.startswith(")") else ", "
        return f'::cudasim::launch("{name}", __FILE__, __LINE__, ::cudasim::LaunchConfig({m.group(2)}), {m.group(1)}{sep}'

    n_launch = out.count("<<<")
    out, n = _LAUNCH.subn(launch, out)
    if n != n_launch:
        raise RuntimeError(f"cuda_sim: {relpath}: rewrote {n} of {n_launch} kernel launches")
    out = _DATA_PTR.sub(
        lambda m: f'::cudasim::track({"*" if m.group(2) == "->" else ""}{m.group(1)}, "{m.group(1)}").{m.group(3)}<',
        out)
    out = poison_fresh_memory(out)
    out = re.sub(r"(?<![\w:])at::(mm_out|mm|mv)\(", r"::cudasim::\1(", out)
    out = _IMPL.sub(lambda m: f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, {m.group(1)})", out)
    return f'#line 1 "{relpath}"\n' + out


_NEW_EMPTY = re.compile(r"(?<![\w.>])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\.|->)new_empty\(")


def poison_fresh_memory(src: str) -> str:
    """at::empty / empty_like / empty_strided and t.new_empty -> the emulator's poisoned versions."""
    src = re.sub(r"(?<![\w:])at::(empty|empty_like|empty_strided)\(", r"::cudasim::\1(", src)
    return _NEW_EMPTY.sub(lambda m: f'::cudasim::new_empty({"*" if m.group(2) == "->" else ""}{m.group(1)}, ', src)


def schema_source(protoseg_cpp: str) -> str:
    """The TORCH_LIBRARY block of csrc/protoseg.cpp, for the namespace protoseg_cudasim."""
    m = re.search(r"TORCH_LIBRARY\(\s*protoseg_ext\s*,\s*(\w+)\s*\)\s*\{", protoseg_cpp)
    if not m:
        raise RuntimeError("cuda_sim: csrc/protoseg.cpp has no TORCH_LIBRARY(protoseg_ext, m) block")
    code = _blank_comments_and_strings(protoseg_cpp)
    i, depth = m.end() - 1, 0
    while True:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            break
        i += 1
    line = protoseg_cpp.count("\n", 0, m.start()) + 1
    block = protoseg_cpp[m.start():i + 1].replace(m.group(0), f"TORCH_LIBRARY({NAMESPACE}, {m.group(1)}) {{", 1)
    return f'#include <torch/library.h>\n#line {line} "csrc/protoseg.cpp"\n{block}\n'


# --------------------------------------------------------------------------- build


def _inputs(root: Path):
    """(relative path, text) of every file the library depends on."""
    files = []
    csrc = root / "csrc"
    for p in sorted(csrc.glob("*.h")) + [csrc / "protoseg.cpp"] + sorted((csrc / "cuda").glob("*.cu*")):
        if p.name == "build_info.h":
            continue
        files.append((str(p.relative_to(root)), p.read_text()))
    for p in sorted(HERE.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cpp", ".cu", ".py"):
            files.append(("tools/cuda_sim/" + str(p.relative_to(HERE)), p.read_text()))
    return files


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def _flags():
    import torch
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    inc = [f"-I{HERE / 'include'}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    cflags = ["-std=c++20", "-O1", "-fPIC", "-g1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DCUDASIM=1",
              "-Wno-unused-variable", "-Wno-unused-function"] + inc
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    ldflags = ["-shared", f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"]
    return cflags, ldflags


def _cache_dir(root: Path) -> Path:
    env = os.environ.get("PROTOSEG_SIM_CACHE")
    candidates = ([Path(env)] if env else []) + [root / "build" / "cuda_sim",
                                                  Path.home() / ".cache" / "protoseg_ext" / "cuda_sim"]
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
            if os.access(c, os.W_OK):
                return c
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="cuda_sim_"))


def build_key(root: Path, mutate=None) -> str:
    import torch

    h = hashlib.sha256()
    for rel, text in _inputs(root):
        h.update(rel.encode() + b"\0" + text.encode() + b"\0")
    cflags, ldflags = _flags()
    cc = subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout
    h.update(" ".join([torch.__version__, cc, *cflags, *ldflags, repr(mutate)]).encode())
    return h.hexdigest()[:20]


def _write_sources(root: Path, dst: Path, mutate=None):
    """Rewritten sources under dst; returns the translation units to compile."""
    (dst / "csrc" / "cuda").mkdir(parents=True)
    for p in (root / "csrc").glob("*.h"):  # headers: fresh memory poisoned too
        (dst / "csrc" / p.name).write_text(poison_fresh_memory(p.read_text()))
    if not (dst / "csrc" / "build_info.h").exists():
        (dst / "csrc" / "build_info.h").write_text("#pragma once\n")
    units = []
    for p in sorted((root / "csrc" / "cuda").glob("*.cu*")):
        rel = str(p.relative_to(root))
        src = p.read_text()
        if mutate is not None:
            src = mutate(rel, src)
        (dst / rel).write_text(rewrite_cuda_source(src, rel))
        if p.suffix == ".cu":
            units.append(dst / rel)
    (dst / "schemas.cpp").write_text(schema_source((root / "csrc" / "protoseg.cpp").read_text()))
    units.append(dst / "schemas.cpp")
    shutil.copy(HERE / "runtime.cpp", dst / "cuda_sim_runtime.cpp")
    units.append(dst / "cuda_sim_runtime.cpp")
    # the emulator's own checks (tests/test_cuda_sim.py), through the same rewrite
    (dst / "cuda_sim_selftest.cu").write_text(
        rewrite_cuda_source((HERE / "selftest.cu").read_text(), "tools/cuda_sim/selftest.cu"))
    units.append(dst / "cuda_sim_selftest.cu")
    return units


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(root=None, *, mutate=None, tag="", only=None, verbose=False) -> Path:
    """Path of the emulator library for the checkout at root (built if not cached).

    ``mutate(relpath, text) -> text`` edits a .cu source before the rewrite
    (the mutation checks); ``tag`` names such a variant in the cache key;
    ``only`` (file names, e.g. ``["sinkhorn_cuda.cu"]``) limits the library
    to those kernels' files.
    """
    root = Path(root or HERE.parents[1]).resolve()
    key = build_key(root, mutate=(tag if mutate else None, only))
    cache = _cache_dir(root)
    out = cache / key / LIB_NAME
    if out.exists():
        return out
    with _lock(cache / f"{key}.lock"):
        if out.exists():
            return out
        t0 = time.time()
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache))
        try:
            units = _write_sources(root, work / "src", mutate)
            cflags, ldflags = _flags()
            cc = _compiler()
            inc = [f"-I{work / 'src' / 'csrc'}", "-include", "cuda_sim.h"]

            if only is not None:
                keep = ("schemas.cpp", "cuda_sim_runtime.cpp", "cuda_sim_selftest.cu")
                units = [u for u in units if u.name in only or u.name in keep]
            headers = "".join(p.read_text() for p in sorted((work / "src").rglob("*")) if p.suffix in (".h", ".cuh"))
            headers += "".join(p.read_text() for p in sorted((HERE / "include").rglob("*.h")))
            objdir = cache / "obj"
            objdir.mkdir(exist_ok=True)

            def compile_one(u):
                # objects are cached too: a variant (a mutation check) recompiles only what it changed
                h = hashlib.sha256((u.read_text() + headers + " ".join(cflags)).encode()).hexdigest()[:20]
                obj = objdir / f"{u.stem}-{h}.o"
                if obj.exists():
                    obj.touch()  # recently used: kept by _prune
                    return obj
                tmp = work / (u.name + ".o")
                cmd = [cc, "-x", "c++", *cflags, *inc, "-c", str(u), "-o", str(tmp)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"cuda_sim: compiling {u.name} failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
                os.replace(tmp, obj)
                return obj

            jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
            with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
                objs = list(ex.map(compile_one, units))
            lib = work / LIB_NAME
            r = subprocess.run([cc, *map(str, objs), *ldflags, "-o", str(lib)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cuda_sim: linking failed:\n{r.stderr[-8000:]}")
            (cache / key).mkdir(exist_ok=True)
            os.replace(lib, out)
            _prune(cache)
            if verbose:
                print(f"cuda_sim: built {out} in {time.time() - t0:.0f} s", file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _prune(cache: Path, keep_libs=6, keep_objs=48):
    """Drop the oldest libraries and objects of the cache (each edit of csrc/cuda makes new ones)."""
    libs = sorted((d for d in cache.iterdir() if d.is_dir() and (d / LIB_NAME).exists()),
                  key=lambda d: (d / LIB_NAME).stat().st_mtime, reverse=True)
    for d in libs[keep_libs:]:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            (cache / f"{d.name}.lock").unlink()
    objs = sorted((cache / "obj").glob("*.o"), key=lambda p: p.stat().st_mtime, reverse=True)
    for o in objs[keep_objs:]:
        with contextlib.suppress(OSError):
            o.unlink()


_loaded = {}


def load(root=None, **kw):
    """Build (if needed) and load the emulator library; returns ``torch.ops.protoseg_cudasim``."""
    import torch

    path = build(root, **kw)
    if str(path) not in _loaded:
        if _loaded:
            raise RuntimeError("cuda_sim: a different emulator library is already loaded in this process")
        torch.ops.load_library(str(path))
        _loaded[str(path)] = True
    return getattr(torch.ops, NAMESPACE)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(build(args[0] if args else None, verbose=True))
