"""python -m protoseg_ext.selftest: runs the package's own tests (no source tree needed), reports, exits."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _selftest(tmp_path, *args):
    env = dict(os.environ)
    env.pop("PROTOSEG_BACKEND", None)
    # run from an empty folder: only the installed package is there to find
    return subprocess.run([sys.executable, "-m", "protoseg_ext.selftest", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)


def test_cpu_selftest_passes_from_outside_the_tree(tmp_path):
    res = _selftest(tmp_path, "--device", "cpu", "--cpu-shape", "2048,32,5,4", "--reps", "1",
                    "--pytest-args", "-k 'cpu- and (test_seg_logits_gradcheck or test_empty_batch)'")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT: PASS") and "tests on cpu" in last, out[-4000:]
    assert "PASS" in out and "step/floor" in out


def test_selftest_fails_when_no_test_runs(tmp_path):
    res = _selftest(tmp_path, "--device", "cpu", "--no-bench", "--pytest-args", "-k no_such_test")
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("RESULT: FAIL")


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="checks the no-GPU answer")
def test_no_gpu_is_reported_not_failed(tmp_path):
    res = _selftest(tmp_path, "--no-bench")
    assert res.returncode == 0 and "RESULT: SKIPPED" in res.stdout, res.stdout[-3000:]
    assert _selftest(tmp_path, "--no-bench", "--require-gpu").returncode == 2


def test_timing_table_prints_the_modelled_step_beside_the_measured_one(monkeypatch, capsys):
    """A GPU row carries the metered H100 step of its backend, shape and dtype; "-" where none was metered."""
    import argparse

    import torch

    from protoseg_ext import backends, selftest
    from protoseg_ext.modelled import MODELLED_H100, modelled_step

    class _Usable:
        def not_supported_reasons(self, device):
            return []

    monkeypatch.setattr(backends, "get_backend", lambda name: _Usable())
    monkeypatch.setattr(selftest, "bench_backend", lambda b, device, shape, dtype, reps: {"step": 2.0, "floor": 1.0})
    args = argparse.Namespace(shape="65536,720,19,10;4096,64,5,4", cpu_shape="4096,720,19,10", dtypes="bfloat16",
                              reps=1)
    run = selftest._Run(checked=True)
    selftest._run_benchmarks(run, "cuda", ["cuda", "triton"], args)
    rows = {(r[0], r[2]): r for r in run.bench_rows}
    for b in ("cuda", "triton"):
        m = modelled_step(b, (65536, 720, 19, 10), torch.bfloat16)
        assert m is MODELLED_H100[(b, 65536, 720, 19, 10, "bfloat16")]
        assert rows[(b, "N=65536 D=720 C=19 K=10 bfloat16")][-1] == f"{m.step_us / 1e3:.3f}"
        assert rows[(b, "N=4096 D=64 C=5 K=4 bfloat16")][-1] == "-"  # not metered
    assert rows[("reference", "N=65536 D=720 C=19 K=10 bfloat16")][-1] == "-"
    selftest._run_benchmarks(run, "cpu", ["cpu"], args)
    assert run.bench_rows[-1][0] == "reference" and run.bench_rows[-2][0] == "cpu" and run.bench_rows[-2][-1] == "-"
    assert selftest._report(run, ["cuda"], True, False) == 0
    out = capsys.readouterr().out
    assert "modelled H100 ms" in out and "not a timing" in out
