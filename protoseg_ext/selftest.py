"""``python -m protoseg_ext.selftest``: does this build work on this machine's GPU?

The one command a GPU user runs to trust the build. It

1. runs the op test suite (``tests/`` of the source checkout) on the CUDA
   device, i.e. every test that is parametrised over ``device_backend`` with
   ``device == "cuda"``: each fused GPU backend ("cuda", "triton") against the
   eager reference (``pytest -k cuda``, in a subprocess so that a device-side
   assert cannot take this process down with it);
2. times a short benchmark of the fused backends through
   :mod:`protoseg_ext.functional` on a Cityscapes-sized step;
3. prints a pass/fail table per backend and a timing table, then one RESULT
   line. Exit status: 0 passed (or nothing to check: no GPU), 1 a failure,
   2 no GPU with ``--require-gpu``.

``--device cpu`` (or ``all``) checks the C++ CPU backend the same way.

This module is also a pytest plugin (``-p protoseg_ext.selftest``): it
records each test's (device, backend) and outcome into the JSON file named by
``PROTOSEG_SELFTEST_REPORT``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def find_tests_dir(explicit: Optional[str] = None) -> Optional[str]:
    """``tests/`` of the source checkout this package was imported from (editable install)."""
    if explicit:
        return explicit if os.path.isdir(explicit) else None
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.join(os.path.dirname(here), "tests")
    return cand if os.path.isfile(os.path.join(cand, "conftest.py")) else None


def run_suite(tests_dir: str, device: str, extra: Sequence[str], timeout: float) -> dict:
    """Run the device suite in a subprocess; returns the plugin's JSON report (or an error)."""
    with tempfile.TemporaryDirectory(prefix="protoseg_selftest_") as tmp:
        report = os.path.join(tmp, "report.json")
        env = dict(os.environ, **{REPORT_ENV: report})
        cmd = [
            sys.executable, "-m", "pytest", tests_dir, "-q", "-k", device, "-p", "protoseg_ext.selftest",
            "-p", "no:cacheprovider", "-o", "addopts=", *extra,
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


def make_step(N: int, D: int, C: int, K: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random L2-normalised inputs of one training step (10% ignored pixels)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype)
    protos = torch.nn.functional.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(device, dtype)
    gt = torch.randint(0, C, (N,), generator=g)
    gt[torch.rand(N, generator=g) < 0.1] = -1
    gt = gt.to(device)
    return feats, protos, gt


def bench_backend(backend: str, device: str, shape: Tuple[int, int, int, int], dtype: torch.dtype,
                  warmup: int = 2, reps: int = 5) -> Dict[str, object]:
    """Times (ms) of the three fused steps of ProtoSeg through the functional API."""
    from . import functional as PF

    N, D, C, K = shape
    feats, protos, gt = make_step(N, D, C, K, dtype, device)
    grad_seg = torch.randn(N, C, device=device, dtype=dtype)
    with torch.no_grad():
        seg0 = PF.proto_seg_logits(feats, protos, backend=backend)
        target, _ = PF.prototype_learning(feats, protos, gt, seg0, assign="argmax", backend=backend)

    def seg_step():
        x = feats.detach().requires_grad_(True)
        PF.proto_seg_logits(x, protos, backend=backend).backward(grad_seg)

    def learning_step():
        PF.prototype_learning(feats, protos, gt, seg0, assign="argmax", backend=backend)

    def loss_step():
        x = feats.detach().requires_grad_(True)
        ppc, ppd = PF.proto_losses(x, protos, target, backend=backend)
        (ppc + ppd).backward()

    out: Dict[str, object] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for name, fn in (("seg fwd+bwd", seg_step), ("learning", learning_step), ("losses fwd+bwd", loss_step)):
        out[name] = _time(fn, device, warmup, reps)
    if device == "cuda":
        out["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


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
    else:
        lines.append("  GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"  backends available here: {', '.join(avail)}; checking: {', '.join(devices)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protoseg_ext.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu", "all"), default="cuda",
                    help="which device's backends to check (default: cuda)")
    ap.add_argument("--no-tests", action="store_true", help="skip the test suite")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    ap.add_argument("--tests", metavar="DIR", help="the tests/ directory (default: the source checkout's)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x --maxfail=3'")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the test suite may take (default 1800)")
    ap.add_argument("--shape", default="65536,720,19,10", help="benchmark N,D,C,K on the GPU (default Cityscapes)")
    ap.add_argument("--cpu-shape", default="4096,720,19,10", help="benchmark N,D,C,K on the CPU")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="benchmark dtypes on the GPU")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per step (median reported)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 when there is no GPU to check")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    devices = ["cuda", "cpu"] if args.device == "all" else [args.device]
    print("\n".join(_header(devices)), flush=True)

    from . import backends

    failed = False
    checked = False
    notes: List[str] = []
    suite_rows = [("backend", "device", "tests", "passed", "failed", "skipped", "result")]
    bench_rows: List[Sequence[str]] = []
    tests_dir = find_tests_dir(args.tests)

    for device in devices:
        fused = [b for b in FUSED if (b == "cpu") == (device == "cpu")]
        if device == "cuda" and not gpu:
            for b in fused:
                suite_rows.append((b, device, "-", "-", "-", "-", "skipped: no GPU"))
            notes.append("no GPU: the CUDA and Triton backends were not checked (nothing to run them on)")
            continue
        usable = {b: backends.get_backend(b).not_supported_reasons(torch.device(device)) for b in fused}
        # -- tests
        groups: Dict[str, Dict[str, int]] = {}
        if args.no_tests:
            pass
        elif tests_dir is None:
            notes.append("the test suite was not found (it ships with the source checkout: pass --tests DIR)")
        else:
            print(f"\nrunning the {device} test suite: pytest {tests_dir} -k {device} ...", flush=True)
            res = run_suite(tests_dir, device, args.pytest_args.split(), args.timeout)
            groups = summarise(res.get("tests", {}), device)
            if res.get("error") or res.get("returncode") not in (0, 5):
                failed = True
                notes.append(f"{device} test suite: {res.get('error') or 'pytest exit status ' + str(res['returncode'])}")
                if res.get("log"):
                    notes.append(res["log"])
            for rec in res.get("tests", {}).values():
                if rec["device"] == device and rec["outcome"] == "failed" and rec["message"]:
                    notes.append(f"FAILED ({rec['backend']}): " + rec["message"].strip().splitlines()[-1][:300])
        for b in fused:
            g = groups.get(b)
            if args.no_tests:
                suite_rows.append((b, device, "-", "-", "-", "-", "not run (--no-tests)"))
            elif usable[b]:
                suite_rows.append((b, device, "-", "-", "-", "-", "unavailable: " + "; ".join(usable[b])[:80]))
            elif not g:
                suite_rows.append((b, device, "0", "0", "0", "0", "no tests ran"))
                if tests_dir is not None:
                    failed = True
            else:
                total = sum(g.values())
                ok = g["failed"] == 0 and g["passed"] > 0
                failed |= not ok
                checked |= ok
                suite_rows.append((b, device, str(total), str(g["passed"]), str(g["failed"]), str(g["skipped"]),
                                   "PASS" if ok else "FAIL"))
        other = {k: v for k, v in groups.items() if k not in fused}
        for b, g in sorted(other.items()):  # tests of the device not tied to one fused backend
            total = sum(g.values())
            failed |= g["failed"] > 0
            suite_rows.append((b if b != "-" else "(other)", device, str(total), str(g["passed"]), str(g["failed"]),
                               str(g["skipped"]), "FAIL" if g["failed"] else "PASS"))
        # -- benchmark
        if args.no_bench:
            continue
        shape = tuple(int(x) for x in (args.shape if device == "cuda" else args.cpu_shape).split(","))
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if device == "cuda" else [torch.float32]
        for dtype in dtypes:
            for b in list(fused) + ["reference"]:
                if backends.get_backend(b).not_supported_reasons(torch.device(device)):
                    continue
                label = f"N={shape[0]} D={shape[1]} C={shape[2]} K={shape[3]} {str(dtype).replace('torch.', '')}"
                print(f"benchmark {b} on {device}, {label} ...", flush=True)
                try:
                    r = bench_backend(b, device, shape, dtype, reps=args.reps)
                except Exception as e:  # a crash here is a failure of the build, reported, not raised
                    failed = True
                    notes.append(f"benchmark {b} ({label}) failed: {type(e).__name__}: {e}"[:400])
                    bench_rows.append((b, device, label, "error", "error", "error", "-"))
                    continue
                peak = f"{r['peak MiB']:.0f}" if "peak MiB" in r else "-"
                bench_rows.append((b, device, label, f"{r['seg fwd+bwd']:.2f}", f"{r['learning']:.2f}",
                                   f"{r['losses fwd+bwd']:.2f}", peak))

    print("\nTests (each fused backend against the eager reference)")
    print(_table(suite_rows))
    if bench_rows:
        print("\nBenchmark (median ms per step; peak = extra GPU memory)")
        print(_table([("backend", "device", "problem", "seg fwd+bwd", "learning", "losses fwd+bwd", "peak MiB")]
                     + bench_rows))
    for n in notes:
        print("\n" + n)
    print()
    if failed:
        print("RESULT: FAIL")
        return 1
    if checked:
        print("RESULT: PASS")
        return 0
    if "cuda" in devices and not gpu:
        print("RESULT: SKIPPED (no GPU: nothing was checked on a GPU; `--device cpu` checks the CPU backend)")
        return 2 if args.require_gpu else 0
    print("RESULT: NOTHING CHECKED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
