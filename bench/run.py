"""Benchmark the ProtoSeg head step: providers x sizes x modes, with the GEMM floor.

    python bench/run.py --quick                         # CI sizes, < 2 minutes
    python bench/run.py --sizes cityscapes,ade20k --providers official,vectorized,cpu --modes full
    python bench/run.py --list                          # sizes, providers, modes
    python bench/run.py --sizes cityscapes --providers cpu@baseline,cpu@avx2,cpu@avx512   # CPU kernel variants

Every (provider, size, labels) runs in a process of its own (bench/worker.py),
so peak memory is that provider's alone and an out-of-memory death is reported
as ``OOM`` rather than ending the run; sizes whose estimated memory exceeds the
machine are reported as ``skipped: needs ~X GB``.

The GEMM floor (``feats @ P.T`` and ``dS @ P`` on contiguous ``(N, D)`` rows,
into outputs allocated before the clock starts) is one definition, timed two
ways: in a process of its own, run in rounds interleaved with the providers'
(``--rounds``: each round runs the floor and then every provider once, each in a
fresh process; each is reported by its best round), giving ``x_floor``; and, up
to 262,144 pixels, in each provider's process after each of its repeats
(``floor_inproc_ms``, ``x_floor_inproc``). ``x_floor_strict`` is the larger
ratio, the one to quote. Peak memory is the highest over every step a provider
ran (``peak_mem_mb``), with the first step's beside it (``first_peak_mem_mb``). Rows are appended to ``bench/results/bench.csv`` (with
machine, torch, commit and time); this run's table goes to ``bench.md`` and its
chart to ``bench.png`` (``python bench/plot.py`` redraws both from the CSV).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import plot as report  # noqa: E402
from bench.providers import (  # noqa: E402
    GiB,
    LABELS,
    MODES,
    PROVIDERS,
    SIZES,
    estimate_bytes,
    total_memory_bytes,
    unavailable_reason,
)

from bench.worker import FLOOR_CHUNK  # noqa: E402

WORKER = os.path.join(HERE, "worker.py")
MODE_RUN_ORDER = ("update", "forward", "backward", "full")  # increasing memory: see worker.py
CPU_ISAS = ("baseline", "avx2", "avx512")  # cpu@<variant>: the worker runs with PROTOSEG_CPU_ISA=<variant>
QUICK = dict(sizes="tiny,small", providers="official,vectorized,cpu", modes=",".join(MODES), labels="uniform",
             repeats=3, warmup=1, max_seconds=3.0, rounds=1)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"CI run: sizes {QUICK['sizes']}, providers {QUICK['providers']}, all modes, "
                        f"{QUICK['repeats']} repeats (explicit options still win)")
    p.add_argument("--sizes", help=f"comma list of {','.join(SIZES)} (default: all but tiny,small)")
    p.add_argument("--providers", help=f"comma list of {','.join(PROVIDERS)} (default: all that run here); "
                                       f"cpu@{'|'.join(CPU_ISAS)} runs cpu with that CPU kernel variant")
    p.add_argument("--modes", help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--labels", help="uniform, skewed or both (default: uniform,skewed)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--repeats", type=int, help="timed repeats per mode in each round (default 3)")
    p.add_argument("--rounds", type=int, help="rounds (default 3): each runs the floor and every provider once, "
                                              "in turn, each in a fresh process; the best round is reported")
    p.add_argument("--phases", action="store_true",
                   help="profile one more full step of each provider: its time per phase (op) in the output")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1; the first is reported as first_ms)")
    p.add_argument("--max-seconds", type=float, help="stop repeating a mode after this many seconds, "
                                                     "once 3 repeats are in (default 60)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one worker process may take")
    p.add_argument("--mem-fraction", type=float, default=0.9,
                   help="skip a run whose estimated memory exceeds this fraction of the machine's (CPU) or GPU's")
    p.add_argument("--no-floor", action="store_true", help="do not time the GEMM floor")
    p.add_argument("--no-ops", action="store_true", help="do not count ops (saves one step per mode)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the sizes, providers and modes and exit")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    defaults = dict(sizes="cityscapes,ade20k,cocostuff,d256,fullres,fullres-ade20k", providers=None,
                    modes=",".join(MODES), labels=",".join(LABELS), repeats=3, warmup=1, max_seconds=60.0,
                    rounds=3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK[k] if args.quick else v)
    return args


# ----------------------------------------------------------------------------- run metadata


def machine_info(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = "AVX-512" if " avx512f" in text else ("AVX2" if " avx2" in text else "")
    except OSError:
        pass
    desc = f"{cpu}{' ' + flags if flags else ''}, {os.cpu_count()} cores, {total_memory_bytes('cpu') / GiB:.0f} GiB"
    if device == "cuda":
        import torch

        desc += f"; {torch.cuda.get_device_name(0)}"
    return desc


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------- workers


def split_isa(provider):
    """``cpu@avx2`` -> ``("cpu", "avx2")``; any other provider -> ``(provider, None)``."""
    base, _, isa = provider.partition("@")
    return base, (isa or None)


def _provider_order(provider):
    base, isa = split_isa(provider)
    return PROVIDERS.index(base), -1 if isa is None else CPU_ISAS.index(isa)


def provider_unavailable(provider, device):
    """unavailable_reason, and for cpu@<variant> whether this build and CPU run that variant."""
    base, isa = split_isa(provider)
    reason = unavailable_reason(base, device)
    if reason is None and isa is not None:
        from protoseg_ext import ops

        supported = ops.load_extension().cpu_isa_supported()
        if isa not in supported:
            reason = f"this CPU does not run the {isa} kernels (it runs {', '.join(supported)})"
    return reason


def run_worker(provider, size, labels, modes, args, log):
    """Run ``modes`` of one provider in its own process(es); returns ``{mode: result dict}``.

    A worker that dies mid-mode (OOM killer, crash, timeout) costs that mode
    only: the mode is reported and a fresh worker takes the remaining ones.
    """
    results = {}
    todo = [m for m in MODE_RUN_ORDER if m in modes]
    # address-space cap of a CPU worker: its share of RAM plus the ~3 GB of address space torch maps
    # without using it; an allocation past it raises (reported as OOM) before the kernel's OOM killer
    # picks a victim on a shared machine
    mem_limit = total_memory_bytes("cpu") * args.mem_fraction / GiB + 3 if args.device == "cpu" else 0
    # torch.compile: a process per mode, so that each mode's first call is a cold compile
    per_process = 1 if provider.endswith("+compile") else len(todo)
    while todo:
        batch = todo[:per_process]
        base, isa = split_isa(provider)
        env = dict(os.environ, PROTOSEG_CPU_ISA=isa) if isa else None
        cmd = [sys.executable, WORKER, "--provider", base, "--size", size, "--labels", labels,
               "--modes", ",".join(batch), "--device", args.device, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds), "--seed", str(args.seed),
               "--mem-limit-gb", f"{mem_limit:.1f}"]
        if args.no_ops:
            cmd.append("--no-ops")
        if args.phases and provider != "floor":
            cmd.append("--phases")
        if not args.no_floor and SIZES[size].N <= FLOOR_CHUNK:  # the floor's own buffers stay small
            cmd.append("--interleave-floor")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, env=env)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "", "timeout"
        for line in out.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                results[r.pop("mode")] = r
        missing = [m for m in batch if m not in results]
        todo = [m for m in todo if m not in results]
        if not missing:
            continue
        if rc == "timeout":
            status = f"timeout after {args.timeout:.0f} s"
        elif rc in (-9, 137):
            status = "OOM (killed)"
        else:
            tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit code {rc}"]
            status = f"error: {tail[0][:200]}"
        results[missing[0]] = {"status": status}
        todo.remove(missing[0])
        log(f"    {provider} {size} {missing[0]}: {status} ({time.perf_counter() - t0:.0f} s)")
    return results


def combine_rounds(results):
    """One row from a provider's rounds (each ``{status, median_ms, ...}``): the round with the lowest
    median, with every round's median (``round_ms``), the highest peak over all the steps of all the
    rounds (``peak_mem_mb``; ``first_peak_mem_mb``: the highest first-step peak) and the lowest
    in-process floor. No round ok: the first round's status."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return dict(results[0]) if results else {"status": "not run"}
    best = dict(min(ok, key=lambda r: r["median_ms"]))
    most = max(ok, key=lambda r: r["peak_mem_mb"])
    best.update(rounds=len(ok), round_ms=";".join(f"{r['median_ms']:.1f}" for r in ok),
                peak_mem_mb=most["peak_mem_mb"], extra_mem_mb=most["extra_mem_mb"],
                first_peak_mem_mb=max(r["first_peak_mem_mb"] for r in ok),
                step_peaks_mb=";".join(str(v) for v in most["step_peaks_mb"]),
                step_start_mb=";".join(str(v) for v in most["step_start_mb"]))
    inproc = [r["floor_inproc_ms"] for r in ok if "floor_inproc_ms" in r]
    if inproc:
        best["floor_inproc_ms"] = min(inproc)
    if len(ok) < len(results):
        best["failed_rounds"] = "; ".join(r.get("status", "?") for r in results if r.get("status") != "ok")
    return best


def add_ratios(r, floor_ms, official_ms):
    """``x_floor`` (the floor timed in its own process, interleaved), ``x_floor_inproc`` (timed in the
    provider's process after each repeat), ``x_floor_strict`` (the larger), ``vs_official``."""
    if floor_ms:
        r["floor_ms"] = floor_ms
        r["x_floor"] = r["median_ms"] / floor_ms
    if r.get("floor_inproc_ms"):
        r["x_floor_inproc"] = r["median_ms"] / r["floor_inproc_ms"]
    xs = [r[k] for k in ("x_floor", "x_floor_inproc") if k in r]
    if xs:
        r["x_floor_strict"] = max(xs)
    if official_ms:
        r["vs_official"] = official_ms / r["median_ms"]


def _print_list():
    """``--list``: the sizes, providers, modes and label sets."""
    for name, s in SIZES.items():
        print(f"size {name:16s} N={s.N:>9,} D={s.D:>4} C={s.C:>3} K={s.K:>2}  {s.about}")
    print("providers:", ", ".join(PROVIDERS))
    print("modes:", ", ".join(MODES))
    print("labels:", ", ".join(LABELS))


def _choices(args):
    """The sizes, modes, label sets and providers the options name, checked; providers in report order."""
    sizes = [s for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    labels_list = [lab for lab in args.labels.split(",") if lab]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; known: {', '.join(SIZES)}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    for lab in labels_list:
        if lab not in LABELS:
            raise SystemExit(f"unknown labels {lab!r}; known: {', '.join(LABELS)}")
    if args.providers is not None:
        providers = [p for p in args.providers.split(",") if p]
        for p in providers:
            base, isa = split_isa(p)
            if base not in PROVIDERS or (isa is not None and (base != "cpu" or isa not in CPU_ISAS)):
                raise SystemExit(f"unknown provider {p!r}; known: {', '.join(PROVIDERS)}, "
                                 f"{', '.join('cpu@' + i for i in CPU_ISAS)}")
        # official first: the others compare with it
        providers = sorted(set(providers), key=_provider_order)
    else:  # all that can run here; an explicitly named one that cannot gets an "unavailable" row
        providers = [p for p in PROVIDERS if unavailable_reason(p, args.device) is None]
    return sizes, modes, labels_list, providers


def _run_meta(device, torch_version):
    """The columns every CSV row of this run carries: run id, time, machine, device, torch, commit."""
    return dict(
        run_id=datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=machine_info(device),
        device=device,
        torch=torch_version,
        commit=git_commit(),
    )


def _prepare_csv(csv_path):
    """Whether the CSV is new; one written by an older harness is rewritten with today's columns."""
    new_file = not os.path.exists(csv_path)
    if not new_file:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != report.FIELDS:  # written by an older harness: rewrite it with today's columns
            old = report.read_csv(csv_path)
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=report.FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
    return new_file


def _plan(size, modes, labels_list, providers, args, capacity):
    """What runs at one size: ``(provider, labels, modes, fixed)``, the floor first; ``fixed`` is
    ``{mode: result}`` for a provider that cannot run (unavailable, or too big), else None."""
    floor_modes = [m for m in modes if m != "update"] if not args.no_floor else []
    plan = []
    if floor_modes:
        need = estimate_bytes("floor", size)
        plan.append(("floor", labels_list[0], floor_modes,
                     {m: {"status": f"skipped: needs ~{need / GiB:.0f} GB of {capacity / GiB:.0f}"}
                      for m in floor_modes} if need > capacity else None))
    for labels in labels_list:
        for prov in providers:
            reason = provider_unavailable(prov, args.device)
            need = estimate_bytes(split_isa(prov)[0], size)
            fixed = None
            if reason is not None:
                fixed = {m: {"status": f"unavailable: {reason}"} for m in modes}
            elif need > capacity:
                fixed = {m: {"status": f"skipped: needs ~{need / GiB:.0f} GB of {capacity / GiB:.0f}"}
                         for m in modes}
            plan.append((prov, labels, modes, fixed))
    return plan


def _run_rounds(plan, size_name, args, log):
    """Run the plan's rounds; returns ``{(provider, labels): [{mode: result} per round]}``.

    Each round runs the floor and every provider once, in turn, each in a process of its own, so that all
    see the machine's state of the same minutes; the best round of each is reported."""
    per_round = {(prov, labels): [] for prov, labels, _, _ in plan}
    for rnd in range(args.rounds):
        for prov, labels, pmodes, fixed in plan:
            if fixed is not None:
                continue
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            res = run_worker(prov, size_name, labels, pmodes, args, log)
            for r in res.values():
                r.setdefault("load1", round(load, 2))
            per_round[(prov, labels)].append(res)
            log(f"  {size_name} {labels} {prov} round {rnd + 1}/{args.rounds}: "
                f"{time.perf_counter() - t0:.0f} s")
    return per_round


def _log_result(log, m, prov, r):
    """One line per (mode, provider): its time, spread, peaks and ratios, or its status."""
    if r.get("status") != "ok":
        log(f"    {m:8s} {prov:16s} {r['status']}")
        return
    log(f"    {m:8s} {prov:16s} {r['median_ms']:10.1f} ms  "
        f"[{r['p20_ms']:.1f}-{r['p80_ms']:.1f}]  peak {r['peak_mem_mb']:.0f} MB "
        f"(first step {r['first_peak_mem_mb']:.0f})"
        + (f"  x{r['x_floor']:.2f} floor" if "x_floor" in r else "")
        + (f" (in-process floor: x{r['x_floor_inproc']:.2f})" if "x_floor_inproc" in r else "")
        + (f"  ops {r['ops']} syncs {r['syncs']}" if "ops" in r else "")
        + (f"\n      phases {r['phases']}" if r.get("phases") else ""))


def _results(plan, per_round, log):
    """Yield ``(provider, labels, mode, row)``: each provider's rounds combined, with its ratios to the floor
    and to official (both come first in the plan)."""
    floor, official = {}, {}  # mode -> ms; (labels, mode) -> ms
    for prov, labels, pmodes, fixed in plan:
        for m in pmodes:
            r = dict(fixed[m]) if fixed is not None else combine_rounds(
                [res.get(m, {"status": "not run"}) for res in per_round[(prov, labels)]])
            if r.get("status") == "ok":
                if prov == "floor":
                    floor[m] = r["median_ms"]
                elif prov == "official":
                    official[(labels, m)] = r["median_ms"]
                add_ratios(r, floor.get(m), official.get((labels, m)) if prov != "official" else None)
            _log_result(log, m, prov, r)
            yield prov, labels, m, r


def _write_report(rows, out_dir, csv_path, t_start, log):
    """This run's markdown table and chart, then the closing log line."""
    md_path = os.path.join(out_dir, "bench.md")
    png_path = os.path.join(out_dir, "bench.png")
    report.write_markdown(rows, md_path)
    try:
        report.plot(rows, png_path)
    except ImportError:
        png_path = "(no PNG: matplotlib is not installed)"
    log(f"done in {time.perf_counter() - t_start:.0f} s: {csv_path}, {md_path}, {png_path}")


def main(argv=None):
    """Run the chosen providers x sizes x labels x modes; append the rows to the CSV, write the table and chart."""
    args = _parse(argv)
    if args.list:
        _print_list()
        return 0
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    sizes, modes, labels_list, providers = _choices(args)

    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "bench.csv")
    meta = _run_meta(args.device, torch.__version__)
    log(f"run {meta['run_id']}: {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
    new_file = _prepare_csv(csv_path)
    rows = []
    capacity = total_memory_bytes(args.device) * args.mem_fraction
    t_start = time.perf_counter()

    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=report.FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for size_name in sizes:
            size = SIZES[size_name]
            shape = dict(size=size_name, N=size.N, D=size.D, C=size.C, K=size.K)
            plan = _plan(size, modes, labels_list, providers, args, capacity)
            per_round = _run_rounds(plan, size_name, args, log)
            for prov, labels, m, r in _results(plan, per_round, log):
                row = {**meta, **shape, "labels": labels, "provider": prov, "mode": m, **r}
                rows.append(row)
                writer.writerow(row)
                f.flush()

    _write_report(rows, args.out_dir, csv_path, t_start, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
