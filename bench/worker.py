"""Measure one provider at one size, mode after mode, in a process of its own.

``bench/run.py`` starts one worker per (provider, size, labels) so that each
peak-memory figure belongs to that provider alone. The worker prints one line
``RESULT {json}`` per mode as soon as it is measured; if the process dies (out
of memory) the parent knows which mode killed it and carries on.

Modes run in the order the parent gives (it sends update, forward, backward,
full: increasing memory). The RSS high-water mark is reset before every step
(warm-up and timed ones) and read after it: ``step_peaks_mb`` is each step's
peak in order, ``first_peak_mem_mb`` the first step's, ``peak_mem_mb`` the
highest over every step the process ran (what a training run needs: memory a
step keeps for the next one shows there, not in the first step);
``step_start_mb`` is the process's RSS as each step starts. Peaks are the
process's (torch runtime and inputs included); ``extra_mem_mb`` is
``peak_mem_mb`` less the process's memory just before the first mode (the
memory the steps need beyond their inputs). GEMMs timed in the process
(``--interleave-floor``) run outside these windows.

Also ``--provider floor``: the GEMM floor of the size, ``feats @ P.T``
(N x D x CK, forward) and ``dS @ P`` (its transpose-shaped counterpart, backward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

if __package__ in (None, ""):  # `python bench/worker.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", required=True)
    p.add_argument("--size", required=True)
    p.add_argument("--labels", default="uniform")
    p.add_argument("--modes", default="forward,backward,full,update")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a mode after this (>= 3 repeats)")
    p.add_argument("--no-ops", action="store_true", help="skip the op count")
    p.add_argument("--interleave-floor", action="store_true",
                   help="time the GEMM floor after each timed repeat, in this process (reported as floor_inproc_ms)")
    p.add_argument("--phases", action="store_true",
                   help="profile one more full step and report its time per op (self CPU ms) as phases")
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="address-space limit (CPU), 0 = none")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of this process during a block: RSS high-water mark (CPU) or max_memory_allocated (GPU).

    On Linux the RSS high-water mark is reset between modes through
    ``/proc/self/clear_refs``; where that is not allowed, ``ru_maxrss`` (the
    process's lifetime peak) is reported instead and ``kind`` says so.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device == "cuda" else "rss"

    def reset(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = _proc_status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.kind = "rss_lifetime"

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.kind == "rss":
            return _proc_status_kb("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return any(s in msg for s in ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc",
                                  "cannot allocate memory"))


# ----------------------------------------------------------------------------- timing


def _timer(device):
    import torch

    if device == "cuda":
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
    else:
        now = time.perf_counter
    return now


class StepMemory:
    """Each step's peak memory: wraps a step ``body`` so that the high-water mark is reset before it and
    read after it (on CPU through /proc/self/clear_refs; where that is refused, the lifetime peak)."""

    def __init__(self, mem):
        self.mem, self.peaks, self.starts = mem, [], []

    def wrap(self, body):
        def tracked():
            self.mem.reset()
            self.starts.append(self.mem.base)
            t = body()
            self.peaks.append(self.mem.peak())
            return t

        return tracked

    def fields(self):
        mb = lambda xs: [round(x / 2**20) for x in xs]  # noqa: E731
        return dict(first_peak_mem_mb=self.peaks[0] / 2**20, peak_mem_mb=max(self.peaks) / 2**20,
                    step_peaks_mb=mb(self.peaks), step_start_mb=mb(self.starts))


def time_repeats(body, *, repeats, warmup, max_seconds, device, after_first=None, between=None):
    """Run ``body()`` (which returns its own elapsed seconds) warmup + repeats times.

    Returns ``(first_s, [seconds of each timed repeat])``; the first warm-up call
    is reported apart (for torch.compile it is the compilation). ``after_first()``
    runs once after the first call, ``between()`` after each timed repeat;
    neither is timed.
    """
    first = body()
    if after_first is not None:
        after_first()
    for _ in range(max(0, warmup - 1)):
        body()
    times, spent = [], 0.0
    for i in range(repeats):
        t = body()
        if between is not None:
            between()
        times.append(t)
        spent += t
        if i + 1 >= min(3, repeats) and spent > max_seconds:
            break
    return first, times


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(times):
    ms = [t * 1e3 for t in times]
    return {
        "median_ms": statistics.median(ms),
        "p20_ms": _quantile(ms, 0.2),
        "p80_ms": _quantile(ms, 0.8),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "repeats": len(ms),
    }


# ----------------------------------------------------------------------------- the modes


FLOOR_CHUNK = 1 << 18  # rows per GEMM of the floor: full-resolution S would not fit in memory


def floor_body(size, mode, inputs, args):
    """The GEMM floor: ``feats @ P.T`` (N x D x CK, forward), ``dS @ P`` (backward), both (full).

    Returns a ``body()`` that runs it once and returns its seconds. The GEMMs
    read contiguous ``(N, D)`` rows (made before the clock starts when the
    process holds the NCHW map: each image's rows copied) and write into
    outputs allocated and written once before the clock starts, so the time is
    the two GEMMs' alone: no layout copy, no page faults of fresh outputs.
    Sizes above ``FLOOR_CHUNK`` rows run as GEMMs of that many rows (the time of
    a GEMM that large is its flops; only the memory differs). The copies and
    outputs are freed after each call: the provider's step windows never hold them.
    """
    import torch

    from bench.providers import image_rows

    feats, protos, gt, _ = inputs
    N, D, C, K, _ = size
    P = protos.reshape(C * K, D)
    Pt = P.t()
    now = _timer(args.device)
    rows = min(N, FLOOR_CHUNK)
    dS = torch.randn(rows, C * K, device=feats.device, dtype=feats.dtype) if mode != "forward" else None

    def body():
        images = [x.contiguous() for x in image_rows(feats)]  # (N, D) rows: a view when feats is (N, D)
        s_out = feats.new_zeros(rows, C * K) if mode in ("forward", "full", "update") else None
        g_out = feats.new_zeros(rows, D) if mode in ("backward", "full") else None
        t0 = now()
        for x in images:
            for lo in range(0, x.shape[0], rows):
                hi = min(x.shape[0], lo + rows)
                if s_out is not None:
                    torch.mm(x[lo:hi], Pt, out=s_out[: hi - lo])
                if g_out is not None:
                    torch.mm(dS[: hi - lo], P, out=g_out[: hi - lo])
        t = now() - t0
        del images, s_out, g_out
        return t

    return body


def pixel_rows(feats):
    """feats as (N, D) rows: itself, a view of a one-image map, or a copy of a larger map."""
    from bench.providers import image_rows

    import torch

    rows = image_rows(feats)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def measure_floor(size, mode, inputs, args, steps=None):
    body = floor_body(size, mode, inputs, args)
    if steps is not None:
        body = steps.wrap(body)
    return time_repeats(body, repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds,
                        device=args.device), None


def _mode_step(prov, mode, inputs, x, now):
    """``(run, body)`` of one mode: ``run()`` one untimed step (None for backward, whose forward is not
    counted), ``body()`` one step that returns the seconds of the timed part."""
    feats, protos, gt, seg = inputs
    if mode == "update":
        rows = pixel_rows(feats)

        def run():
            return prov.update(rows, protos, gt, seg)

        def body():
            t0 = now()
            run()
            return now() - t0

    elif mode == "forward":
        def run():
            return prov.forward(x, gt)

        def body():
            t0 = now()
            loss = run()
            t = now() - t0
            del loss
            return t

    elif mode == "full":
        def run():
            x.grad = None
            prov.forward(x, gt).backward()

        def body():
            t0 = now()
            run()
            return now() - t0

    elif mode == "backward":
        run = None

        def body():
            x.grad = None
            loss = prov.forward(x, gt)
            t0 = now()
            loss.backward()
            return now() - t0

    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run, body


def _count_ops(counter, prov, mode, x, gt, run):
    """Count into ``counter`` the aten ops, views and syncs of one more step (the backward alone in backward mode)."""
    if mode == "backward":
        x.grad = None
        loss = prov.forward(x, gt)
        with counter:
            loss.backward()
    else:
        with counter:
            run()
    return counter


def measure_provider(prov, size, mode, inputs, args, after_first=None, floor_times=None, steps=None):
    """Time ``mode`` of provider ``prov``; returns ``((first, times), op counter or None, phases or None)``.

    With ``floor_times`` (a list), the GEMM floor of the mode is timed after
    each timed repeat and appended to it: provider and floor then see the same
    machine state, which on a shared machine drifts over minutes.
    """
    from bench.opcount import OpCounter

    feats, protos, gt, seg = inputs
    now = _timer(args.device)
    x = prov.input(feats).detach().requires_grad_(True)  # the NCHW map (or the -rows variant's (N, D) view)
    run, body = _mode_step(prov, mode, inputs, x, now)

    if steps is not None:
        body = steps.wrap(body)
    between = None
    if floor_times is not None and mode != "update":
        fbody = floor_body(size, mode, inputs, args)
        between = lambda: floor_times.append(fbody())  # noqa: E731
    timing = time_repeats(body, repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds,
                          device=args.device, after_first=after_first, between=between)
    phases = None
    if args.phases and mode == "full" and not prov.compiled:
        phases = profile_phases(run)
    counter = None
    if not args.no_ops and not prov.compiled:  # compiled code runs fused kernels, not aten ops
        counter = _count_ops(OpCounter(), prov, mode, x, gt, run)
    return timing, counter, phases


PHASE_TOP = 10  # phases named in the breakdown; the rest are summed as "other"


def profile_phases(run):
    """Where one step's time goes, from one more step under torch.profiler.

    ``{phase: ms}``: the wall time of each op the step runs at top level (the
    forward's ops, and each autograd node of the backward, named by the
    profiler as ``evaluate_function: <Node>``), summed by name, the
    ``PHASE_TOP`` largest and the rest as ``other``; ``total`` the profiled
    step (the profiler's own cost is in it); ``gemm`` the ATen GEMMs the step
    ran (``aten::mm``/``addmm``/``bmm`` self time over every thread, divided by
    the thread count: what the two-GEMM floor measures).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench_step"):
            run()
    total = time.perf_counter() - t0
    events = prof.events()
    step = next(e for e in events if e.name == "bench_step")
    by, gemm = {}, 0.0
    for e in events:
        if e.cpu_parent is step:
            name = e.name.replace("autograd::engine::evaluate_function: ", "evaluate_function: ")
            by[name] = by.get(name, 0.0) + e.cpu_time_total / 1e3
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm"):
            gemm += e.self_cpu_time_total / 1e3
    top = sorted(by.items(), key=lambda kv: -kv[1])
    out = {k: round(v, 1) for k, v in top[:PHASE_TOP]}
    out["other"] = round(sum(v for _, v in top[PHASE_TOP:]), 1)
    out["gemm"] = round(gemm / max(1, torch.get_num_threads()), 1)
    out["total"] = round(total * 1e3, 1)
    return out


def _setup(args, size, modes):
    """``(inputs, provider)``: the step's inputs, made in place, and the provider (None for the floor)."""
    import torch

    from bench.providers import Provider, make_inputs, map_shape, official_seg

    # the map the step reads, made in place (no (N, D) copy next to it); the floor and the
    # "-rows" variant read (N, D) rows
    reads_map = args.provider != "floor" and not args.provider.endswith("-rows")
    feats, protos, gt = make_inputs(size, args.labels, device=args.device, seed=args.seed,
                                    map_shape=map_shape(size.N, size.D) if reads_map else None)
    seg = None
    if "update" in modes and args.provider != "floor":  # the update mode's input, made before it is measured
        seg = official_seg(pixel_rows(feats), protos, torch.nn.LayerNorm(size.C).to(feats.device))
    inputs = (feats, protos, gt, seg)
    prov = None
    if args.provider != "floor":
        prov = Provider(args.provider, size, args.device)
        prov.set_prototypes(inputs[1])
    return inputs, prov


def _measure_mode(prov, size, mode, inputs, args, steps):
    """``(first, times, op counter or None, extra columns)`` of one mode of the floor or a provider."""
    import torch

    extra = {}
    if prov is None:
        (first, times), counter = measure_floor(size, mode, inputs, args, steps)
        return first, times, counter, extra
    if prov.compiled:
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    floor_times = [] if args.interleave_floor else None
    (first, times), counter, phases = measure_provider(prov, size, mode, inputs, args,
                                                       floor_times=floor_times, steps=steps)
    if phases:
        extra["phases"] = json.dumps(phases)
    if floor_times:
        extra["floor_inproc_ms"] = statistics.median(floor_times) * 1e3
        extra["floor_inproc_min_ms"] = min(floor_times) * 1e3
    if prov.compiled:
        c = torch._dynamo.utils.counters
        extra["graph_breaks"] = sum(c["graph_break"].values())
        extra["graphs"] = c["stats"]["unique_graphs"]
    return first, times, counter, extra


def main():
    """Measure the modes of one provider at one size; print one ``RESULT {json}`` line per mode."""
    args = _parse()
    if args.mem_limit_gb > 0 and args.device == "cpu":
        lim = int(args.mem_limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))  # an allocation past it raises, not the OOM killer
    warnings.filterwarnings("ignore")  # Dynamo's graph-break advice; the counts are reported instead
    if args.provider.endswith("+compile"):
        # a cold compile every run, so that the first-call time means what it says
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="protoseg_bench_inductor_")

    import torch

    from bench.providers import SIZES

    size = SIZES[args.size]
    modes = [m for m in args.modes.split(",") if m]
    mem = PeakMemory(args.device)

    def emit(mode, **kw):
        print("RESULT " + json.dumps({"mode": mode, **kw}), flush=True)

    try:
        inputs, prov = _setup(args, size, modes)
    except Exception as e:  # noqa: BLE001 - reported per mode
        status = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
        for m in modes:
            emit(m, status=status)
        return
    gc.collect()
    mem.reset()
    base0 = mem.base  # the process with its inputs, before any step
    for mode in modes:
        gc.collect()
        mem.reset()
        steps = StepMemory(mem)
        try:
            first, times, counter, extra = _measure_mode(prov, size, mode, inputs, args, steps)
        except Exception as e:  # noqa: BLE001
            if args.device == "cuda":
                torch.cuda.empty_cache()
            emit(mode, status="OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        mem_fields = steps.fields()
        row = dict(status="ok", first_ms=first * 1e3, **summarise(times), **mem_fields,
                   extra_mem_mb=max(0.0, mem_fields["peak_mem_mb"] - base0 / 2**20), mem_kind=mem.kind, **extra)
        if counter is not None:
            row.update(ops=counter.ops, views=counter.views, syncs=counter.syncs, sync_detail=counter.sync_detail())
        emit(mode, **row)


if __name__ == "__main__":
    main()
