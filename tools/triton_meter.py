"""A traffic meter for the Triton kernels under the interpreter (TRITON_INTERPRET=1): a test and model tool.

    with TritonMeter() as m:
        ...  # launch Triton kernels on CPU tensors
    m.events  # one dict per launch, in the format of cuda_sim's meter (tools/cuda_sim/runtime.cpp)

Per launch (one per GridExecutor call): bytes loaded and stored by tl.load /
tl.store / atomics of every program (masked-off lanes excluded), the 32-byte
sectors of each such access (one access = one tl.load or tl.store of one
program: the interpreter runs a program's block as one operation) against the
ideal for the distinct bytes it requests, the distinct sectors the launch
touches, the bytes an earlier launch touched with their reuse distances (as
cuda_sim's meter: each sector placed at its first touch in the launch, programs
in grid order; the chunk loops of kernels/embed.py are its tile loops, a reuse
within a chunk or the one before reported apart with the chunk's pixels), and
the flops of tl.dot (2 M N K each) with the unit that
runs them on a GPU: the similarity kernels multiply under the interpreter in
float32 what a GPU multiplies in bf16 / fp16 or TF32 (``DOT_UPCAST``), so
their unit is the one ``kernels.common.dot_config`` picks for the launch's
feats and prototype dtypes ("tensor cores (tf32x3)": three TF32 products per
float32 product). How a compiled kernel spreads a block over its warps is
not known here: an access's sectors are those of the whole block, as if its
lanes were grouped perfectly, so the ratio to the ideal shows gathers and
strides, not the compiler's layout choices.
"""

from __future__ import annotations

import math
import numpy as np
import torch

L2_BYTES = 50 << 20


def _unit(bits: int, precision) -> str:
    """The unit a GPU runs a tl.dot of ``bits``-bit operands at ``precision`` on."""
    if bits <= 16:
        return "tensor cores (16-bit)"
    if bits == 64:
        return "fp64 cuda cores"
    prec = str(precision).lower()
    if "ieee" in prec:
        return "fp32 cuda cores"
    return "tensor cores (tf32x3)" if "tf32x3" in prec else "tensor cores (tf32)"


def reuse_bucket(d: int) -> int:
    """A reuse distance's bucket, named by its upper bound (as cuda_sim's meter): 2^(b/8) rounded up for the
    least b with d <= 2^(b/8), at most 9% above the distance."""
    if d <= 1:
        return 1
    b = math.ceil(8.0 * math.log2(d) - 1e-9)
    return max(int(d), math.ceil(2.0 ** (b / 8.0)))


class TritonMeter:
    def __init__(self):
        self.events = []
        self._cur = None
        self._last_touch = {}  # sector -> (bytes touched up to its last touch, that touch's chunk epoch or 0)
        self._touched = 0
        self._saved = []
        self._epoch, self._tile = 0, None  # chunk epochs (as cuda_sim's tile epochs); the running chunk
        self._observed = None

    # ------------------------------------------------------------------ chunk loops (kernels/embed.py)
    def tile(self, loop_rows, rows):
        """A chunk starts: ``loop_rows`` the loop's pixels per chunk, ``rows`` this chunk's pixels."""
        self._epoch += 1
        self._tile = (int(loop_rows), int(rows))

    def tiles_end(self):
        self._epoch += 1
        self._tile = None

    # ------------------------------------------------------------------ patching
    def __enter__(self):
        from triton.runtime import interpreter as I

        meter = self
        B = I.InterpreterBuilder

        def wrap(cls, name, fn):
            orig = getattr(cls, name)
            self._saved.append((cls, name, orig))

            def patched(*a, **k):
                return fn(orig, *a, **k)

            setattr(cls, name, patched)

        def masked_load(orig, b, ptrs, mask, *rest):
            meter._access("load", ptrs, mask)
            return orig(b, ptrs, mask, *rest)

        def masked_store(orig, b, ptrs, value, mask, *rest):
            meter._access("store", ptrs, mask)
            return orig(b, ptrs, value, mask, *rest)

        def atomic_rmw(orig, b, op, ptr, val, mask, *rest):
            meter._access("atomic", ptr, mask)
            return orig(b, op, ptr, val, mask, *rest)

        def atomic_cas(orig, b, ptr, cmp, val, *rest):
            meter._access("atomic", ptr, None)
            return orig(b, ptr, cmp, val, *rest)

        def dot(orig, b, x, y, d, input_precision, *rest):
            meter._dot(x, y, input_precision)
            return orig(b, x, y, d, input_precision, *rest)

        def launch(orig, ex, *args, **kwargs):
            meter._begin(ex.fn.__name__)
            bound = dict(zip(ex.arg_names, args))
            bound.update(kwargs)
            meter._gpu_dots(bound)
            try:
                # one launch on a GPU, whatever ATen ops the interpreter runs for it (a profiler's count:
                # tools/gpu_model.py, step_launches)
                with torch.profiler.record_function("triton::launch"):
                    return orig(ex, *args, **kwargs)
            finally:
                meter._end()

        wrap(B, "create_masked_load", masked_load)
        wrap(B, "create_masked_store", masked_store)
        wrap(B, "create_atomic_rmw", atomic_rmw)
        wrap(B, "create_atomic_cas", atomic_cas)
        wrap(B, "create_dot", dot)
        wrap(I.GridExecutor, "__call__", launch)
        try:
            from protoseg_ext.kernels import embed as emb
        except ImportError:  # a checkout without the package installed: kernels/ is protoseg_ext.kernels
            from kernels import embed as emb
        self._observed, emb.CHUNK_OBSERVER = (emb, emb.CHUNK_OBSERVER), self
        return self

    def __exit__(self, *exc):
        for cls, name, orig in reversed(self._saved):
            setattr(cls, name, orig)
        self._saved.clear()
        if self._observed is not None:
            emb, prev = self._observed
            emb.CHUNK_OBSERVER, self._observed = prev, None
        return False

    # ------------------------------------------------------------------ recording
    def _begin(self, name):
        self._cur = dict(type="kernel", name=name, bytes_loaded=0, bytes_stored=0, instructions=0, sectors=0,
                         ideal_sectors=0, flops=0, unit="memory", sector_set={})  # in first-touch order

    def _access(self, kind, ptrs, mask):
        c = self._cur
        if c is None:
            return
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addrs = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        if mask is not None:
            addrs = addrs[np.asarray(mask.data, dtype=bool).reshape(-1)]
        if addrs.size == 0:
            return
        n = int(addrs.size) * elem
        if kind != "store":
            c["bytes_loaded"] += n
        if kind != "load":
            c["bytes_stored"] += n
        distinct = np.unique(addrs)
        first, last = distinct >> np.uint64(5), (distinct + np.uint64(elem - 1)) >> np.uint64(5)
        sectors = np.unique(np.concatenate([first, last]))
        c["instructions"] += 1
        c["sectors"] += int(sectors.size)
        c["ideal_sectors"] += (int(distinct.size) * elem + 31) // 32
        c["sector_set"].update(dict.fromkeys(sectors.tolist()))  # a known sector keeps its place

    def _gpu_dots(self, bound):
        """The GEMM units a GPU would use for this launch's tl.dot calls, where the interpreter cannot tell.

        Under the interpreter the similarity kernels (``DOT_UPCAST``) multiply
        operands already rounded to the GPU's operand dtype in float32 ("ieee"):
        bf16 tl.dot is wrong in the interpreter. The GPU's choice is
        ``kernels.common.dot_config`` of the feats and prototype dtypes: the S
        products (``DOT_DTYPE``) and the dS @ protos products (``DS_DTYPE``).
        """
        self._cur["gpu_dots"] = None
        if not bound.get("DOT_UPCAST"):
            return
        x, p = bound.get("X_ptr"), bound.get("P_ptr")
        if not (hasattr(x, "dtype") and hasattr(p, "dtype")):
            return
        from protoseg_ext.kernels.common import dot_config

        cfg = dot_config(x.dtype, p.dtype, interpret=False)
        units = {"S": _unit(cfg["DOT_DTYPE"].primitive_bitwidth, cfg["DOT_PRECISION"]),
                 "dS": _unit(cfg["DS_DTYPE"].primitive_bitwidth, cfg["DS_PRECISION"])}
        has_s, has_ds = "DOT_DTYPE" in bound, "DS_DTYPE" in bound
        self._cur["gpu_dots"] = (units, has_s, has_ds, bound.get("BLOCK_D"))

    def _dot(self, x, y, input_precision):
        c = self._cur
        if c is None:
            return
        M, K = x.data.shape[-2], x.data.shape[-1]
        N = y.data.shape[-1]
        batch = int(np.prod(x.data.shape[:-2])) if x.data.ndim > 2 else 1
        c["flops"] += 2 * M * N * K * batch
        gpu = c.get("gpu_dots")
        if gpu:
            units, has_s, has_ds, block_d = gpu
            # which product: the kernel's only kind, else the S products reduce over a BLOCK_D chunk
            is_s = has_s and (not has_ds or K == block_d)
            c["unit"] = units["S" if is_s else "dS"]
        else:
            c["unit"] = _unit(x.dtype.primitive_bitwidth, input_precision)

    def _end(self):
        c, self._cur = self._cur, None
        c.pop("gpu_dots", None)
        sectors = c.pop("sector_set")
        tag = self._epoch if self._tile else 0
        hits, reuse, reuse_tile = 0, {}, {}
        for rank, s in enumerate(sectors):
            t = self._last_touch.get(s)
            if t is None:
                continue
            d = self._touched + 32 * rank - t[0]
            if d <= L2_BYTES:
                hits += 1
            b = reuse_bucket(d)
            near = tag and t[1] and tag - t[1] <= 1
            into = reuse_tile if near else reuse
            into[b] = into.get(b, 0) + 32
        for rank, s in enumerate(sectors):
            self._last_touch[s] = (self._touched + 32 * (rank + 1), tag)
        self._touched += 32 * len(sectors)
        c["unique_bytes"] = 32 * len(sectors)
        c["l2_hit_bytes"] = 32 * hits
        c["reuse"] = {str(k): v for k, v in sorted(reuse.items())}
        c["reuse_tile"] = {str(k): v for k, v in sorted(reuse_tile.items())}
        c["tile"] = list(self._tile) if self._tile else None
        self.events.append(c)
