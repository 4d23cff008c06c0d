"""Modelled H100 time of the head's training step, from the memory traffic the kernels make.

    python tools/gpu_model.py --backend cuda|triton --size cityscapes --dtype bf16 [--json]

Runs the step that ``ProtoSegHead`` runs (NCHW map, feat_norm on, forward,
prototype update, CE + 0.01 PPC + 0.001 PPD, backward) with the CUDA kernels
of csrc/cuda in the cuda_sim emulator (tools/cuda_sim), or the Triton kernels
under the interpreter (tools/triton_meter.py: the same counts, an access
being one tl.load/tl.store of one program, and tl.dot flops on the unit a GPU
would use; the launchers pick their GPU tiles, PROTOSEG_TRITON_GPU_TILES=1,
unless the environment sets it to 0), meter on:
per kernel launch, bytes loaded and stored, the 32-byte sectors of every
warp-wide memory instruction against the ideal for the bytes it requests,
and the distinct sectors it touches; per host GEMM, its shape, dtypes, flops
and operand bytes. No GPU is involved: every time printed is modelled.

Sizes (K = 10): cityscapes N = 65,536 (2 x 128 x 256), D = 720, C = 19;
ade20k N = 65,536, D = 720, C = 150; fullres 1 x 720 x 1024 x 2048, C = 19;
fullres-ade20k 2 x 256 x 1024 x 2048, C = 150. The emulator cannot run those
(about one CPU function call per access of every CUDA thread), so the step
runs at three small maps of the same B, D, C, K (H x W = 8 x 8, 8 x 16,
8 x 24 per image) and every count is fitted as a + b N on the first two and
checked on the third: a count that the fit predicts within 1% is "linear"
and is extrapolated to the size's N. Any other is data-dependent (which
prototypes a step updates, which pixels it sums) and is marked "not linear"
in the table: within 25% across the three runs it takes the largest
measured value, else it grows in proportion to N from the largest run
(sectors and ideal sectors then both in proportion, so that their ratio is
the largest run's, as also where two linear fits would leave the measured
range of that ratio); the JSON carries the same numbers. The kernels of the
prototype update's EMA are the exception: their traffic follows how many
prototypes a step updates, not N, so they are metered once more with every
prototype updated, on the step's own arguments, and taken at that (the
table says "every prototype updated (measured)"). The table's launch counts are those of the measured
runs; the step's launches at the real size are counted apart (step_launches): the three small maps
run again, each in several tiles of 64 pixels (cuda: PROTOSEG_SIM_TILE_ROWS, which the emulator's
build of csrc/cuda/similarity_common.cuh's tile_rows reads; triton: kernels/embed.py's CHUNK_PIXELS)
under torch.profiler, where every emulated kernel and host GEMM is one scope and every other ATen op
the step runs outside them counts once (views, metadata and allocation excepted; an op that launches
several kernels on a GPU still counts once, so the count is a lower bound there); each count is
fitted as a + b tiles on two runs, checked on the third, and taken at the size's own tiles (16 MiB
of S each on cuda, csrc/cuda/similarity_common.cuh) or chunks (65,536 pixels on triton).
Assumed L2 hits are not extrapolated: the meter gives, per launch, the bytes
an earlier launch or GEMM touched and how many bytes were touched in between,
each touch placed where it falls in its event (a launch's sectors in the
order its blocks first touch them, a GEMM's operands at its start and its
output after them), so that a distance includes the rest of the producer: a
kernel that writes a buffer while it streams 100 MB does not leave the
buffer's first bytes in the L2. Distances are scaled by N / (the largest
measured N), except a reuse within a tile of a host tile loop or from the
tile before (cuda: similarity_common.cuh's MeterTiles; triton: the chunk
loops of kernels/embed.py), whose distance is a tile's traffic and scales
with the tile: by the tile's pixels at the real size over its rows in the
measured run. A byte counts as an L2 hit at the real size only if its scaled
distance is within 50 MB. So that tiles follow tiles as at the real sizes,
the cuda runs split each image into TRAFFIC_TILES tiles
(PROTOSEG_SIM_TILE_ROWS); a Triton chunk of 65,536 pixels holds a whole
measured map.

The model, per kernel: the largest of DRAM bytes / HBM bandwidth, requested
bytes (sectors x 32) / L2 bandwidth and flops / the peak of the unit that
runs them; the step is the sum. DRAM bytes are the distinct sectors a launch
touches, less the assumed L2 hits (the table lists them). Constants:
  HBM3 3.35 TB/s, L2 50 MB, bf16/fp16 tensor cores 989.5 TFLOPS dense, fp32
  67 TFLOPS (CUDA cores), TF32 tensor cores 494.5 TFLOPS dense (a Triton
  tf32x3 product, three TF32 products, at a third of it): NVIDIA H100
  SXM datasheet (tensor-core rates there are quoted with sparsity; dense is
  half); TF32 counts only when torch.backends.cuda.matmul.allow_tf32 is on
  (off by default, so fp32 GEMMs count at the CUDA-core rate).
  L2 bandwidth 5.5 TB/s: an assumption (NVIDIA does not publish it; third-
  party microbenchmarks of the H100 report about 5.5 to 7 TB/s).
The step keeps S (triton) or softmax(S) (cuda) from the forward exactly where the head would at the
size it models (keeps_scores: N x C*K float32 within PROTOSEG_CACHE_MB, 2048 MiB unless set; the
small maps always fit, so they are told the real size's choice), and recomputes it otherwise.
The step's roofline (step_roofline): its compulsory bytes and flops
(protoseg_ext.kernels.roofline: the backward recomputes S, three GEMMs), or
one GEMM fewer with softmax(S) kept from the forward (N x C*K float32
written and read back), whichever is faster; each the larger of bytes / HBM
bandwidth and flops / the peak of the unit the backend's GEMMs run on
(16-bit tensor cores for bf16 maps; for fp32 maps the fp32 CUDA cores in
cuda, tf32x3 tensor-core products in triton).
Not metered: ATen ops of the step other than the GEMMs (dtype conversions,
the mask_norm LayerNorm over C, the CE loss, sorts, fills), so the modelled
step is a lower bound for what the step's own kernels cost.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HBM_BYTES_PER_S = 3.35e12
L2_BYTES = 50 << 20
L2_BYTES_PER_S = 5.5e12  # an assumption, see the module docstring
PEAKS = {"tensor cores (16-bit)": 989.5e12, "tensor cores (tf32)": 494.5e12,
         "tensor cores (tf32x3)": 494.5e12 / 3, "fp32 cuda cores": 67e12,
         "fp64 cuda cores": 34e12, "memory": None}

SIZES = {  # B, D, H, W, C
    "cityscapes": (2, 720, 128, 256, 19),
    "ade20k": (2, 720, 128, 256, 150),
    "fullres": (1, 720, 1024, 2048, 19),
    "fullres-ade20k": (2, 256, 1024, 2048, 150),
}
K = 10
SMALL_HW = ((8, 8), (8, 16), (8, 24))  # the measured maps (H, W) per image
TRAFFIC_TILES = 4  # cuda: tiles per image of the measured maps' traffic runs (PROTOSEG_SIM_TILE_ROWS)
METRICS = ("launches", "bytes_loaded", "bytes_stored", "sectors", "ideal_sectors", "unique_bytes", "flops")


def _load_emulator():
    spec = importlib.util.spec_from_file_location("cuda_sim_build", ROOT / "tools" / "cuda_sim" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load(ROOT)


def _cuda_backend():
    """The 'cuda' backend on the emulator's ops (torch.ops.protoseg_cudasim), for this process only."""
    import torch
    from protoseg_ext import backends, ops
    from protoseg_ext.compiled_backends import OpsBackend

    sim = _load_emulator()
    ops.register("protoseg_cudasim")

    class EmulatedCuda(OpsBackend):
        name = "cuda"
        namespace = "protoseg_cudasim"

        def device_reasons(self, device):
            return []

    backends._instances()["cuda"] = EmulatedCuda()
    return sim, torch


def _gemm_unit(ev) -> str:
    import torch

    if ev["a"] in ("Half", "BFloat16") and ev["b"] == ev["a"]:
        return "tensor cores (16-bit)"
    if ev["a"] == "Double":
        return "fp64 cuda cores"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tensor cores (tf32)"
    return "fp32 cuda cores"


def keeps_scores(N, C, dtype) -> bool:
    """Whether the step at N pixels keeps S (N x C*K, float32) for the backward: within the head's default
    cache budget (``PROTOSEG_CACHE_MB``, :func:`protoseg_ext.backends.default_cache_bytes`). The small
    measured maps always fit, so the metered step is told the real size's choice."""
    from protoseg_ext import backends, ops

    return ops.cache_fits(N, C * K, dtype, backends.default_cache_bytes())


def _step_inputs(torch, backend, B, D, H, W, C, dtype, keep=True):
    """The head, map and labels of the metered step (seeded); ``keep``: whether it may keep S (the head's
    default cache budget), else it recomputes S in the backward (``cache_mb=0``)."""
    from protoseg_ext import ProtoSegHead

    torch.manual_seed(0)
    head = ProtoSegHead(D, C, K, backend=backend, feat_norm=True, gamma=0.999, assign="argmax",
                        cache_mb=None if keep else 0).train()
    feats = torch.randn(B, D, H, W).to(dtype).requires_grad_()
    gt = torch.randint(0, C, (B, H, W))
    gt[:, 0, :2] = -1  # a few ignored pixels
    head = head.to(dtype) if dtype != torch.float32 else head
    return head, feats, gt


def _run_step(torch, head, feats, gt):
    """One training step as users run it: forward with prototype learning, CE + 0.01 PPC + 0.001 PPD, backward."""
    out = head(feats, gt)
    loss = torch.nn.functional.cross_entropy(out.seg.float(), gt, ignore_index=-1)
    loss = loss + 0.01 * out.loss_ppc + 0.001 * out.loss_ppd
    loss.backward()


def measure_step(meter, torch, backend, B, D, H, W, C, dtype, ema_args=None, keep=True):
    """The meter's events of one training step at (B, D, H, W, C), grouped by kernel (or GEMM kind).

    meter: a context manager whose value, after the block, is the list of events (cuda_sim's meter or
    tools/triton_meter.TritonMeter). ema_args: a list that receives the arguments of the step's
    prototype_ema call."""
    from protoseg_ext import backends

    ema_args = [] if ema_args is None else ema_args
    head, feats, gt = _step_inputs(torch, backend, B, D, H, W, C, dtype, keep)
    be = backends.get_backend(backend)
    ema = be.prototype_ema

    def recording_ema(*args):
        ema_args.append(args)
        return ema(*args)

    be.prototype_ema = recording_ema  # the step's (protos, sums, counts, gamma), for measure_full_update
    # cuda: several tiles per image, as at the real sizes (TRAFFIC_TILES)
    tile_rows = max(1, H * W // TRAFFIC_TILES) if backend == "cuda" else None
    try:
        with _sim_tile_rows(tile_rows), meter() as m:
            _run_step(torch, head, feats, gt)
    finally:
        del be.prototype_ema
    return group_events(m.events)


# ---------------------------------------------------------------------------- launches

# A launch on a GPU seen by the profiler: a kernel of the emulator or the interpreter, or a GEMM of
# the emulated host code (cuda_sim.h, triton_meter.py); ATen ops inside these scopes are how the CPU
# runs them and are not counted again.
LAUNCH_SCOPES = {"cudasim::launch": "kernels", "cudasim::gemm": "gemms", "triton::launch": "kernels"}
# ATen ops that launch nothing on a GPU: views, metadata, allocation (count_launches counts an
# outermost ATen op when it, or one of the leaves under it, is not one of these)
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_reshape_alias",
    "aten::as_strided", "aten::narrow", "aten::slice", "aten::select", "aten::t", "aten::transpose",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::detach",
    "aten::detach_", "aten::alias", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
    "aten::result_type", "aten::_unsafe_view", "aten::view_as", "aten::unbind", "aten::split",
    "aten::chunk", "aten::diagonal", "aten::unfold", "aten::movedim", "aten::numpy_T", "aten::reshape",
    "aten::contiguous", "aten::to", "aten::_to_copy", "aten::resize_", "aten::set_", "aten::is_nonzero",
    "aten::size", "aten::stride", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
    "aten::requires_grad_", "aten::empty_permuted", "aten::new_empty", "aten::new_empty_strided",
    "aten::flatten", "aten::unflatten", "aten::sym_size", "aten::sym_stride", "aten::dim", "aten::as_strided_",
    "aten::scalar_tensor",
}


def count_launches(events) -> dict:
    """GPU launches in a profile's events (torch.profiler, CPU): each LAUNCH_SCOPES scope once, and each
    outermost ATen op outside them (no ATen op or scope above it) that does any work: itself, or one of
    the ops under it, an ATen leaf not in NO_LAUNCH (a fill, copy, reduction or elementwise op; a leaf
    that is no ATen op, such as the ``detach`` record under ``aten::detach``, computes nothing). One such
    op is one launch: a lower bound where a composite op (``cross_entropy``) runs several kernels on a GPU."""
    n = {"kernels": 0, "gemms": 0, "aten": 0}

    def works(e):
        if not e.cpu_children:  # an ATen leaf that computes (not a dispatcher record such as a view's `detach`)
            return e.name.startswith("aten::") and e.name not in NO_LAUNCH
        return any(works(c) for c in e.cpu_children if c.name not in LAUNCH_SCOPES)

    for e in events:
        if e.name in LAUNCH_SCOPES:
            n[LAUNCH_SCOPES[e.name]] += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and p.name not in LAUNCH_SCOPES and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None and works(e):
            n["aten"] += 1
    n["total"] = n["kernels"] + n["gemms"] + n["aten"]
    return n


def cuda_tile_rows(N: int, CK: int, elem: int = 4) -> int:
    """Rows per tile of the CUDA code's tile loops (csrc/cuda/similarity_common.cuh, tile_rows)."""
    rows = (16 << 20) // max(1, CK * elem)
    rows = min(32768, max(128, rows // 128 * 128))
    return min(rows, N)


@contextlib.contextmanager
def _sim_tile_rows(rows):
    """PROTOSEG_SIM_TILE_ROWS (the emulator's rows per tile) set to ``rows`` within the block, or left
    alone for ``rows`` None; restored after it."""
    saved = os.environ.get("PROTOSEG_SIM_TILE_ROWS")
    if rows is not None:
        os.environ["PROTOSEG_SIM_TILE_ROWS"] = str(rows)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PROTOSEG_SIM_TILE_ROWS", None)
        else:
            os.environ["PROTOSEG_SIM_TILE_ROWS"] = saved


def _embed_module():
    """kernels/embed.py as the package installs it, or from a checkout without the package."""
    try:
        from protoseg_ext.kernels import embed
    except ImportError:
        from kernels import embed
    return embed


def units_at(backend: str, B: int, HW: int, CK: int, override: int = 0) -> int:
    """The tiles (cuda: per image, of tile_rows rows, or ``override``) or chunks (triton:
    kernels/embed.py, pixel_chunks of CHUNK_PIXELS, or ``override``) of a step on a B x HW map."""
    if backend == "cuda":
        T = min(override, B * HW) if override else cuda_tile_rows(B * HW, CK)
        return B * -(-HW // T)
    emb = _embed_module()
    return sum(1 for _ in emb.pixel_chunks(B, HW, override or emb.CHUNK_PIXELS))


def step_launches(meter, torch, backend, B, D, H, W, C, dtype, keep=True):
    """GPU launches of the step at (B, D, H, W, C), from the profiled small maps: each run in
    ``units_at(..., override=64)`` tiles or chunks (PROTOSEG_SIM_TILE_ROWS, or kernels/embed.py's
    CHUNK_PIXELS, set to 64 for the runs), every count fitted as a + b * units on two runs and checked on
    the third, then taken at the size's own units. Returns ``{"kernels", "gemms", "aten", "total",
    "units", "per_unit", "fixed", "linear"}``."""
    from torch.profiler import ProfilerActivity, profile

    R = 64
    if backend != "cuda":
        emb = sys.modules["protoseg_ext.kernels"].embed
        saved, emb.CHUNK_PIXELS = emb.CHUNK_PIXELS, R
    counts, units = [], []
    try:
        with _sim_tile_rows(R if backend == "cuda" else None):
            for h, w in SMALL_HW:
                head, feats, gt = _step_inputs(torch, backend, B, D, h, w, C, dtype, keep)
                with profile(activities=[ProfilerActivity.CPU]) as prof, meter():
                    _run_step(torch, head, feats, gt)
                counts.append(count_launches(prof.events()))
                units.append(units_at(backend, B, h * w, C * K, R))
    finally:
        if backend != "cuda":
            emb.CHUNK_PIXELS = saved
    real = units_at(backend, B, H * W, C * K)
    out = dict(units=real, linear=True, per_unit={}, fixed={})
    for key in ("kernels", "gemms", "aten", "total"):
        v = [c[key] for c in counts]
        b = (v[1] - v[0]) / (units[1] - units[0])
        a = v[0] - b * units[0]
        out["linear"] &= abs(a + b * units[2] - v[2]) < 0.5
        out[key] = int(round(a + b * real))
        out["per_unit"][key], out["fixed"][key] = b, a
    return out


def group_events(events):
    """The meter's events summed per kernel (or GEMM kind): METRICS, the unit and the reuse distances."""
    groups = {}
    for ev in events:
        if ev["type"] == "kernel":
            name, unit, flops = ev["name"], ev.get("unit", "memory"), ev.get("flops", 0)
            stored = ev["bytes_stored"]
            loaded = ev["bytes_loaded"]
            sectors, ideal = ev["sectors"], ev["ideal_sectors"]
        else:
            unit = _gemm_unit(ev)
            name = f"GEMM {ev['name']} ({ev['a']} x {ev['b']} -> {ev['out']}, k = {ev['k']})"
            flops = ev["flops"]
            out_bytes = ev["m"] * ev["n"] * {"Float": 4, "Double": 8}.get(ev["out"], 2)
            loaded, stored = ev["bytes"] - out_bytes, out_bytes
            sectors = ideal = (ev["bytes"] + 31) // 32
        g = groups.setdefault(name, dict(name=name, unit=unit, reuse={}, reuse_tile={},
                                         **{m: 0 for m in METRICS}))
        for dist, nbytes in ev["reuse"].items():
            g["reuse"][int(dist)] = g["reuse"].get(int(dist), 0) + nbytes
        if ev.get("tile"):  # reuse within a tile loop's tile or the one before: (loop rows, tile rows, distance)
            loop_rows, rows = ev["tile"]
            for dist, nbytes in ev.get("reuse_tile", {}).items():
                key = (int(loop_rows), int(rows), int(dist))
                g["reuse_tile"][key] = g["reuse_tile"].get(key, 0) + nbytes
        g["launches"] += 1
        g["bytes_loaded"] += loaded
        g["bytes_stored"] += stored
        g["sectors"] += sectors
        g["ideal_sectors"] += ideal
        g["unique_bytes"] += ev["unique_bytes"]
        g["flops"] += flops
    return groups


def measure_full_update(meter, torch, backend, args):
    """The meter's events (per kernel) of the prototype update's EMA with every prototype updated, on
    arguments like ``args`` (the step's ``(protos, sums, counts, gamma)``): the most traffic that op can
    cause at this (C, K, D), whatever the number of pixels."""
    from protoseg_ext import backends

    protos, sums, counts, gamma = args
    g = torch.Generator().manual_seed(1)
    sums = torch.randn(sums.shape, generator=g).to(sums.dtype)
    counts = torch.ones_like(counts)
    with meter() as m:
        backends.get_backend(backend).prototype_ema(protos.clone(), sums, counts, gamma)
    return group_events(m.events)


def bound_by_full_update(rows, full):
    """Each count of a kernel the EMA runs taken from ``full`` (measure_full_update), per launch, not
    extrapolated: its traffic depends on how many prototypes a step updates, not on N, so the small maps'
    growth (more pixels, more prototypes hit) carried in proportion to N overshoots once every prototype is
    hit, and a fit across them can also undershoot (a falling line). The full update is the most it can
    cause, and what a step of tens of thousands of pixels comes close to."""
    for row in rows:
        f = full.get(row["name"])
        if f is None:
            continue
        per_launch = row["launches"] / max(1, f["launches"])
        for m in METRICS:
            if m != "launches":
                row[m] = f[m] * per_launch
        row["l2_hit_bytes"] = 0.0
        row["scaling"] = "every prototype updated (measured)"
    return rows


def tile_at(backend: str, B: int, HW: int, loop_rows: int) -> int:
    """Pixels per tile, at a B x HW map, of a tile loop of ``loop_rows`` rows per tile (the meter's
    ``tile``): cuda tiles hold at most one image (``loop_rows`` 0: a tile per image), Triton chunks
    (kernels/embed.py, pixel_chunks) whole images where they fit."""
    if backend == "cuda":
        return min(loop_rows or HW, HW)
    return max((nb * hwc for _, nb, _, hwc in _embed_module().pixel_chunks(B, HW, loop_rows)), default=0)


def extrapolate(runs, Ns, N, tile_scale=None):
    """Per kernel: each count at N from the runs at Ns (a + b n on the first two, checked on the third), and
    the assumed L2 hits at N: the bytes an earlier event touched while the bytes touched since, scaled by
    N / Ns[-1], stay within the L2 (from the largest run's reuse distances). A reuse within a tile loop's
    tile or the one before (the meter's ``reuse_tile``, by loop rows and tile rows) scales with the tile
    instead: ``tile_scale(loop_rows, rows)``, the tile's pixels at the real size over ``rows`` (none
    given: N / Ns[-1] as the rest)."""
    names = []
    for r in runs:
        names += [n for n in r if n not in names]
    out = []
    for name in names:
        vals = {m: [r.get(name, {}).get(m, 0) for r in runs] for m in METRICS}
        row = dict(name=name, unit=next(r[name]["unit"] for r in runs if name in r), scaling="linear")
        for m in METRICS:
            v = vals[m]
            if m == "launches":
                row[m] = v[-1]
                continue
            b = (v[1] - v[0]) / (Ns[1] - Ns[0])
            a = v[0] - b * Ns[0]
            pred = a + b * Ns[2]
            if abs(pred - v[2]) <= 0.01 * max(abs(v[2]), 1):
                row[m] = max(0.0, a + b * N)
            elif max(v) <= 1.25 * min(v):  # data-dependent but flat (e.g. how many prototypes a step updates)
                row[m] = max(v)
                row["scaling"] = f"not linear ({m}: the largest measured)"
            else:  # data-dependent and growing (e.g. how many pixels a step sums): in proportion to N
                row[m] = v[2] * N / Ns[2]
                row["scaling"] = f"not linear ({m}: proportional)"
        ratios = [a / b for a, b in zip(vals["sectors"], vals["ideal_sectors"]) if b]
        nonlinear = "not linear (sectors" in row["scaling"] or "not linear (ideal_sectors" in row["scaling"]
        extrap = row["sectors"] / row["ideal_sectors"] if row["ideal_sectors"] else float("inf")
        if ratios and (nonlinear or not min(ratios) * 0.99 <= extrap <= max(ratios) * 1.01):
            # keep the largest run's coalescing ratio rather than two counts extrapolated apart
            row["ideal_sectors"] = vals["ideal_sectors"][2] * N / Ns[2]
            row["sectors"] = row["ideal_sectors"] * ratios[-1]
            if not nonlinear:
                row["scaling"] = "not linear (sectors: proportional)"
        scale = N / Ns[-1]
        last = runs[-1].get(name, {})
        grow = row["unique_bytes"] / last["unique_bytes"] if last.get("unique_bytes") else 0.0
        hits = sum(b for dist, b in last.get("reuse", {}).items() if dist * scale <= L2_BYTES)
        for (loop_rows, rows, dist), b in last.get("reuse_tile", {}).items():
            if dist * (tile_scale(loop_rows, rows) if tile_scale else scale) <= L2_BYTES:
                hits += b
        hits *= grow
        row["l2_hit_bytes"] = min(hits, row["unique_bytes"])
        out.append(row)
    return out


def model(rows):
    for r in rows:
        dram = max(0.0, r["unique_bytes"] - r["l2_hit_bytes"])
        t = [dram / HBM_BYTES_PER_S, r["sectors"] * 32 / L2_BYTES_PER_S]
        peak = PEAKS.get(r["unit"])
        if peak:
            t.append(r["flops"] / peak)
        r["modelled_us"] = max(t) * 1e6
        r["dram_bytes"] = dram
    return rows


def step_roofline(B, D, H, W, C, dtype, backend="cuda"):
    """``(compulsory bytes, compulsory flops, roofline us)`` of ``backend``'s step in ``dtype`` ("bf16" or
    "fp32").

    The compulsory figures are the ops' own (:func:`compulsory`: the backward recomputes S, three GEMMs
    of 2 N D CK). A step may instead keep softmax(S) from the forward (what the backends do within
    ``PROTOSEG_CACHE_MB``): one GEMM fewer, N x C*K float32 written and read back more. The roofline is
    the faster of the two, each the larger of its bytes / HBM bandwidth and its flops / the peak of the
    unit the backend's GEMMs run on in that dtype (16-bit tensor cores; for fp32 maps the fp32 CUDA cores
    in ``cuda``, TF32 being off by default, and tf32x3 tensor-core products in ``triton``).
    """
    dt = "bfloat16" if dtype == "bf16" else "float32"
    cb, cf = compulsory(B, D, H, W, C, dt)
    N, CK = B * H * W, C * K
    if dtype == "bf16":
        peak = PEAKS["tensor cores (16-bit)"]
    else:
        peak = PEAKS["tensor cores (tf32x3)"] if backend == "triton" else PEAKS["fp32 cuda cores"]
    recompute = max(cb / HBM_BYTES_PER_S, cf / peak)
    cached = max((cb + 2 * N * CK * 4) / HBM_BYTES_PER_S, (cf - 2.0 * N * D * CK) / peak)
    return cb, cf, min(recompute, cached) * 1e6


def compulsory(B, D, H, W, C, dtype_name):
    """The step's compulsory bytes and flops: the ops' own figures (protoseg_ext.kernels.roofline)."""
    try:
        from protoseg_ext.kernels.roofline import h100_roofline
    except ImportError:  # a checkout without the package installed: kernels/ is protoseg_ext.kernels
        from kernels.roofline import h100_roofline

    N = B * H * W
    tot_b = tot_f = 0.0
    for op in ("embed_similarity", "embed_similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema"):
        r = h100_roofline(op, N, D, C, K, dtype_name)
        tot_b += r["bytes"]
        tot_f += r["flops"]
    return tot_b, tot_f


class _SimMeter:
    """cuda_sim's meter (torch.ops.protoseg_cudasim.cudasim_meter) as a context manager."""

    def __init__(self, sim):
        self.sim, self.events = sim, []

    def __call__(self):
        return self

    def __enter__(self):
        self.sim.cudasim_meter("start")
        return self

    def __exit__(self, *exc):
        self.sim.cudasim_meter("stop")
        self.events = json.loads(self.sim.cudasim_meter("json"))
        return False


def run(backend: str, size: str, dtype: str):
    if backend == "cuda":
        sim, torch = _cuda_backend()
        meter = _SimMeter(sim)
    else:  # the Triton kernels under the interpreter, on CPU tensors
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_model: --backend triton meters the Triton interpreter: set TRITON_INTERPRET=1")
        import torch

        from tools.triton_meter import TritonMeter

        try:
            import protoseg_ext.kernels  # noqa: F401
        except ImportError:  # a checkout without the package installed: kernels/ is protoseg_ext.kernels
            import kernels

            sys.modules["protoseg_ext.kernels"] = kernels

        meter = TritonMeter
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    B, D, H, W, C = SIZES[size]
    runs, Ns, ema_args = [], [], []
    N = B * H * W
    keep = keeps_scores(N, C, dt)
    for h, w in SMALL_HW:
        runs.append(measure_step(meter, torch, backend, B, D, h, w, C, dt, ema_args, keep))
        Ns.append(B * h * w)
    full = measure_full_update(meter, torch, backend, ema_args[-1])

    def tile_scale(loop_rows, rows):  # a tile's pixels at the real size over its rows in the measured run
        return tile_at(backend, B, H * W, loop_rows) / max(1, rows)

    rows = model(bound_by_full_update(extrapolate(runs, Ns, N, tile_scale), full))
    cb, cf, roofline_us = step_roofline(B, D, H, W, C, dtype, backend)
    flops = sum(r["flops"] for r in rows)
    launches = step_launches(meter, torch, backend, B, D, H, W, C, dt, keep)
    step = dict(compulsory_bytes=cb, unique_bytes=sum(r["unique_bytes"] for r in rows), flops=flops,
                modelled_us=sum(r["modelled_us"] for r in rows),
                roofline_us=roofline_us, launches=launches["total"], launch_counts=launches, keeps_scores=keep)
    return rows, step, dict(N=N, B=B, D=D, H=H, W=W, C=C, K=K, Ns=Ns, compulsory_flops=cf, backend=backend)


KERNEL_KEYS = ("name", "launches", "bytes_loaded", "bytes_stored", "sectors", "ideal_sectors", "unique_bytes",
               "flops", "unit", "modelled_us")


def as_json(rows, step) -> str:
    kernels = [{k: (int(round(r[k])) if isinstance(r[k], float) and k != "modelled_us" else r[k]) for k in KERNEL_KEYS}
               for r in rows]
    return json.dumps(dict(kernels=kernels, step=step), indent=1)


def as_table(rows, step, info, size, dtype) -> str:
    mb = 1e6
    lines = [
        f"Modelled H100 SXM time of the head's training step, {info['backend']} backend, {size} "
        f"(N = {info['N']:,}, D = {info['D']}, C = {info['C']}, K = {info['K']}), {dtype}",
        f"measured in the {'cuda_sim emulator' if info['backend'] == 'cuda' else 'Triton interpreter'} at N = "
        f"{', '.join(map(str, info['Ns']))} and extrapolated (see "
        "`scaling`); HBM 3.35 TB/s, L2 50 MB, 989.5 TFLOPS bf16 dense, 67 TFLOPS fp32 (NVIDIA H100 SXM "
        "datasheet); L2 5.5 TB/s (an assumption)",
        "",
        "| kernel | launches (measured) | MB loaded | MB stored | sectors / ideal | unique MB | assumed L2 hits MB "
        "| GFLOP | unit | modelled us | scaling |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["modelled_us"]):
        ratio = r["sectors"] / r["ideal_sectors"] if r["ideal_sectors"] else float("nan")
        lines.append(
            f"| {r['name']} | {r['launches']} | {r['bytes_loaded'] / mb:.1f} | {r['bytes_stored'] / mb:.1f} | "
            f"{ratio:.2f} | {r['unique_bytes'] / mb:.1f} | {r['l2_hit_bytes'] / mb:.1f} | {r['flops'] / 1e9:.2f} | "
            f"{r['unit']} | {r['modelled_us']:.1f} | {r['scaling']} |")
    lines += [
        "",
        f"step: modelled {step['modelled_us']:.1f} us (sum of the kernels; ATen ops other than the GEMMs not "
        f"metered), {step['unique_bytes'] / mb:.1f} MB unique, {step['flops'] / 1e9:.1f} GFLOP",
        f"roofline of the step: {step['roofline_us']:.1f} us ({step['compulsory_bytes'] / mb:.1f} MB compulsory, "
        f"{info['compulsory_flops'] / 1e9:.1f} GFLOP with S recomputed in the backward, or one GEMM fewer "
        "and softmax(S) kept: the faster; protoseg_ext.kernels.roofline)",
    ]
    from protoseg_ext.backends import default_cache_bytes

    s_mb = info["N"] * info["C"] * info["K"] * 4 / mb
    lines.append(f"S (N x C*K float32, {s_mb:,.0f} MB) "
                 + ("kept from the forward for the backward: within the head's default cache budget"
                    if step["keeps_scores"] else
                    "recomputed in the backward: beyond the head's default cache budget")
                 + f" (PROTOSEG_CACHE_MB: {default_cache_bytes() / (1 << 20):,.0f} MiB)")
    lc = step["launch_counts"]
    unit = "tiles" if info["backend"] == "cuda" else "chunks"
    lines.append(
        f"launches at this size: {lc['total']:,} ({lc['kernels']:,} kernels, {lc['gemms']:,} GEMMs, {lc['aten']:,} "
        f"other ATen ops) in {lc['units']:,} {unit}: {lc['fixed']['total']:.0f} + {lc['per_unit']['total']:.0f} per "
        f"{unit[:-1]} (counted in profiles of the small maps run in several {unit}"
        f"{'' if lc['linear'] else '; NOT linear in the ' + unit + ', extrapolated anyway'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["cuda", "triton"], default="cuda")
    p.add_argument("--size", choices=list(SIZES), default="cityscapes")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--json", action="store_true", help="print one JSON object: kernels and step")
    a = p.parse_args(argv)
    if a.backend == "triton":  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("PROTOSEG_TRITON_GPU_TILES", "1")  # the launchers' GPU tiles, not the interpreter's
    rows, step, info = run(a.backend, a.size, a.dtype)
    print(as_json(rows, step) if a.json else as_table(rows, step, info, a.size, a.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
