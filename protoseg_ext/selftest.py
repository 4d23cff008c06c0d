"""``python -m protoseg_ext.selftest``: does this build work on this machine's GPU?

The one command a GPU user runs to trust the build; it needs only the installed
package (and pytest), not the source tree. It

1. runs the package's GPU tests (:mod:`protoseg_ext.testing`: the op x backend
   table at small and realistic sizes - Cityscapes N=65,536 D=720 C=19, ADE20K
   C=150 - in float32, bfloat16, float16 and float64, a deterministic-mode
   rerun that must be bitwise equal, the second-GPU test where two GPUs exist,
   and the Triton-specific tests) on every GPU backend ("cuda", "triton"),
   against the eager reference, in a subprocess: a device-side assert cannot
   take the rest down with it (the tests that fire one isolate themselves);
2. runs compute-sanitizer's racecheck and memcheck on a small step when the
   tool is on PATH;
3. times a full training step of each backend (forward, prototype update,
   CE + 0.01 PPC + 0.001 PPD, backward) against the two-GEMM floor
   (S = X P^T, then S P), with the modelled H100 time of the same step
   (:mod:`protoseg_ext.modelled`) beside it where one was metered;
4. prints a pass/fail table per backend, the timing table and one RESULT line.
   Exit status: 0 passed (or nothing to check: no GPU), 1 a failure, 2 no GPU
   with ``--require-gpu``.

``--device cpu`` (or ``all``) checks the C++ CPU backend the same way.

This module is also a pytest plugin (``-p protoseg_ext.selftest``): it
records each test's (device, backend) and outcome into the JSON file named by
``PROTOSEG_SELFTEST_REPORT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPORT_ENV = "PROTOSEG_SELFTEST_REPORT"
FUSED = ("cuda", "triton", "cpu")

# ---------------------------------------------------------------- pytest plugin

_records: Dict[str, dict] = {}


def _item_group(item) -> Tuple[str, str]:
    """(device, backend) of a collected test, from its ``device_backend`` parameter."""
    if getattr(item, "module", None) is not None and item.module.__name__.endswith("test_triton"):
        return ("cuda" if torch.cuda.is_available() else "cpu"), "triton"
    spec = getattr(item, "callspec", None)
    params = getattr(spec, "params", {}) if spec is not None else {}
    db = params.get("device_backend")
    if isinstance(db, (tuple, list)) and len(db) == 2:
        return str(db[0]), str(db[1])
    dev = params.get("device")
    if isinstance(dev, (str, torch.device)):
        return str(torch.device(dev).type), "-"
    return ("cuda" if "cuda" in item.nodeid else "-"), "-"


def pytest_collection_modifyitems(session, config, items):  # noqa: D103 - pytest hook
    if not os.environ.get(REPORT_ENV):
        return
    for item in items:
        device, backend = _item_group(item)
        _records[item.nodeid] = {"device": device, "backend": backend, "outcome": None, "message": ""}


def pytest_deselected(items):  # noqa: D103 - pytest hook
    for item in items:
        _records.pop(item.nodeid, None)


def pytest_runtest_logreport(report):  # noqa: D103 - pytest hook
    if not os.environ.get(REPORT_ENV) or report.nodeid not in _records:
        return
    rec = _records[report.nodeid]
    if report.when == "call" or report.outcome != "passed":
        if rec["outcome"] in (None, "passed"):  # a failing teardown still counts
            rec["outcome"] = report.outcome
            if report.outcome == "failed":
                rec["message"] = str(getattr(report, "longreprtext", ""))[-2000:]
            elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                rec["message"] = str(report.longrepr[-1])


def pytest_sessionfinish(session, exitstatus):  # noqa: D103 - pytest hook
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": int(exitstatus), "tests": _records}, f)


# ---------------------------------------------------------------- test suite


SUITE = ("protoseg_ext.testing.test_backends", "protoseg_ext.testing.test_triton")


def run_suite(device: str, extra: Sequence[str], timeout: float) -> dict:
    """Run the package's tests of ``device`` in a subprocess; returns the plugin's JSON report (or an error)."""
    with tempfile.TemporaryDirectory(prefix="protoseg_selftest_") as tmp:
        report = os.path.join(tmp, "report.json")
        env = dict(os.environ, **{REPORT_ENV: report})
        cmd = [
            sys.executable, "-m", "pytest", "--pyargs", *SUITE, "-q", "-k", _selector(device),
            "-p", "protoseg_ext.selftest", "-p", "no:cacheprovider", "-o", "addopts=", *extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"the test suite did not finish within {timeout:.0f} s", "tests": {}}
        out = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode, "tests": {}}
        if os.path.exists(report):
            with open(report) as f:
                out.update(json.load(f))
        if proc.returncode not in (0, 5) or not out["tests"]:
            out["log"] = (proc.stdout + proc.stderr)[-6000:]
        if not os.path.exists(report):
            out["error"] = "pytest ended before reporting (see the log below)"
        return out


def _selector(device: str) -> str:
    """The ``-k`` expression of a device: its table cells, and on a GPU the Triton-specific tests."""
    return f"{device}- or test_triton" if device == "cuda" else f"{device}-"


def summarise(tests: Dict[str, dict], device: str) -> Dict[str, Dict[str, int]]:
    """Counts of passed/failed/skipped per backend, for the tests of ``device``."""
    groups: Dict[str, Dict[str, int]] = {}
    for rec in tests.values():
        if rec["device"] != device:
            continue
        g = groups.setdefault(rec["backend"], {"passed": 0, "failed": 0, "skipped": 0})
        outcome = rec["outcome"] or "failed"  # collected but never reported: it crashed
        g[outcome if outcome in g else "failed"] += 1
    return groups


# ---------------------------------------------------------------- benchmark


def _time(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds (device-synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_backend(backend: str, device: str, shape: Tuple[int, int, int, int], dtype: torch.dtype,
                  warmup: int = 2, reps: int = 5) -> Dict[str, object]:
    """Median ms of a full training step of ProtoSegHead on ``backend`` and of the two-GEMM floor.

    ``shape = (N, D, C, K)``; the step takes a ``(1, D, N/256, 256)`` NCHW map
    (forward, prototype update, CE + 0.01 PPC + 0.001 PPD, backward). The
    floor is ``S = X P^T`` then ``S P`` at the same N, D and C*K.
    """
    from .functional import official_objective
    from .head import ProtoSegHead
    from .testing import make_inputs

    N, D, C, K = shape
    W = 256 if N % 256 == 0 else N
    feats, _, gt = make_inputs((N, D, C, K), "skewed", device=device)
    x = feats.to(dtype).t().reshape(1, D, N // W, W).contiguous()
    gt = gt.reshape(1, N // W, W)
    head = ProtoSegHead(D, C, K, backend=backend, ignore_index=-1).to(device).train()

    def step():
        xi = x.detach().requires_grad_(True)
        with torch.autocast(device, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
            out = head(xi, gt)
            loss = torch.nn.functional.cross_entropy(out.seg.float(), gt, ignore_index=-1)
        official_objective(loss, out.loss_ppc, out.loss_ppd).backward()

    X = feats.to(dtype)
    P = torch.nn.functional.normalize(torch.randn(C * K, D, device=device), dim=1).to(dtype)

    def floor():
        (X @ P.t()) @ P

    out: Dict[str, object] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out["step"] = _time(step, device, warmup, reps)
    if device == "cuda":
        out["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["floor"] = _time(floor, device, warmup, reps)
    return out


_SANITIZER_STEP = """
import torch
from protoseg_ext import ProtoSegHead
for backend in ("cuda", "triton"):
    head = ProtoSegHead(40, 5, 3, backend=backend).cuda().train()
    x = torch.randn(2, 40, 16, 12, device="cuda", requires_grad=True)
    gt = torch.randint(-1, 5, (2, 16, 12), device="cuda")
    out = head(x, gt)
    (out.seg.square().mean() + out.loss_ppc + out.loss_ppd).backward()
    torch.cuda.synchronize()
print("sanitized step done")
"""


def run_sanitizer(timeout: float) -> List[Tuple[str, str, str]]:
    """compute-sanitizer racecheck and memcheck on a small step of both GPU backends, if the tool exists."""
    import shutil

    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return [("compute-sanitizer", "-", "not on PATH: skipped")]
    rows = []
    for tool in ("memcheck", "racecheck"):
        cmd = [exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", _SANITIZER_STEP]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            ok = proc.returncode == 0 and "sanitized step done" in proc.stdout
            tail = "" if ok else (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            rows.append(("compute-sanitizer", tool, "PASS" if ok else "FAIL: " + "".join(tail)[:200]))
        except subprocess.TimeoutExpired:
            rows.append(("compute-sanitizer", tool, f"FAIL: no result within {timeout:.0f} s"))
    return rows


# ---------------------------------------------------------------- report


def _table(rows: List[Sequence[str]]) -> str:
    width = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(width[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in width))
    return "\n".join(lines)


def _header(devices: List[str]) -> List[str]:
    from . import backends, info

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bi = info.build_info()
        avail = backends.available_backends()
    lines = ["protoseg_ext self-test"]
    lines.append(f"  protoseg_ext {bi['protoseg_ext']}, torch {bi['torch (running)']}")
    if bi["compiled library error"]:
        lines.append(f"  compiled library: NOT LOADED ({bi['compiled library error']})")
    else:
        lines.append(
            f"  compiled library: built for torch {bi['torch (built against)']}, CUDA {bi['CUDA (built against)']},"
            f" arch {bi['CUDA arch list']}; backends {', '.join(bi['compiled backends'])}"
        )
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"  GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
        coverage = info.gpu_coverage()
        if coverage:
            lines.append(f"  WARNING: {coverage}")
    else:
        lines.append("  GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"  backends available here: {', '.join(avail)}; checking: {', '.join(devices)}")
    return lines


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m protoseg_ext.selftest``."""
    ap = argparse.ArgumentParser(prog="python -m protoseg_ext.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu", "all"), default="cuda",
                    help="which device's backends to check (default: cuda)")
    ap.add_argument("--no-tests", action="store_true", help="skip the test suite")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x --maxfail=3'")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the test suite may take (default 1800)")
    ap.add_argument("--shape", default="65536,720,19,10;65536,720,150,10",
                    help="benchmark N,D,C,K on the GPU, ';'-separated (default Cityscapes; ADE20K)")
    ap.add_argument("--cpu-shape", default="4096,720,19,10", help="benchmark N,D,C,K on the CPU, ';'-separated")
    ap.add_argument("--no-sanitizer", action="store_true", help="skip compute-sanitizer")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="benchmark dtypes on the GPU")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per step (median reported)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 when there is no GPU to check")
    return ap


@dataclasses.dataclass
class _Run:
    """What the checks found so far: the two tables, the notes under them, and the verdict's two flags."""

    failed: bool = False
    checked: bool = False
    notes: List[str] = dataclasses.field(default_factory=list)
    suite_rows: List[Sequence[str]] = dataclasses.field(
        default_factory=lambda: [("backend", "device", "tests", "passed", "failed", "skipped", "result")])
    bench_rows: List[Sequence[str]] = dataclasses.field(default_factory=list)


def _run_tests(run: _Run, device: str, args: argparse.Namespace) -> Dict[str, Dict[str, int]]:
    """Run the device's tests in a subprocess; return their outcome counts per backend, noting what failed."""
    if args.no_tests:
        return {}
    if importlib.util.find_spec("pytest") is None:
        run.failed = True
        run.notes.append("the tests need pytest: pip install pytest")
        return {}
    print(f"\nrunning the {device} tests: pytest --pyargs {' '.join(SUITE)} -k '{_selector(device)}' ...",
          flush=True)
    res = run_suite(device, shlex.split(args.pytest_args), args.timeout)
    groups = summarise(res.get("tests", {}), device)
    if res.get("error") or res.get("returncode") not in (0, 5):
        run.failed = True
        run.notes.append(f"{device} test suite: {res.get('error') or 'pytest exit status ' + str(res['returncode'])}")
        if res.get("log"):
            run.notes.append(res["log"])
    for rec in res.get("tests", {}).values():
        if rec["device"] == device and rec["outcome"] == "failed" and rec["message"]:
            run.notes.append(f"FAILED ({rec['backend']}): " + rec["message"].strip().splitlines()[-1][:300])
    return groups


def _add_suite_rows(run: _Run, device: str, fused: List[str], usable: Dict[str, List[str]],
                    groups: Dict[str, Dict[str, int]], no_tests: bool) -> None:
    """One row per fused backend of the device, then one per other group of its tests; updates the verdict."""
    for b in fused:
        g = groups.get(b)
        if no_tests:
            run.suite_rows.append((b, device, "-", "-", "-", "-", "not run (--no-tests)"))
        elif usable[b]:
            run.suite_rows.append((b, device, "-", "-", "-", "-", "unavailable: " + "; ".join(usable[b])[:80]))
        elif not g:
            run.suite_rows.append((b, device, "0", "0", "0", "0", "no tests ran"))
            run.failed = True
        else:
            total = sum(g.values())
            ok = g["failed"] == 0 and g["passed"] > 0
            run.failed |= not ok
            run.checked |= ok
            run.suite_rows.append((b, device, str(total), str(g["passed"]), str(g["failed"]), str(g["skipped"]),
                                   "PASS" if ok else "FAIL"))
    other = {k: v for k, v in groups.items() if k not in fused}
    for b, g in sorted(other.items()):  # tests of the device not tied to one fused backend
        total = sum(g.values())
        run.failed |= g["failed"] > 0
        run.suite_rows.append((b if b != "-" else "(other)", device, str(total), str(g["passed"]), str(g["failed"]),
                               str(g["skipped"]), "FAIL" if g["failed"] else "PASS"))


def _modelled_cell(backend: str, device: str, shape, dtype) -> str:
    """The modelled H100 step in ms (:mod:`protoseg_ext.modelled`) for the timing table, "-" where none was
    metered (the CPU, other shapes or dtypes)."""
    from .modelled import modelled_step

    m = modelled_step(backend, shape, dtype) if device == "cuda" else None
    return f"{m.step_us / 1e3:.3f}" if m else "-"


def _run_benchmarks(run: _Run, device: str, fused: List[str], args: argparse.Namespace) -> None:
    """Time every usable backend (and the reference) at each shape and dtype of the device; one row each."""
    from . import backends

    shapes = [tuple(int(x) for x in sh.split(",")) for sh in (args.shape if device == "cuda" else
                                                               args.cpu_shape).split(";")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if device == "cuda" else [torch.float32]
    for shape, dtype in [(sh, dt) for sh in shapes for dt in dtypes]:
        for b in list(fused) + ["reference"]:
            if backends.get_backend(b).not_supported_reasons(torch.device(device)):
                continue
            label = f"N={shape[0]} D={shape[1]} C={shape[2]} K={shape[3]} {str(dtype).replace('torch.', '')}"
            print(f"benchmark {b} on {device}, {label} ...", flush=True)
            try:
                r = bench_backend(b, device, shape, dtype, reps=args.reps)
            except Exception as e:  # a crash here is a failure of the build, reported, not raised
                run.failed = True
                run.notes.append(f"benchmark {b} ({label}) failed: {type(e).__name__}: {e}"[:400])
                run.bench_rows.append((b, device, label, "error", "error", "-", "-",
                                       _modelled_cell(b, device, shape, dtype)))
                continue
            peak = f"{r['peak MiB']:.0f}" if "peak MiB" in r else "-"
            run.bench_rows.append((b, device, label, f"{r['step']:.2f}", f"{r['floor']:.2f}",
                                   f"{r['step'] / r['floor']:.2f}x", peak, _modelled_cell(b, device, shape, dtype)))


def _check_device(run: _Run, device: str, args: argparse.Namespace) -> None:
    """Tests, compute-sanitizer (CUDA) and benchmark of one device's fused backends."""
    from . import backends

    fused = [b for b in FUSED if (b == "cpu") == (device == "cpu")]
    if device == "cuda" and not torch.cuda.is_available():
        for b in fused:
            run.suite_rows.append((b, device, "-", "-", "-", "-", "skipped: no GPU"))
        run.notes.append("no GPU: the CUDA and Triton backends were not checked (nothing to run them on)")
        return
    usable = {b: backends.get_backend(b).not_supported_reasons(torch.device(device)) for b in fused}
    groups = _run_tests(run, device, args)
    _add_suite_rows(run, device, fused, usable, groups, args.no_tests)
    if device == "cuda" and not args.no_sanitizer:
        print("\ncompute-sanitizer (memcheck, racecheck) on a small step ...", flush=True)
        for name, tool, result in run_sanitizer(args.timeout):
            run.suite_rows.append((name, device, "-", "-", "-", "-", f"{tool}: {result}"))
            run.failed |= result.startswith("FAIL")
    if not args.no_bench:
        _run_benchmarks(run, device, fused, args)


def _report(run: _Run, devices: List[str], gpu: bool, require_gpu: bool) -> int:
    """Print the tables, the notes and the RESULT line; return the exit status."""
    print("\nTests (each fused backend against the eager reference)")
    print(_table(run.suite_rows))
    if run.bench_rows:
        print("\nTraining step of ProtoSegHead vs. the two-GEMM floor (median ms; peak = extra GPU memory;"
              " modelled = tools/gpu_model.py's H100 SXM time for the step, from metered traffic, not a timing)")
        print(_table([("backend", "device", "problem", "step ms", "floor ms", "step/floor", "peak MiB",
                       "modelled H100 ms")] + run.bench_rows))
    for n in run.notes:
        print("\n" + n)
    print()
    counts = [r for r in run.suite_rows[1:] if r[2] not in ("-",)]
    n_failed = sum(int(r[4]) for r in counts if r[4].isdigit())
    n_total = sum(int(r[2]) for r in counts if r[2].isdigit())
    if run.failed:
        print(f"RESULT: FAIL ({n_failed} of {n_total} tests failed" + (
            "; see the notes above)" if run.notes else ")"))
        return 1
    if run.checked:
        print(f"RESULT: PASS ({n_total} tests on {', '.join(devices)})")
        return 0
    if "cuda" in devices and not gpu:
        print("RESULT: SKIPPED (no GPU: nothing was checked on a GPU; `--device cpu` checks the CPU backend)")
        return 2 if require_gpu else 0
    print("RESULT: NOTHING CHECKED")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check each chosen device's backends (tests, sanitizer, benchmark), print the report, return the exit status."""
    args = _parser().parse_args(argv)
    gpu = torch.cuda.is_available()
    devices = ["cuda", "cpu"] if args.device == "all" else [args.device]
    print("\n".join(_header(devices)), flush=True)
    run = _Run()
    for device in devices:
        _check_device(run, device, args)
    return _report(run, devices, gpu, args.require_gpu)


if __name__ == "__main__":
    sys.exit(main())
