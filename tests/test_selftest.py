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
