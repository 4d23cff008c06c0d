"""Compile every Triton kernel of protoseg_ext.kernels for given GPU architectures, with no GPU,
and report each one's registers, spills and shared memory.

Run without TRITON_INTERPRET (the launchers then choose their GPU tile
sizes). The real launchers are called on ``meta`` tensors for a set of
problems; each kernel launch they make is recorded instead of run, turned into
a ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` call
with the same constexprs, the integer and 16-byte alignment specialisations
Triton's JIT would make, ``num_warps`` and ``num_stages``, and compiled to a
cubin. The PTX Triton produced is then
assembled again with ``ptxas -v`` (the ptxas Triton ships, Triton's own
flags) to read what the kernel costs on the chip: registers per thread, the
stack frame and the spill stores / loads, in bytes per thread.

Prints a first JSON line ``{"all_kernels": [...]}`` (every launched
``@triton.jit`` function of the kernel modules), then one per (kernel
specialisation, arch): ``{"kernel", "variant", "arch", "num_warps",
"num_stages", "tiles", "ok", "error", "shared", "registers", "stack", "spill_stores",
"spill_loads", "pipelined", "smem_buffers", "dot_operands", "seconds"}`` (``pipelined``: the
PTX copies operands with ``cp.async``; ``smem_buffers``: the depth of the
pipeliner's shared-memory ring, 2+ when the loop is software-pipelined;
``dot_operands``: the element types the kernel's MMAs multiply; ``tiles``: the
``BLOCK_*`` constexprs),
then a table of the same (lines not starting with ``{``). Exits 1 if a
kernel fails to compile or uses local memory (a spill or a stack frame).

Usage: python tests/compile_kernels.py [--full] 90 80
(default: every kernel and constexpr path in every dtype at the Cityscapes
size, the similarity kernels at ADE20K's C too, an odd tiny size for fp16 and
fp64, the embedding's kernels and the EMBED variants (kernels/embed.py): 94
specialisations per arch; ``--full``: every op in every dtype at the
three sizes and half features with float32 prototypes, about 200 per arch,
several minutes for both archs on 2 cores with a cold cache. CI runs ``--full``.)

``--write-doc docs/kernels.md`` (default set, both archs) also writes the
records as one Markdown table per arch, sorted, without timings: the measured
figures the kernels' comments leave out. ``--check-doc PATH`` compares them
with PATH and exits 1 on a difference; ``tests/test_triton_compile.py`` does
the same check with the records of its own compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from protoseg_ext.kernels import embed, labels, losses, prototype_update, similarity, sinkhorn  # noqa: E402

_PTR = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.uint8: "*u8",
}

RECORDED = []  # (kernel name, variant, JITFunction, args dict, compile options)
MODULES = (similarity, sinkhorn, prototype_update, embed, losses, labels)


def all_kernels():
    """``(module, name)`` of every launched ``@triton.jit`` function of the kernel modules.

    Device helpers (``_``-prefixed ``@triton.jit`` functions, called from
    kernels) are compiled inside each kernel that calls them.
    """
    return [(m, n) for m in MODULES for n, v in vars(m).items()
            if isinstance(v, triton.runtime.jit.JITFunction) and not n.startswith("_")]


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, variant):
        self.fn, self.variant = fn, variant

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            bound = dict(zip(self.fn.arg_names, args))
            bound.update(kwargs)
            options = {"num_warps": num_warps, "num_stages": num_stages}
            RECORDED.append((self.fn.__name__, self.variant[0], self.fn, bound, options))

        return launch


def _signature(fn, bound):
    """``(signature, constexprs, attrs)`` of a launch, as Triton's JIT specialises it.

    As the JIT does: an integer argument equal to 1 becomes a constexpr, an
    integer divisible by 16 and every tensor pointer (torch allocations are
    16-byte aligned) carry ``tt.divisibility = 16``, which is what lets the
    compiler vectorise loads and pipeline them with cp.async.
    """
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name, v = p.name, bound[p.name]
        if p.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = p.annotation_type or "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__}")
    return sig, constexprs, attrs


# (N, D, C, K): Cityscapes HRNet-W48 head; ADE20K-sized C; a tiny problem
# whose odd N and D leave the loads without any alignment to specialise on
CITYSCAPES, ADE20K, TINY = (65536, 720, 19, 10), (8192, 256, 150, 10), (1000, 33, 3, 1)
ALL_OPS = ("fwd", "fwd_seg", "fwd_own", "bwd", "bwd_seg", "sinkhorn", "sums", "ema", "losses", "labels")
SIMILARITY_OPS = ("fwd", "fwd_seg", "bwd", "bwd_seg")
# the head's embedding fused in (kernels/embed.py): the EMBED variants of the
# similarity kernels and the embedding's own kernels. "efwd" / "ebwd" /
# "esums": LayerNorm + L2 from an NCHW map (B, D, H, W); "efwd_own": the same,
# own only (the gathered own-class kernel); "efwd_seg": L2 only, seg only, from a channels-last map; "ebwd_seg":
# L2 only, seg only, from rows; "ebwd_stats", "ebwd_seg_stats", "esums_stats": "ebwd", "ebwd_seg" and "esums"
# given the forward's stats (5, N) (GIVEN_STATS); "efwd_cache", "ebwd_cache": "efwd" keeping S for the
# backward (KEEP_SCORES) and "ebwd_stats" given it (GIVEN_SCORES), the head's training step within cache_bytes;
# "efwd_cache_l2", "ebwd_cache_l2": the same, L2 only, from a channels-last map.
EMBED_OPS = ("efwd", "efwd_seg", "efwd_own", "ebwd", "ebwd_seg", "esums", "ebwd_stats", "ebwd_seg_stats",
             "esums_stats", "efwd_cache", "ebwd_cache", "efwd_cache_l2", "ebwd_cache_l2")

# The default set: every kernel and every constexpr path (forward outputs,
# backward gradients, Sinkhorn phases, deterministic and atomic sums, the
# float64 FMA backward) in every dtype at the Cityscapes size, whose tiles are
# the largest the launchers pick; the similarity kernels also at ADE20K's C
# (another class padding) in the GEMM dtype classes.
QUICK = [
    (CITYSCAPES, torch.bfloat16, ALL_OPS + EMBED_OPS),
    (CITYSCAPES, torch.float16, SIMILARITY_OPS + ("efwd", "ebwd", "ebwd_stats", "efwd_cache", "ebwd_cache")),
    (CITYSCAPES, torch.float32, ALL_OPS + EMBED_OPS),
    (CITYSCAPES, torch.float64, ALL_OPS + EMBED_OPS),
    (ADE20K, torch.bfloat16, SIMILARITY_OPS + ("efwd", "ebwd", "ebwd_stats", "efwd_cache", "ebwd_cache")),
    (ADE20K, torch.float32, SIMILARITY_OPS + ("efwd", "ebwd", "ebwd_stats", "efwd_cache", "ebwd_cache")),
    (TINY, torch.float16, ("fwd_seg", "bwd_seg")),
    (TINY, torch.float64, ("fwd", "bwd", "sinkhorn", "sums", "ema", "efwd", "ebwd", "efwd_cache", "ebwd_cache")),
]
FULL = [(pb, dt, ALL_OPS + EMBED_OPS) for pb in (CITYSCAPES, ADE20K, TINY)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
# mixed input dtypes (half features against float32 prototypes) take the float32 GEMM path
FULL += [(CITYSCAPES, (torch.bfloat16, torch.float32), SIMILARITY_OPS + ("efwd", "ebwd", "efwd_cache", "ebwd_cache")),
         (TINY, (torch.float16, torch.float32), SIMILARITY_OPS + ("efwd", "ebwd", "efwd_cache", "ebwd_cache"))]


def _map_shape(N: int):
    """``(B, H, W)`` of a feature map with N pixels: two images when N is even, rows of 256 when they fit."""
    B = 2 if N % 2 == 0 else 1
    HW = N // B
    W = 256 if HW % 256 == 0 else HW
    return B, HW // W, W


def _record_all(table):
    """Call every launcher of ``table`` on meta tensors, recording the kernel launches."""
    variant = [""]
    originals = {}
    for mod, n in all_kernels():
        originals[(mod, n)] = getattr(mod, n)
        setattr(mod, n, _Recorder(getattr(mod, n), variant))
    meta = dict(device="meta")
    try:
        for (N, D, C, K), dt, which in table:
            dt, pdt = dt if isinstance(dt, tuple) else (dt, dt)  # (feats, protos) dtypes
            name = str(dt).split(".")[-1] + ("" if pdt == dt else "_" + str(pdt).split(".")[-1] + "_protos")
            tag = f"N{N}_D{D}_C{C}_K{K}_{name}"
            acc = torch.float64 if dt == torch.float64 else torch.float32
            f = torch.empty(N, D, dtype=dt, **meta)
            p = torch.empty(C, K, D, dtype=pdt, **meta)
            lab = torch.empty(N, dtype=torch.int64, **meta)
            argk = torch.empty(N, C, dtype=torch.uint8, **meta)
            lse = torch.empty(N, dtype=acc, **meta)
            own = torch.empty(N, K, dtype=acc, **meta)
            gseg = torch.empty(N, C, dtype=dt, **meta)
            B, H, W = _map_shape(N)
            fmap = torch.empty(B, D, H, W, dtype=dt, **meta)
            fmap_cl = torch.empty(B, D, H, W, dtype=dt, memory_format=torch.channels_last, **meta)
            lnw, lnb = torch.empty(D, dtype=dt, **meta), torch.empty(D, dtype=dt, **meta)
            stats = torch.empty(5, N, dtype=acc, **meta)  # embed_similarity's
            scores = torch.empty(N, C * K, dtype=acc, **meta)  # its cache of S
            calls = {
                "fwd": lambda: similarity.similarity_forward(f, p, lab, 1.0, True, True, True),
                "fwd_seg": lambda: similarity.similarity_forward(f, p, lab, 1.0, True, False, False),
                "fwd_own": lambda: similarity.similarity_forward(f, p, lab, 1.0, False, False, True),
                "bwd": lambda: similarity.similarity_backward(gseg, lse, own, f, p, lab, argk, lse, 1.0),
                "bwd_seg": lambda: similarity.similarity_backward(gseg, None, None, f, p, lab, argk, lse, 1.0),
                "sinkhorn": lambda: sinkhorn.sinkhorn(own, lab, C, 3, 0.05),
                "sums": lambda: [prototype_update.prototype_sums(f, lab, C * K, deterministic=det)
                                 for det in (True, False)],
                "efwd": lambda: embed.embed_similarity_forward(fmap, lnw, lnb, 1e-5, p, lab, 1.0, True, True, True),
                "efwd_own": lambda: embed.embed_similarity_forward(fmap, lnw, lnb, 1e-5, p, lab, 1.0, False, False,
                                                                   True),
                "efwd_seg": lambda: embed.embed_similarity_forward(fmap_cl, None, None, 1e-5, p, lab, 1.0, True,
                                                                   False, False),
                "ebwd": lambda: embed.embed_similarity_backward(gseg, lse, own, fmap, lnw, lnb, 1e-5, p, lab, argk,
                                                                lse, 1.0),
                "ebwd_seg": lambda: embed.embed_similarity_backward(gseg, None, None, f, None, None, 1e-5, p, lab,
                                                                    argk, lse, 1.0),
                "esums": lambda: [embed.embed_prototype_sums(fmap, lnw, lnb, 1e-5, lab, C * K, deterministic=det)
                                  for det in (True, False)],
                "ebwd_stats": lambda: embed.embed_similarity_backward(gseg, lse, own, fmap, lnw, lnb, 1e-5, p, lab,
                                                                      argk, lse, 1.0, stats=stats),
                "ebwd_seg_stats": lambda: embed.embed_similarity_backward(gseg, None, None, f, None, None, 1e-5, p,
                                                                          lab, argk, lse, 1.0, stats=stats),
                "efwd_cache": lambda: embed.embed_similarity_forward(fmap, lnw, lnb, 1e-5, p, lab, 1.0, True, True,
                                                                     True, scores=scores),
                "efwd_cache_l2": lambda: embed.embed_similarity_forward(fmap_cl, None, None, 1e-5, p, lab, 1.0, True,
                                                                        True, True, scores=scores),
                "ebwd_cache_l2": lambda: embed.embed_similarity_backward(gseg, lse, own, fmap_cl, None, None, 1e-5, p,
                                                                         lab, argk, lse, 1.0, stats=stats,
                                                                         scores=scores),
                "ebwd_cache": lambda: embed.embed_similarity_backward(gseg, lse, own, fmap, lnw, lnb, 1e-5, p, lab,
                                                                      argk, lse, 1.0, stats=stats, scores=scores),
                "esums_stats": lambda: embed.embed_prototype_sums(fmap, lnw, lnb, 1e-5, lab, C * K, stats=stats),
                "losses": lambda: [losses.ppc_ppd(lse, own, lab, -1, 1.0),
                                   losses.ppc_ppd_backward(lse[0], lse[0], own, lab, lse[0], -1, 1.0)],
                "labels": lambda: labels.labels_ok(lab, C, -1),
                "ema": lambda: prototype_update.prototype_ema(
                    p, torch.empty(C * K, D, dtype=acc, **meta), torch.empty(C * K, dtype=acc, **meta), 0.999),
            }
            for op in which:
                variant[0] = f"{tag}_{op}"
                calls[op]()
    finally:
        for (mod, n), fn in originals.items():
            setattr(mod, n, fn)


def ptxas_path():
    """The ptxas Triton ships (and uses) for sm_80 / sm_90."""
    return triton.knobs.nvidia.ptxas.path


_PTXAS_STATS = (
    ("registers", r"Used (\d+) registers"),
    ("stack", r"(\d+) bytes stack frame"),
    ("spill_stores", r"(\d+) bytes spill stores"),
    ("spill_loads", r"(\d+) bytes spill loads"),
)


def ptxas_usage(ptx: str) -> dict:
    """``ptxas -v`` of one kernel's PTX: ``{registers, stack, spill_stores, spill_loads}`` (bytes per thread).

    The flags are Triton's own (``-lineinfo --regAllocOptLevel=2``, the
    ``.target`` of the PTX as ``--gpu-name``), so the numbers are those of the
    cubin Triton built. Results are cached by the PTX's hash next to Triton's
    own cache, so a second run (the test after CI's report) costs no ptxas.
    """
    key = hashlib.sha256(ptx.encode()).hexdigest()
    cache = os.path.join(triton.knobs.cache.dir, "protoseg_ptxas", key + ".json")
    if os.path.exists(cache):
        with open(cache) as fh:
            return json.load(fh)
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = {}
    for key_, pattern in _PTXAS_STATS:
        m = re.search(pattern, log)
        usage[key_] = int(m.group(1)) if m else 0
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as fh:
        json.dump(usage, fh)
    os.replace(cache + ".tmp", cache)
    return usage


def pipelined(ptx: str) -> bool:
    """The PTX stages operands through shared memory asynchronously (cp.async)."""
    return "cp.async" in ptx


def smem_buffers(ttgir: str) -> int:
    """Depth of the deepest multi-buffered shared-memory operand ring in the TTGIR (1: none).

    The software pipeliner allocates its operand tiles as ``S x rows x cols``
    ring buffers (``ttg.local_alloc``), one slot per stage in flight.
    """
    depths = [int(m) for m in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depths, default=1)


def dot_operand_types(ttgir: str) -> list:
    """Element types of the operands of every MMA in the TTGIR (``tt.dot``, sm_90's ``warp_group_dot``):
    what the tensor cores multiply, e.g. ``["bf16"]`` for a half GEMM, ``["f32"]`` for TF32."""
    types = set()
    for line in ttgir.splitlines():
        if re.search(r"\b(tt\.dot|ttng\.warp_group_dot)\b", line) and " : " in line:
            operands = line.split(" : ", 1)[1].split("->")[0]
            types.update(re.findall(r"\dx(bf16|f16|f32|f64|tf32)\b", operands))
    return sorted(types)


def uses_local_memory(rec: dict) -> bool:
    return bool(rec.get("stack") or rec.get("spill_stores") or rec.get("spill_loads"))


def compile_one(fn, sig, constexprs, attrs, options, arch):
    """Compile one specialisation for ``sm_<arch>``: ``{ok, error, shared, registers, stack, spill_*, pipelined}``."""
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        if "cubin" not in out.asm:
            return dict(ok=False, error="no cubin")
        rec = dict(ok=True, error=None, shared=out.metadata.shared, **ptxas_usage(out.asm["ptx"]))
        rec["pipelined"] = pipelined(out.asm["ptx"])
        rec["smem_buffers"] = smem_buffers(out.asm["ttgir"])
        rec["dot_operands"] = dot_operand_types(out.asm["ttgir"])
        return rec
    except Exception as e:  # report, do not stop: the test lists every failure
        return dict(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")


def table(records) -> str:
    """The records as an aligned text table (one row per kernel specialisation and arch)."""
    head = ("arch", "kernel", "variant", "warps", "stages", "regs", "stack", "spill st/ld", "smem", "buffers", "s")
    rows = [head]
    for r in records:
        rows.append((
            f"sm_{r['arch']}", r["kernel"], r["variant"], str(r["num_warps"]), str(r["num_stages"]),
            str(r.get("registers", "-")), str(r.get("stack", "-")),
            f"{r.get('spill_stores', '-')}/{r.get('spill_loads', '-')}", str(r.get("shared", "-")),
            (f"{r['smem_buffers']} cp.async" if r.get("pipelined") else "-"), str(r["seconds"]),
        ) if r["ok"] else (f"sm_{r['arch']}", r["kernel"], r["variant"], "FAILED: " + r["error"].splitlines()[0]))
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


DOC_COMMAND = "python tests/compile_kernels.py --write-doc docs/kernels.md"
DOC_ARCHS = (90, 80)


def render_doc(records) -> str:
    """``docs/kernels.md``: one Markdown table per arch of the default compile set, deterministic.

    Sorted by kernel and variant; no timings, so the same kernels and the same
    Triton give the same text and a test can compare it with the committed file.
    """
    out = [
        "# Triton kernels: registers, shared memory, spills",
        "",
        "<!-- GENERATED FILE: do not edit by hand; regenerate with the command below. -->",
        "",
        f"Generated by `{DOC_COMMAND}` (Triton {triton.__version__},",
        "its own ptxas), with no GPU: every kernel launch the launchers make for the",
        "default compile set of `tests/compile_kernels.py` (every kernel and constexpr",
        "path in every dtype at the Cityscapes size, the similarity kernels at ADE20K's",
        "C, an odd tiny size), compiled for each arch. `tests/test_triton_compile.py`",
        "fails when this file no longer matches the kernels: after changing a tile, a",
        "launcher or a kernel body, rerun the command above and commit the result.",
        "",
        "Columns: *variant*, the first problem that launched this specialisation",
        "(`N_D_C_K_dtype_op`, see `tests/compile_kernels.py`); *tiles*, the `BLOCK_*`",
        "constexprs; *regs*, registers per thread; *smem*, shared memory per block in",
        "bytes; *spills*, stack frame / spill stores / spill loads in bytes per thread",
        "(all must be 0); *pipelined*, operands copied with cp.async, through a",
        "shared-memory ring of that many buffers (2+: software-pipelined; `-`: no",
        "cp.async); *MMA*, the element types the tensor-core products multiply (`-`:",
        "CUDA-core FMAs only).",
    ]
    for arch in sorted({r["arch"] for r in records}, reverse=True):
        rows = sorted((r for r in records if r["arch"] == arch), key=lambda r: (r["kernel"], r["variant"]))
        out += ["", f"## sm_{arch}", "",
                "| kernel | variant | tiles | warps | stages | regs | smem | spills | pipelined | MMA |",
                "|---|---|---|---:|---:|---:|---:|---|---|---|"]
        for r in rows:
            tiles = " ".join(f"{k}={v}" for k, v in r.get("tiles", {}).items()) or "-"  # parameter order
            if not r["ok"]:
                out.append(f"| {r['kernel']} | {r['variant']} | {tiles} | {r['num_warps']} | {r['num_stages']} "
                           "| FAILED | | | | |")
                continue
            spills = f"{r['stack']}/{r['spill_stores']}/{r['spill_loads']}"
            pipe = f"cp.async x{r['smem_buffers']}" if r["pipelined"] else "-"
            mma = ", ".join(r["dot_operands"]) or "-"
            out.append(f"| {r['kernel']} | {r['variant']} | {tiles} | {r['num_warps']} | {r['num_stages']} "
                       f"| {r['registers']} | {r['shared']} | {spills} | {pipe} | {mma} |")
    return "\n".join(out) + "\n"


def doc_mismatch(records, path) -> str:
    """Empty when ``path`` holds what :func:`render_doc` makes of ``records``; else a message saying how to fix it."""
    want = render_doc(records)
    have = open(path).read() if os.path.exists(path) else ""
    if have == want:
        return ""
    import difflib
    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), path, "generated"))[:60])
    return (f"{path} does not match the compiled kernels; regenerate it with\n    {DOC_COMMAND}\n"
            f"and commit it. Difference (first lines):\n{diff}")


def main(archs, table_set, write_doc=None, check_doc=None) -> int:
    t_start = time.time()
    print(json.dumps({"all_kernels": sorted(n for _, n in all_kernels())}), flush=True)
    RECORDED.clear()
    _record_all(table_set)
    seen = set()
    records = []
    for name, variant, fn, bound, options in RECORDED:
        sig, constexprs, attrs = _signature(fn, bound)
        consts = json.dumps({k: str(v) for k, v in constexprs.items()}, sort_keys=True)
        key = (name, json.dumps(sig, sort_keys=True), consts, str(sorted(attrs)), json.dumps(options, sort_keys=True))
        if key in seen:  # the same specialisation from another problem
            continue
        seen.add(key)
        for arch in archs:
            t0 = time.time()
            rec = {"kernel": name, "variant": variant, "arch": arch, **options,
                   "tiles": {k: v for k, v in constexprs.items() if k.startswith("BLOCK_")}}
            rec.update(compile_one(fn, sig, constexprs, attrs, options, arch))
            rec["seconds"] = round(time.time() - t0, 2)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    print(table(records))
    failed = [r for r in records if not r["ok"]]
    spilled = [r for r in records if r["ok"] and uses_local_memory(r)]
    print(f"{len(records)} compiles in {time.time() - t_start:.0f} s: {len(failed)} failed, "
          f"{len(spilled)} use local memory (spills or stack)", flush=True)
    for r in failed + spilled:
        what = r["error"].splitlines()[0] if not r["ok"] else (
            f"{r['registers']} registers, {r['stack']} B stack, {r['spill_stores']} B spill stores, "
            f"{r['spill_loads']} B spill loads")
        print(f"sm_{r['arch']} {r['kernel']} [{r['variant']}]: {what}", file=sys.stderr)
    rc = 1 if failed or spilled else 0
    if write_doc:
        with open(write_doc, "w") as fh:
            fh.write(render_doc(records))
        print(f"wrote {write_doc}", flush=True)
    if check_doc:
        msg = doc_mismatch(records, check_doc)
        if msg:
            print(msg, file=sys.stderr)
            rc = 1
        else:
            print(f"{check_doc} matches the compiled kernels", flush=True)
    return rc


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter does not compile kernels")
    args = sys.argv[1:]
    doc = {}
    for opt in ("--write-doc", "--check-doc"):
        if opt in args:
            i = args.index(opt)
            if i + 1 >= len(args):
                raise SystemExit(f"{opt} needs a path")
            doc[opt[2:].replace("-", "_")] = args.pop(i + 1)
            args.pop(i)
    full = "--full" in args
    archs = [int(a) for a in args if a != "--full"] or list(DOC_ARCHS)
    if doc and (full or tuple(archs) != DOC_ARCHS):
        raise SystemExit("--write-doc / --check-doc take the default set and archs: " + DOC_COMMAND)
    sys.exit(main(archs, FULL if full else QUICK, **doc))
