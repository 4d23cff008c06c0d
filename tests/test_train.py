"""The training script end to end, on tiny images: outputs, resume equivalence, errors, two processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL")

from protoseg_ext.train.data import export_synthetic  # noqa: E402
from protoseg_ext.train import main  # noqa: E402

TINY = [
    "--synthetic-size", "32", "64", "--synthetic-count", "8", "4", "--width", "8", "--proj-dim", "16",
    "--batch-size", "2", "--workers", "0", "--no-progress", "--log-every", "2", "--num-preds", "2",
    "--device", "cpu",  # the bitwise resume guarantee is a CPU one
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(out, *extra):
    return main(["--out", str(out), *TINY, *extra])


def test_tiny_training_run_writes_everything(tmp_path):
    metrics = run(tmp_path, "--iters", "4", "--eval-every", "2")
    for name in ("checkpoint.pt", "log.csv", "curves.png", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.tmp*"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["iters"] == 4 and saved["miou"] == pytest.approx(metrics["miou"])
    assert 0.0 <= saved["miou"] <= 1.0 and set(saved["per_class_iou"]) >= {"sky", "ground", "car"}
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("iter,lr,loss,ce,ppc,ppd") and len(rows) == 1 + 2 + 2  # 2 log rows, 2 evaluations
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iter"] == 4 and "head.prototypes" in state["model"]


@pytest.mark.parametrize("head_stride", [1, 4])
def test_loss_goes_down(tmp_path, head_stride):
    run(tmp_path, "--iters", "10", "--eval-every", "100", "--head-stride", str(head_stride), "--assign", "argmax",
        "--synthetic-count", "2", "2", "--scale-range", "1", "1", "--no-flip")  # fmt: skip
    losses = [float(r.split(",")[2]) for r in (tmp_path / "log.csv").read_text().splitlines()[1:] if r.split(",")[2]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("assign", ["argmax", "gumbel"])
def test_resume_equals_uninterrupted_run(tmp_path, assign):
    """2n iterations == n iterations, stop, resume, n more: bitwise (weights, prototypes, optimizer, RNG)."""
    common = ["--iters", "6", "--eval-every", "100", "--assign", assign, "--seed", "1"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "resumed", *common, "--stop-at", "3")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["iter"] == 3
    assert not (tmp_path / "resumed" / "metrics.json").exists()  # no evaluation when stopping early
    run(tmp_path / "resumed", *common, "--resume")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert ma == mb
    # the resumed log continues the stopped one: no row repeated or out of order
    iters = [int(r.split(",")[0]) for r in (tmp_path / "resumed" / "log.csv").read_text().splitlines()[1:]]
    assert iters == sorted(iters) and iters[-1] == 6


def test_resume_refuses_another_schedule(tmp_path):
    run(tmp_path, "--iters", "4", "--stop-at", "1")
    with pytest.raises(SystemExit, match="--iters 4"):
        run(tmp_path, "--iters", "8", "--resume")


def test_unavailable_backend_says_why(tmp_path):
    with pytest.raises(SystemExit, match="cannot run on cpu"):
        run(tmp_path, "--backend", "cuda", "--device", "cpu")


def test_file_datasets_train_end_to_end(tmp_path):
    root = export_synthetic(tmp_path / "cs", "cityscapes", train=2, val=1, size=(32, 64))
    metrics = run(tmp_path / "out", "--dataset", "cityscapes", "--data-root", str(root), "--crop", "32", "32",
                  "--iters", "2", "--eval-every", "2")  # fmt: skip
    assert len(metrics["per_class_iou"]) == 19
    assert metrics["per_class_iou"]["train"] is None  # absent from the ground truth: not in the mean


def _error_of(*argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return str(e.value)


def test_bad_datasets_stop_with_the_file_name(tmp_path):
    out = ["--out", str(tmp_path / "out"), *TINY, "--iters", "1"]
    missing = tmp_path / "nowhere"
    err = _error_of("--dataset", "cityscapes", "--data-root", str(missing), *out)
    assert err.startswith("protoseg-train: error: missing directory " + str(missing / "leftImg8bit" / "train"))

    root = export_synthetic(tmp_path / "ade", "ade20k", train=2, val=1, size=(32, 64))
    label = root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png"
    label.rename(label.with_suffix(".bak"))
    err = _error_of("--dataset", "ade20k", "--data-root", str(root), *out)
    assert "ADE_train_00000002.jpg has no label" in err
    label.with_suffix(".bak").rename(label)

    image = root / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(b"garbage")
    for workers in ("0", "1"):  # also when a loader process hits it
        err = _error_of("--dataset", "ade20k", "--data-root", str(root), *out, "--workers", workers)
        assert err.startswith(f"protoseg-train: error: cannot read image {image}"), err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
        "-m", "protoseg_ext.train", "--out", str(out), *TINY, "--iters", "3", "--eval-every", "3",
        "--synthetic-count", "8", "3", "--proto-sync", "exact",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["iters"] == 3
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["args"]["world_size"] == 2
    assert torch.isfinite(state["model"]["head.prototypes"]).all()
