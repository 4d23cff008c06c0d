"""The training script end to end, on tiny images: outputs, resume equivalence, errors, two processes."""

import csv
import importlib.util
import math
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from protoseg_ext.train.data import IGNORE_INDEX, export_synthetic  # noqa: E402
from protoseg_ext.train import main  # noqa: E402
from protoseg_ext.train import loop  # noqa: E402
from protoseg_ext.train.model import prototype_cosine  # noqa: E402

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
    for it in (2, 4):
        for kind in ("similarity", "embedding"):
            assert (tmp_path / "pictures" / f"{kind}_iter{it:06d}.png").is_file()
    assert -1.0 <= saved["prototype_cosine"] <= 1.0 and set(saved["prototype_cosine_per_class"]) == set(saved["per_class_iou"])
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("iter,lr,loss,ce,ppc,ppd") and len(rows) == 1 + 2 + 2  # 2 log rows, 2 evaluations
    assert rows[0].endswith(",miou,proto_cos,protos_in_use")
    assert rows[-1].split(",")[-2] == f"{saved['prototype_cosine']:.6g}"
    usage = saved["prototype_usage"]
    assert rows[-1].split(",")[-1] == f"{usage['mean_in_use']:.6g}"
    assert usage["num_prototype"] == 10 and set(usage["per_class"]) <= set(saved["per_class_iou"])
    for name, u in usage["per_class"].items():
        assert len(u["counts"]) == 10 and sum(u["counts"]) == u["pixels"] > 0
        assert u["in_use"] == sum(c >= 0.01 * u["pixels"] and c > 0 for c in u["counts"])
    # every labeled validation pixel counted once (head at full resolution: the label size)
    labels = [loop.build_dataset("synthetic", "val", synthetic_size=[32, 64], synthetic_count=[8, 4], seed=0,
                                 root=None).load(i)[1] for i in range(4)]  # fmt: skip
    assert sum(u["pixels"] for u in usage["per_class"].values()) == sum(int((lb != IGNORE_INDEX).sum()) for lb in labels)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iter"] == 4 and "head.prototypes" in state["model"]
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["iter"] == 2  # the one before, kept


@pytest.mark.parametrize("head_stride", [1, 4])
def test_loss_goes_down(tmp_path, head_stride):
    run(tmp_path, "--iters", "10", "--eval-every", "100", "--head-stride", str(head_stride), "--assign", "argmax",
        "--synthetic-count", "2", "2", "--scale-range", "1", "1", "--no-flip")  # fmt: skip
    losses = [float(r.split(",")[2]) for r in (tmp_path / "log.csv").read_text().splitlines()[1:] if r.split(",")[2]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("assign", ["argmax", "gumbel", "sample"])
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


def test_multi_look_scenes_train_and_belong_to_the_schedule(tmp_path):
    run(tmp_path, "--iters", "2", "--eval-every", "2", "--synthetic-looks", "3", "--num-pictures", "0")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"]["synthetic_looks"] == 3
    with pytest.raises(SystemExit, match="--synthetic-looks 3"):  # other scenes: not the same run
        run(tmp_path, "--iters", "2", "--resume")
    with pytest.raises(SystemExit):
        main(["--dataset", "cityscapes", "--data-root", str(tmp_path), "--synthetic-looks", "3"])


def test_unavailable_backend_says_why(tmp_path):
    with pytest.raises(SystemExit, match="cannot run on cpu"):
        run(tmp_path, "--backend", "cuda", "--device", "cpu")


@pytest.mark.parametrize("label_ids", [False, True])
def test_file_datasets_train_end_to_end(tmp_path, label_ids):
    root = export_synthetic(tmp_path / "cs", "cityscapes", train=2, val=1, size=(32, 64), label_ids=label_ids)
    metrics = run(tmp_path / "out", "--dataset", "cityscapes", "--data-root", str(root), "--crop", "32", "32",
                  "--iters", "2", "--eval-every", "2")  # fmt: skip
    assert len(metrics["per_class_iou"]) == 19 and len(metrics["prototype_cosine_per_class"]) == 19
    scored = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert metrics["miou"] == pytest.approx(sum(scored) / len(scored))


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


# ---------------------------------------------------------------- evaluation as cityscapesscripts does it


def cityscapes_official_ious(gt_ids, pred_ids):
    """The rule of cityscapesscripts' evalPixelLevelSemanticLabeling, stated independently, in
    labelId space: confusion over every ground-truth labelId (0..33); false positives count only
    on pixels whose ground truth is evaluated; IoU = TP / (TP + FP + FN), NaN when that is 0;
    the mean over the non-NaN classes."""
    from protoseg_ext.train.data import CITYSCAPES_EVAL_IDS

    conf = np.zeros((34, 34), np.int64)
    np.add.at(conf, (gt_ids.ravel(), pred_ids.ravel()), 1)
    evaluated = list(CITYSCAPES_EVAL_IDS)
    ious = []
    for i in evaluated:
        tp = conf[i, i]
        fn = conf[i, :].sum() - tp
        fp = conf[[j for j in evaluated if j != i], i].sum()
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    return conf, ious, float(np.nanmean(ious))


class ReplayNet(torch.nn.Module):
    """Stands in for the network in evaluate(): returns the given predictions, image by image."""

    def __init__(self, preds, num_classes):
        super().__init__()
        self.preds, self.C = list(preds), num_classes
        self.head = torch.nn.Module()
        self.head.register_buffer("prototypes", torch.nn.functional.normalize(torch.randn(num_classes, 3, 4), dim=-1))
        self.head.num_prototype = 3

    def forward(self, image):
        pred = torch.from_numpy(self.preds.pop(0)).long()
        return torch.nn.functional.one_hot(pred, self.C).permute(2, 0, 1)[None].float(), None

    def predict(self, image, label):
        return self(image)[0], torch.zeros(self.C, 3, dtype=torch.int64)


def test_evaluation_matches_the_official_cityscapes_rule(tmp_path):
    from PIL import Image
    from protoseg_ext.train.data import CITYSCAPES_EVAL_IDS, CityscapesDataset, cityscapes_id_to_train_id

    root = export_synthetic(tmp_path / "cs", "cityscapes", train=1, val=3, size=(16, 24), label_ids=True)
    val = CityscapesDataset(root, "val")
    rng = np.random.default_rng(0)
    table, eval_ids = cityscapes_id_to_train_id(), np.array(CITYSCAPES_EVAL_IDS)
    gts, preds = [], []
    for i, (_, path) in enumerate(val.pairs):
        # ground truth: a few evaluated classes and some ignored ids (0, 1, 4, 30); never "train" (31) or "bus" (28)
        gt = rng.choice([0, 1, 4, 30, 7, 8, 11, 23, 26, 24], size=(16, 24)).astype(np.uint8)
        pred = rng.choice(eval_ids[[0, 1, 2, 10, 13, 11, 16]], size=(16, 24))  # "train" predicted, "bus" never
        pred = np.where(rng.random((16, 24)) < 0.5, gt, pred)
        pred = np.where(table[pred] == IGNORE_INDEX, 7, pred)
        Image.fromarray(gt).save(path)
        gts.append(gt), preds.append(pred)
    args = loop.parse_args(["--dataset", "cityscapes", "--data-root", str(root), "--workers", "0", "--num-preds", "0"])
    net = ReplayNet([table[p] for p in preds], 19)
    metrics = loop.evaluate(net, val, args, torch.device("cpu"), 0, 1, tmp_path / "out")
    _, ious, miou = cityscapes_official_ious(np.stack(gts), np.stack(preds))
    for name, iou in zip(val.class_names, ious):
        if np.isnan(iou):
            assert metrics["per_class_iou"][name] is None, name
        else:
            assert metrics["per_class_iou"][name] == pytest.approx(iou), name
    assert metrics["per_class_iou"]["train"] == 0.0  # absent from the ground truth, predicted: counts as 0
    assert metrics["per_class_iou"]["bus"] is None  # neither: left out of the mean
    assert metrics["miou"] == pytest.approx(miou)


@pytest.mark.parametrize("head_stride", [1, 4])
def test_prototype_usage_counts_the_nearest_prototype_of_the_class(head_stride):
    """ProtoSegNet.predict's usage against a brute-force count over the head's embeddings."""
    from protoseg_ext.train.model import ProtoSegNet, prototype_usage

    torch.manual_seed(0)
    net = ProtoSegNet(4, proj_dim=8, width=4, num_prototype=3, head_stride=head_stride, ignore_index=255,
                      backend="reference").eval()  # fmt: skip
    images = torch.randn(2, 3, 16, 24)
    labels = torch.randint(0, 4, (2, 16, 24))
    labels[:, :3] = 255
    labels[labels == 2] = 255  # class 2 absent
    seg, usage = net.predict(images, labels, chunk=100)  # several chunks
    torch.testing.assert_close(seg, net(images)[0])
    emb = net._head_input(images, labels.shape[-2:])
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=emb.shape[-2:], mode="nearest")[:, 0].long()
    x = net.head.embed(emb)  # (N, D), LayerNorm and L2 as the head does
    gt = small.reshape(-1)
    P = torch.nn.functional.normalize(net.head.prototypes, dim=-1)
    want = torch.zeros(4, 3, dtype=torch.int64)
    for n in torch.nonzero(gt != 255)[:, 0].tolist():
        c = int(gt[n])
        want[c, int((P[c] @ x[n]).argmax())] += 1
    assert torch.equal(usage, want) and usage[2].sum() == 0 and usage.sum() == (gt != 255).sum()
    u = prototype_usage(torch.tensor([[97, 2, 1], [0, 0, 0], [50, 50, 0]]), min_share=0.015)
    assert u["in_use"].tolist() == [2, 0, 2] and u["pixels"].tolist() == [100, 0, 100]
    assert net.predict(images)[1] is None


def test_prototype_cosine():
    e = torch.eye(4)
    protos = torch.stack([e[:3], e[[0, 0, 0]], torch.stack([e[0], e[0], -e[0]])])  # (3 classes, K=3, D=4)
    cos = prototype_cosine(protos)
    torch.testing.assert_close(cos, torch.tensor([0.0, 1.0, -1.0 / 3], dtype=torch.float64))
    assert prototype_cosine(torch.randn(2, 1, 4)).tolist() == [1.0, 1.0]


def test_similarity_picture_is_grey_for_collapsed_prototypes():
    feats = torch.nn.functional.normalize(torch.randn(6, 8, 5), dim=-1)
    mask = torch.ones(6, 8, dtype=torch.bool)
    same = torch.nn.functional.normalize(torch.randn(1, 5), dim=-1).expand(4, 5)
    grey, _ = loop.similarity_rgb(feats, same, mask, (12, 16))
    assert grey.shape == (12, 16, 3) and np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 0], grey[..., 2])
    apart, picks = loop.similarity_rgb(feats, torch.eye(5)[:4], mask, (12, 16))
    assert len(set(picks)) == 3 and not np.allclose(apart[..., 0], apart[..., 1])
    assert 0.0 <= apart.min() and apart.max() <= 1.0


# ---------------------------------------------------------------- recipe


def test_recipe_sets_the_official_setting_and_flags_override(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    a = loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs"])
    assert (a.dataset, a.backbone, a.iters, a.batch_size, a.crop) == ("cityscapes", "hrnet_w48", 80000, 2, [512, 1024])
    assert (a.lr, a.momentum, a.weight_decay, a.poly_power, a.gamma) == (0.01, 0.9, 5e-4, 0.9, 0.999)
    assert (a.ppc_weight, a.ppd_weight, a.num_prototype, a.head_stride, a.proj_dim) == (0.01, 0.001, 10, 4, 720)
    b = loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs", "--iters", "100", "--batch-size", "1",
                         "--crop", "256", "512", "--backbone", "hrnet_w18_small_v2"])  # fmt: skip
    assert (b.iters, b.batch_size, b.crop, b.backbone, b.lr) == (100, 1, [256, 512], "hrnet_w18_small_v2", 0.01)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs"])
    assert loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs", "--batch-size", "3"]).batch_size == 3


def test_recipe_holds_the_official_cityscapes_run(monkeypatch):
    """The preset against the official run's values, written out here from tfzhou/ProtoSeg
    configs/cityscapes/H_48_D_4_proto.json (loss.params.ce_weight, train_trans.random_brightness,
    train_trans.random_resize, network.bn_type "torchsyncbn", data.workers 8) and
    scripts/cityscapes/hrnet/run_h_48_d_4_proto.sh (MAX_ITERS 80000, BATCH_SIZE 8, BASE_LR 0.01)."""
    ce_weight = [0.8373, 0.9180, 0.8660, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843,
                 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "1")
    a = loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs"])
    assert a.ce_weight == ce_weight
    assert a.brightness == 10 and a.aspect_range == [0.9, 1.1] and a.scale_range == [0.5, 2.0] and not a.no_flip
    assert a.sync_bn and a.workers == 8 and (a.iters, a.batch_size, a.lr) == (80000, 8, 0.01)
    b = loop.parse_args(["--recipe", "cityscapes-hrnet48", "--data-root", "cs", "--brightness", "0", "--no-sync-bn",
                         "--aspect-range", "1", "1", "--ce-weight", *["1"] * 19])  # fmt: skip
    assert (b.brightness, b.sync_bn, b.aspect_range, b.ce_weight) == (0, False, [1.0, 1.0], [1.0] * 19)
    plain = loop.parse_args([])  # without the recipe: none of them
    assert (plain.brightness, plain.aspect_range, plain.ce_weight) == (0, [1.0, 1.0], None)
    for bad in (["--brightness", "-1"], ["--aspect-range", "1.1", "0.9"]):
        with pytest.raises(SystemExit):
            loop.parse_args(bad)


def test_workers_capped_at_the_cores(monkeypatch):
    monkeypatch.setattr(loop, "available_cores", lambda: 6)
    assert loop.cap_workers(8) == 6 and loop.cap_workers(8, local_processes=4) == 1
    assert loop.cap_workers(2, local_processes=2) == 2 and loop.cap_workers(4, local_processes=2) == 3
    assert loop.cap_workers(0) == 0 and loop.cap_workers(1, local_processes=16) == 1


def test_sync_batchnorm_under_ddp_on_gpus():
    from protoseg_ext.train.model import ProtoSegNet

    def kinds(net):
        return {type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    assert kinds(loop.sync_batchnorm(ProtoSegNet(3, proj_dim=8, width=4), True, 2, torch.device("cuda"))) == {
        "SyncBatchNorm"}  # fmt: skip
    for enabled, world, dev in ((False, 2, "cuda"), (True, 1, "cuda"), (True, 2, "cpu")):
        assert kinds(loop.sync_batchnorm(ProtoSegNet(3, proj_dim=8, width=4), enabled, world, torch.device(dev))) == {
            "BatchNorm2d"}  # fmt: skip


def test_weighted_cross_entropy_is_the_official_mean():
    from protoseg_ext.train.model import ProtoSegNet

    torch.manual_seed(0)
    w = [0.5, 1.0, 2.0]
    net = ProtoSegNet(3, proj_dim=8, width=4, num_prototype=2, ignore_index=255, ce_weight=w, backend="reference")
    images, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    labels[0, :4] = 255
    seg, losses = net(images, labels)
    want = torch.nn.CrossEntropyLoss(weight=torch.tensor(w), ignore_index=255)(seg, labels)  # reduction "mean"
    torch.testing.assert_close(losses["ce"], want)
    plain = torch.nn.CrossEntropyLoss(ignore_index=255)(seg, labels)
    assert not torch.allclose(losses["ce"], plain)
    assert "ce_weight" not in net.state_dict()  # checkpoints stay as they were
    with pytest.raises(ValueError, match="ce_weight"):
        ProtoSegNet(3, proj_dim=8, width=4, ce_weight=[1.0, 2.0])


def test_official_brightness_and_aspect_augmentation():
    from protoseg_ext.train.data import random_scale_crop_flip

    image = np.full((40, 40, 3), 100, np.uint8)
    image[0, 0] = 250  # clipped at 255 when shifted up
    label = np.zeros((40, 40), np.uint8)
    shifts, sizes = set(), set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img, lbl = random_scale_crop_flip(image, label, rng, (60, 60), (1.0, 1.0), flip=False,
                                          aspect_range=(0.9, 1.1), brightness=10)  # fmt: skip
        ref = np.random.default_rng(seed)
        ref.uniform(1.0, 1.0)
        a = ref.uniform(0.9, 1.1)
        h, w = int(round(40 / np.sqrt(a))), int(round(40 * np.sqrt(a)))
        assert (lbl != IGNORE_INDEX).sum() == h * w and (lbl[:h, :w] == 0).all()  # the resized image, padded
        sizes.add((h, w))
        shift = int(img[h // 2, w // 2, 0]) - 100
        assert -10 <= shift <= 10 and (img[h // 2, w // 2] == 100 + shift).all()
        shifts.add(shift)
    assert len(shifts) > 5 and len(sizes) > 3 and any(h > w for h, w in sizes) and any(h < w for h, w in sizes)
    # defaults: no brightness shift and no aspect draw (the old random stream)
    img, lbl = random_scale_crop_flip(image, label, np.random.default_rng(0), (60, 60), (1.0, 1.0), flip=False)
    assert (lbl != IGNORE_INDEX).sum() == 1600 and img[5, 5, 0] == 100


# ---------------------------------------------------------------- checkpoints


def test_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    common = ["--iters", "4", "--eval-every", "2", "--assign", "argmax", "--num-pictures", "0"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "damaged", *common, "--stop-at", "3")  # checkpoints at 2 (evaluation) and 3 (stop)
    ckpt = tmp_path / "damaged" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])  # truncated, as by a full disk or a killed copy
    capsys.readouterr()
    run(tmp_path / "damaged", *common, "--resume")
    text = capsys.readouterr().out
    assert f"{ckpt} cannot be read" in text and f"resumed from {ckpt.with_name('checkpoint.prev.pt')} (iteration 2)" in text
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_no_readable_checkpoint_names_the_files(tmp_path):
    run(tmp_path, "--iters", "4", "--eval-every", "2", "--num-pictures", "0")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 truncated")
    err = _error_of("--out", str(tmp_path), *TINY, "--iters", "4", "--resume")
    assert err.startswith("protoseg-train: error: cannot resume: ")
    assert f"{tmp_path / 'checkpoint.pt'} cannot be read" in err and f"{tmp_path / 'checkpoint.prev.pt'} cannot be read" in err


def test_resume_says_where_it_continued_from(tmp_path, capsys):
    run(tmp_path, "--iters", "4", "--stop-at", "2", "--num-pictures", "0")
    capsys.readouterr()
    run(tmp_path, "--iters", "4", "--resume", "--num-pictures", "0")
    assert f"resumed from {tmp_path / 'checkpoint.pt'} (iteration 2)" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: a clear error, nothing written


def test_bad_label_ids_stop_before_anything_is_written(tmp_path):
    from PIL import Image

    root = export_synthetic(tmp_path / "cs", "cityscapes", train=2, val=1, size=(32, 64), label_ids=True)
    path = sorted((root / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    raw = np.asarray(Image.open(path)).copy()
    raw[0, 0] = 200
    Image.fromarray(raw).save(path)
    out = tmp_path / "out"
    err = _error_of("--out", str(out), *TINY, "--dataset", "cityscapes", "--data-root", str(root), "--crop", "32", "32")
    assert err == f"protoseg-train: error: label {path} holds value 200: expected Cityscapes labelIds in [0, 34)"
    assert not out.exists()


def test_pretrained_needs_a_timm_backbone_and_a_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        run(out, "--pretrained", str(tmp_path / "w.pth"))
    with pytest.raises(SystemExit):
        run(out, "--backbone", "hrnet_w18_small_v2", "--pretrained", str(tmp_path / "missing.pth"))
    assert not out.exists()


def test_timm_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    out = tmp_path / "out"
    err = _error_of("--out", str(out), *TINY, "--backbone", "hrnet_w48")
    assert "timm" in err and "pip install 'protoseg_ext[timm]'" in err
    assert not out.exists()


# ---------------------------------------------------------------- timm backbones (random init, tiny inputs, offline)


@pytest.fixture
def timm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the network
    return pytest.importorskip("timm")


def test_hrnet_branches_concatenate_like_the_official_head(timm):
    from protoseg_ext.train.model import TimmBackbone

    small = TimmBackbone("hrnet_w18_small_v2")
    assert small.out_channels == 18 + 36 + 72 + 144 and small.stride == 4
    y = small(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 270, 16, 24)
    # other families: every map of stride >= 4, upsampled to the finest and concatenated
    assert TimmBackbone("resnet18").out_channels == 64 + 128 + 256 + 512
    assert TimmBackbone("hrnet_w48").out_channels == 720  # openseg's HRNet-W48 head input


def test_tiny_run_with_a_timm_backbone(tmp_path, timm):
    metrics = run(tmp_path, "--backbone", "hrnet_w18_small_v2", "--iters", "2", "--eval-every", "2")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["args"]["backbone"] == "hrnet_w18_small_v2" and any(k.startswith("backbone.body.") for k in state["model"])
    assert 0.0 <= metrics["miou"] <= 1.0
    with pytest.raises(SystemExit, match="--backbone 'hrnet_w18_small_v2'"):  # a resume must use the same network
        run(tmp_path, "--iters", "2", "--resume")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_pretrained_weights_load_from_a_local_file(tmp_path, timm, fmt):
    from protoseg_ext.train.model import TimmBackbone

    torch.manual_seed(5)
    full = timm.create_model("hrnet_w18_small_v2")  # the classification model: classifier and incre layers too
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        pytest.importorskip("safetensors").torch.save_file(full.state_dict(), str(path))
    else:  # as a training script saves it: under "state_dict", with DDP's "module." prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    torch.manual_seed(6)  # another random init: only the file can make the weights equal
    own = TimmBackbone("hrnet_w18_small_v2", str(path)).body.state_dict()
    assert len(own) > 100 and all(torch.equal(own[k], full.state_dict()[k]) for k in own)


def test_weights_that_do_not_fit_name_the_keys(tmp_path, timm):
    full = timm.create_model("hrnet_w18_small_v2").state_dict()
    full.pop("conv1.weight")
    full["neck.proj.weight"] = torch.zeros(3)
    full["bn1.weight"] = torch.zeros(5)
    path = tmp_path / "w.pth"
    torch.save(full, path)
    out = tmp_path / "out"
    err = _error_of("--out", str(out), *TINY, "--backbone", "hrnet_w18_small_v2", "--pretrained", str(path))
    assert err.startswith(f"protoseg-train: error: --pretrained {path} does not fit --backbone hrnet_w18_small_v2")
    assert "missing keys (1): conv1.weight" in err and "unexpected keys (1): neck.proj.weight" in err
    assert "wrong shapes (1): bn1.weight (5,) (model (64,))" in err
    path.write_bytes(path.read_bytes()[:5000])
    err = _error_of("--out", str(out), *TINY, "--backbone", "hrnet_w18_small_v2", "--pretrained", str(path))
    assert err.startswith(f"protoseg-train: error: --pretrained {path}: cannot read it as weights")
    assert not out.exists()


def test_unknown_backbone_is_named_and_nothing_is_written(tmp_path, timm):
    out = tmp_path / "out"
    err = _error_of("--out", str(out), *TINY, "--backbone", "hrnet_w4800")
    assert err.startswith("protoseg-train: error: --backbone hrnet_w4800: timm") and "does not know this model" in err
    assert not out.exists()


def test_checkpoint_from_before_the_backbone_option_resumes(tmp_path, capsys):
    run(tmp_path, "--iters", "4", "--stop-at", "2", "--num-pictures", "0")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["args"]["backbone"]  # as written before --backbone existed
    torch.save(state, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iters", "4", "--resume", "--num-pictures", "0")
    assert "(iteration 2)" in capsys.readouterr().out
    if importlib.util.find_spec("timm") is not None:  # another backbone is another run
        with pytest.raises(SystemExit, match="--backbone 'compact'"):
            run(tmp_path, "--iters", "4", "--resume", "--backbone", "resnet18")


# ---------------------------------------------------------------- the assignment sweep


def test_sweep_writes_the_table_of_every_arm(tmp_path, monkeypatch, capsys):
    import statistics

    from protoseg_ext.train import sweep

    argv = ["--out", str(tmp_path), "--seeds", "3", "5", "--assign", "gumbel", "sample", "--iters", "2", "--", *TINY,
            "--num-pictures", "1"]  # fmt: skip
    rows = sweep.main(argv)
    assert [(r["dataset"], r["assign"]) for r in rows] == [
        ("synthetic", "gumbel"), ("synthetic", "sample"), ("multilook", "gumbel"), ("multilook", "sample")]
    for r in rows:
        runs = [json.loads((tmp_path / "runs" / r["dataset"] / r["assign"] / f"seed{s}" / "metrics.json").read_text())
                for s in (3, 5)]  # fmt: skip
        args = torch.load(tmp_path / "runs" / r["dataset"] / r["assign"] / "seed5" / "checkpoint.pt",
                          weights_only=True)["args"]  # fmt: skip
        assert (args["assign"], args["seed"], args["iters"]) == (r["assign"], 5, 2)
        assert args["synthetic_looks"] == (3 if r["dataset"] == "multilook" else 1)
        assert r["seeds"] == [3, 5]
        miou = [100 * m["miou"] for m in runs]
        assert r["miou_mean"] == pytest.approx(statistics.mean(miou))
        assert r["miou_std"] == pytest.approx(statistics.stdev(miou))
        cos = [m["prototype_cosine"] for m in runs]
        assert r["prototype_cosine_mean"] == pytest.approx(statistics.mean(cos))
        assert r["prototype_cosine_std"] == pytest.approx(statistics.stdev(cos))
        use = [m["prototype_usage"]["mean_in_use"] for m in runs]
        assert r["prototypes_in_use_mean"] == pytest.approx(statistics.mean(use))
        for c, v in r["prototype_cosine_per_class"].items():
            assert v == pytest.approx(statistics.mean(m["prototype_cosine_per_class"][c] for m in runs))
        assert (tmp_path / "pictures" / f"similarity_{r['dataset']}_{r['assign']}.png").is_file()
    md = (tmp_path / "table.md").read_text()
    first = rows[0]
    assert f"| synthetic | gumbel | 2 | {first['miou_mean']:.1f} ± {first['miou_std']:.1f} |" in md
    assert "Per-class prototype cosine, multilook" in md
    table = list(csv.DictReader((tmp_path / "table.csv").read_text().splitlines()))
    assert len(table) == 4 and float(table[3]["miou_mean"]) == pytest.approx(rows[3]["miou_mean"])
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 1 + 8
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == json.loads(json.dumps(rows))

    # finished runs are kept, not run again; the table of a partial sweep counts only the finished runs
    def no_training(argv):
        raise AssertionError("ran again")

    monkeypatch.setattr(loop, "main", no_training)
    assert sweep.main(argv) == rows
    part = sweep.main(["--out", str(tmp_path), "--seeds", "3", "9", "--assign", "sample", "--datasets", "multilook",
                       "--iters", "2", "--table-only"])  # fmt: skip
    assert part[0]["seeds"] == [3] and math.isnan(part[0]["miou_std"])  # one seed: no spread
    assert part[0]["miou_mean"] == pytest.approx(100 * json.loads(
        (tmp_path / "runs" / "multilook" / "sample" / "seed3" / "metrics.json").read_text())["miou"])
