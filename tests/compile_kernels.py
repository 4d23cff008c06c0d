"""Compile every Triton kernel of protoseg_ext.kernels for given GPU architectures, with no GPU.

Run without TRITON_INTERPRET (the launchers then choose their GPU tile
sizes). The real launchers are called on ``meta`` tensors for a set of
problems; each kernel launch they make is recorded instead of run, turned into
a ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` call
with the same constexprs, integer specialisations, ``num_warps`` and
``num_stages``, and compiled to a cubin. Prints a first JSON line
``{"all_kernels": [...]}`` (every launched ``@triton.jit`` function of the
kernel modules), then one per (kernel specialisation, arch): ``{"kernel", "variant",
"arch", "num_warps", "num_stages", "ok", "error", "shared", "seconds"}``.

Usage: python tests/compile_kernels.py [--full] 90 80
(``--full``: every dtype at every problem size, about 170 compiles.)
"""

from __future__ import annotations

import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter does not compile kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from protoseg_ext.kernels import prototype_update, similarity, sinkhorn  # noqa: E402

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
MODULES = (similarity, sinkhorn, prototype_update)


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
    sig, constexprs = {}, {}
    for p in fn.params:
        name, v = p.name, bound[p.name]
        if p.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # as the launcher specialises it
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = p.annotation_type or "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__}")
    return sig, constexprs


# (N, D, C, K): Cityscapes HRNet-W48 head; ADE20K-sized C; a tiny problem
CITYSCAPES, ADE20K, TINY = (65536, 720, 19, 10), (8192, 256, 150, 10), (4096, 64, 3, 1)
ALL_OPS = ("fwd", "fwd_seg", "fwd_own", "bwd", "bwd_seg", "sinkhorn", "sums", "ema")

# The default set: every kernel, every constexpr path (forward outputs, backward
# gradients, Sinkhorn phases, deterministic and atomic sums, the float64 FMA
# backward) and every GEMM dtype class, at the sizes that set the GPU tiles.
QUICK = [
    (CITYSCAPES, torch.bfloat16, ALL_OPS),
    (CITYSCAPES, torch.float32, ("fwd", "bwd", "sinkhorn")),
    (TINY, torch.float16, ("fwd_seg", "bwd_seg")),
    (TINY, torch.float64, ("fwd", "bwd", "sinkhorn", "sums", "ema")),
]
FULL = [(pb, dt, ALL_OPS) for pb in (CITYSCAPES, ADE20K, TINY)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]


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
            tag = f"N{N}_D{D}_C{C}_K{K}_{str(dt).split('.')[-1]}"
            acc = torch.float64 if dt == torch.float64 else torch.float32
            f = torch.empty(N, D, dtype=dt, **meta)
            p = torch.empty(C, K, D, dtype=dt, **meta)
            lab = torch.empty(N, dtype=torch.int64, **meta)
            argk = torch.empty(N, C, dtype=torch.uint8, **meta)
            lse = torch.empty(N, dtype=acc, **meta)
            own = torch.empty(N, K, dtype=acc, **meta)
            gseg = torch.empty(N, C, dtype=dt, **meta)
            calls = {
                "fwd": lambda: similarity.similarity_forward(f, p, lab, 1.0, True, True, True),
                "fwd_seg": lambda: similarity.similarity_forward(f, p, lab, 1.0, True, False, False),
                "fwd_own": lambda: similarity.similarity_forward(f, p, lab, 1.0, False, False, True),
                "bwd": lambda: similarity.similarity_backward(gseg, lse, own, f, p, lab, argk, lse, 1.0),
                "bwd_seg": lambda: similarity.similarity_backward(gseg, None, None, f, p, lab, argk, lse, 1.0),
                "sinkhorn": lambda: sinkhorn.sinkhorn(own, lab, C, 3, 0.05),
                "sums": lambda: [prototype_update.prototype_sums(f, lab, C * K, deterministic=det)
                                 for det in (True, False)],
                "ema": lambda: prototype_update.prototype_ema(
                    p, torch.empty(C * K, D, dtype=acc, **meta), torch.empty(C * K, dtype=acc, **meta), 0.999),
            }
            for op in which:
                variant[0] = f"{tag}_{op}"
                calls[op]()
    finally:
        for (mod, n), fn in originals.items():
            setattr(mod, n, fn)


def main(archs, table):
    print(json.dumps({"all_kernels": sorted(n for _, n in all_kernels())}), flush=True)
    _record_all(table)
    seen = set()
    for name, variant, fn, bound, options in RECORDED:
        sig, constexprs = _signature(fn, bound)
        consts = json.dumps({k: str(v) for k, v in constexprs.items()}, sort_keys=True)
        key = (name, json.dumps(sig, sort_keys=True), consts, json.dumps(options, sort_keys=True))
        if key in seen:  # the same specialisation from another problem
            continue
        seen.add(key)
        for arch in archs:
            t0 = time.time()
            rec = {"kernel": name, "variant": variant, "arch": arch, **options}
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
                out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                rec.update(ok="cubin" in out.asm, error=None if "cubin" in out.asm else "no cubin",
                           shared=out.metadata.shared)
            except Exception as e:  # report, do not stop: the test lists every failure
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
            rec["seconds"] = round(time.time() - t0, 2)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    full = "--full" in args
    main([int(a) for a in args if a != "--full"] or [90, 80], FULL if full else QUICK)
