"""Train ProtoSeg at full resolution: ``python -m protoseg_ext.train`` (or ``protoseg-train``).

    python -m protoseg_ext.train --out runs/synthetic            # procedural scenes, no download
    python -m protoseg_ext.train --dataset cityscapes --data-root DIR --out runs/cs
    torchrun --nproc_per_node=4 -m protoseg_ext.train --recipe cityscapes-hrnet48 --data-root DIR --pretrained W48.pth

Loss ``CE(seg) + 0.01 PPC + 0.001 PPD``, SGD with poly learning-rate decay.
``OUT`` holds ``checkpoint.pt`` (the latest, replaced atomically) and
``checkpoint.prev.pt`` (the one before), ``log.csv``, ``curves.png``,
``metrics.json``, ``predictions/`` and ``pictures/`` (pixel-prototype
similarity and embedding PCA at each evaluation). ``--resume`` continues the
same schedule from the newest readable checkpoint: on CPU, n iterations, a
resume and n more equal 2n iterations bit for bit.
The model is in :mod:`protoseg_ext.train.model`, the datasets in :mod:`protoseg_ext.train.data`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import (
    IGNORE_INDEX,
    DatasetError,
    EvalView,
    ScheduleSampler,
    TrainView,
    build_dataset,
    colorize,
    default_crop,
)
from ..backends import resolve as resolve_backend
from ..functional import PPC_WEIGHT, PPD_WEIGHT
from ..head import _all_reduce
from .model import BackboneError, ProtoSegNet, prototype_cosine, prototype_usage

# settings a resumed run must share with its checkpoint (they define the schedule)
SCHEDULE_KEYS = (
    "dataset", "iters", "batch_size", "crop", "scale_range", "no_flip", "lr", "momentum",
    "weight_decay", "poly_power", "width", "proj_dim", "num_prototype", "head_stride",
    "ppc_weight", "ppd_weight", "gamma", "assign", "proto_sync", "seed", "synthetic_size",
    "synthetic_count", "world_size", "backbone", "synthetic_looks", "aspect_range", "brightness", "ce_weight",
)  # fmt: skip
LOG_FIELDS = ("iter", "lr", "loss", "ce", "ppc", "ppd", "images_per_s", "miou", "proto_cos", "protos_in_use")

# --recipe NAME: defaults for a published setting; a flag given on the command line overrides them.
# cityscapes-hrnet48: the official ProtoSeg Cityscapes run (tfzhou/ProtoSeg, configs/cityscapes/
# H_48_D_4_proto.json and scripts/cityscapes/hrnet/run_h_48_d_4_proto.sh): HRNet-W48, 80K iterations,
# batch 8 over all processes, 1024x512 crops, random resize 0.5-2 with aspect 0.9-1.1, flip, random
# brightness (shift 10), SGD lr 0.01 momentum 0.9 weight decay 5e-4, poly decay, gamma 0.999,
# PPC 0.01, PPD 0.001, K = 10, the head at 1/4 resolution, D = 720, the CE weighted by the config's
# loss.params.ce_weight, synchronised BN under DDP (bn_type torchsyncbn), 8 data workers (capped at
# the machine's cores).
CITYSCAPES_CE_WEIGHT = (
    0.8373, 0.9180, 0.8660, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843, 1.1116,
    0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
)
RECIPES = {
    "cityscapes-hrnet48": dict(
        dataset="cityscapes", backbone="hrnet_w48", iters=80000, total_batch=8, crop=(512, 1024),
        scale_range=(0.5, 2.0), aspect_range=(0.9, 1.1), brightness=10, lr=0.01, momentum=0.9,
        weight_decay=5e-4, poly_power=0.9, gamma=0.999, ppc_weight=0.01, ppd_weight=0.001, num_prototype=10,
        head_stride=4, proj_dim=720, eval_every=4000, assign="gumbel", workers=8,
        ce_weight=list(CITYSCAPES_CE_WEIGHT), sync_bn=True,
    ),
}  # fmt: skip
CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def _parser() -> argparse.ArgumentParser:
    """The command line of ``protoseg-train``, in four option groups."""
    p = argparse.ArgumentParser(prog="protoseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_options(p.add_argument_group("data").add_argument)
    _model_options(p.add_argument_group("model").add_argument)
    _optimisation_options(p.add_argument_group("optimisation").add_argument)
    _run_options(p.add_argument_group("run").add_argument)
    return p


def _data_options(arg) -> None:
    """The data options: the dataset, its crops and augmentation, the synthetic scenes, the loaders."""
    arg("--dataset", choices=["synthetic", "cityscapes", "ade20k"], default="synthetic", help="default: synthetic")
    arg("--data-root", metavar="DIR", help="dataset directory (cityscapes, ade20k)")
    arg("--crop", type=int, nargs=2, metavar=("H", "W"),
        help="training crop (default: the image size for synthetic, 256 512 cityscapes, 256 256 ade20k)")  # fmt: skip
    arg("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"), help="default: 0.5 2.0")
    arg("--no-flip", action="store_true", help="no random horizontal flip")
    arg("--aspect-range", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"),
        help="random aspect ratio of the resize (official Cityscapes: 0.9 1.1; default: 1 1, none)")  # fmt: skip
    arg("--brightness", type=int, default=0, metavar="SHIFT",
        help="random brightness shift in [-SHIFT, SHIFT] on every channel (official Cityscapes: 10; default: 0)")  # fmt: skip
    arg("--synthetic-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"), help="default: 128 256")
    arg("--synthetic-count", type=int, nargs=2, default=(256, 32), metavar=("TRAIN", "VAL"), help="default: 256 32")
    arg("--synthetic-looks", type=int, choices=[1, 2, 3], default=1,
        help="distinct looks (colour, texture, shape) per synthetic class, drawn in uneven shares (3: 57%%, 29%%, "
             "14%% of the objects), so a class has several sub-centres for its K prototypes (default: 1)")  # fmt: skip
    arg("--workers", type=int, default=1,
        help="data loading processes per rank, 0: none; capped so that the ranks of a machine use no more "
             "than its cores (default: 1)")  # fmt: skip


def _model_options(arg) -> None:
    """The model options: the backbone, the head's size, the prototypes' update and the kernels."""
    arg("--backbone", default="compact", metavar="NAME",
        help="compact (a small HRNet-style network, default) or a timm model with features_only, e.g. hrnet_w48 "
             "(needs pip install 'protoseg_ext[timm]')")  # fmt: skip
    arg("--pretrained", metavar="PATH",
        help="weights from a local file (.pth/.pt state_dict or .safetensors; never downloaded): a timm "
             "backbone's, and the head's (prototypes, feat_norm, mask_norm) when it is an official ProtoSeg "
             "checkpoint")  # fmt: skip
    arg("--width", type=int, default=32, help="compact backbone width w: branches of w, 2w, 4w channels (default: 32)")
    arg("--proj-dim", type=int, default=64, help="embedding size D (default: 64)")
    arg("--num-prototype", type=int, default=10, help="prototypes per class K (default: 10)")
    arg("--head-stride", type=int, choices=[1, 4], default=1,
        help="1: prototype head on every pixel (default); 4: official 1/4 resolution")  # fmt: skip
    arg("--gamma", type=float, default=0.999, help="prototype momentum (default: 0.999)")
    arg("--assign", choices=["gumbel", "argmax", "sample"], default="gumbel",
        help="the prototype each pixel updates, from its Sinkhorn row Q: gumbel, argmax(Q + g) (official, "
             "default; close to uniform), argmax, argmax(Q) (deterministic), or sample, argmax(log Q + g) "
             "(a draw with probabilities Q); g standard Gumbel noise. See the README")  # fmt: skip
    arg("--proto-sync", choices=["official", "exact"], default="official",
        help="with several processes: average the updated prototypes (official, default) or sum the statistics")  # fmt: skip
    arg("--backend", choices=["auto", "cpu", "cuda", "triton", "reference"], default="auto",
        help="prototype kernels (default: auto, the fastest for the device; PROTOSEG_BACKEND overrides it)")  # fmt: skip


def _optimisation_options(arg) -> None:
    """The optimisation options: steps, batch, SGD, the loss weights, BatchNorm sync, seed."""
    arg("--iters", type=int, default=400, help="default: 400")
    arg("--batch-size", type=int, default=2, help="images per process and step (default: 2)")
    arg("--lr", type=float, default=0.01, help="default: 0.01")
    arg("--momentum", type=float, default=0.9, help="default: 0.9")
    arg("--weight-decay", type=float, default=5e-4, help="default: 5e-4")
    arg("--poly-power", type=float, default=0.9, help="lr = LR * (1 - iter / ITERS) ** POWER (default: 0.9)")
    arg("--ppc-weight", type=float, default=PPC_WEIGHT, help=f"default: {PPC_WEIGHT}")
    arg("--ppd-weight", type=float, default=PPD_WEIGHT, help=f"default: {PPD_WEIGHT}")
    arg("--ce-weight", type=float, nargs="+", metavar="W",
        help="per-class weights of the cross-entropy, one per class (default: none; the cityscapes-hrnet48 "
             "recipe: the official config's 19)")  # fmt: skip
    arg("--no-sync-bn", dest="sync_bn", action="store_false",
        help="keep BatchNorm per process under DDP on GPUs (default: synchronised, as the official runs)")  # fmt: skip
    arg("--seed", type=int, default=0, help="weights, prototypes, data order, augmentation (default: 0)")


def _run_options(arg) -> None:
    """The run options: recipe, output, resume and stop, evaluation and logging, device."""
    arg("--recipe", choices=sorted(RECIPES),
        help="defaults of a published setting (flags given explicitly override them); cityscapes-hrnet48: "
             "the paper's Cityscapes run, batch 8 shared by all processes")  # fmt: skip
    arg("--out", default="runs/protoseg", metavar="DIR", help="checkpoint, log, curves, metrics (default: runs/protoseg)")
    arg("--resume", action="store_true", help="continue from OUT/checkpoint.pt if there is one")
    arg("--stop-at", type=int, metavar="ITER", help="stop after this iteration (checkpoint written); --resume continues")
    arg("--eval-every", type=int, default=100, help="evaluate and checkpoint every N iterations, and at the end (default: 100)")
    arg("--log-every", type=int, default=10, help="default: 10")
    arg("--val-limit", type=int, metavar="N", help="evaluate on the first N validation images only")
    arg("--num-preds", type=int, default=4, help="validation predictions saved as PNG (default: 4)")
    arg("--num-pictures", type=int, default=2,
        help="validation images in the similarity pictures at each evaluation, 0: no pictures (default: 2)")  # fmt: skip
    arg("--no-label-check", action="store_true",
        help="skip reading every label file before training (a bad file then stops the run when it is reached)")  # fmt: skip
    arg("--device", help="cpu or cuda (default: cuda when available)")
    arg("--threads", type=int, help="CPU threads per process (default: torch's; 1 is faster on a busy machine)")
    arg("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv=None) -> argparse.Namespace:
    """The training options from ``argv`` (default: the command line), a recipe's values as defaults, checked."""
    p = _parser()
    args = p.parse_args(argv)
    if args.recipe:  # the recipe's values become defaults; parse again so explicit flags win
        preset = dict(RECIPES[args.recipe])
        total = preset.pop("total_batch")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        p.set_defaults(**preset, batch_size=None if total % world else total // world)
        args = p.parse_args(argv)
        if args.batch_size is None:
            p.error(f"--recipe {args.recipe}: its batch of {total} cannot be shared by {world} processes "
                    f"(give --batch-size, images per process)")  # fmt: skip
    if args.pretrained and not Path(args.pretrained).is_file():
        p.error(f"--pretrained {args.pretrained}: no such file")
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--dataset {args.dataset} needs --data-root")
    if args.brightness < 0:
        p.error(f"--brightness must be >= 0, got {args.brightness}")
    if not 0 < args.aspect_range[0] <= args.aspect_range[1]:
        p.error(f"--aspect-range needs 0 < MIN <= MAX, got {args.aspect_range[0]} {args.aspect_range[1]}")
    if args.dataset != "synthetic" and args.synthetic_looks != 1:
        p.error(f"--synthetic-looks is for --dataset synthetic; write {args.dataset} files with several looks with "
                f"python -m protoseg_ext.train.data {args.dataset} DIR --looks {args.synthetic_looks}")  # fmt: skip
    if args.crop is None:
        args.crop = default_crop(args.dataset, args.synthetic_size)
    # lists, as they come back from a checkpoint, so the resume check compares like with like
    args.crop, args.scale_range, args.aspect_range = list(args.crop), list(args.scale_range), list(args.aspect_range)
    args.synthetic_size, args.synthetic_count = list(args.synthetic_size), list(args.synthetic_count)
    return args


# ----------------------------------------------------------------------------- small helpers


def setup_distributed(device: str):
    """``(rank, world_size)``; joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cap_workers(workers: int, local_processes: int = 1) -> int:
    """Data workers per process such that the ``local_processes`` of this machine ask for no more
    than its cores in all (at least 1 when any were asked for)."""
    if workers <= 0:
        return workers
    return max(1, min(workers, available_cores() // max(local_processes, 1)))


def sync_batchnorm(net, enabled: bool, world: int, device: torch.device):
    """Official (``bn_type: torchsyncbn``): BatchNorm synchronised across the processes of a DDP
    run on GPUs. PyTorch's SyncBatchNorm runs on GPUs only: a CPU run keeps BN per process."""
    if enabled and world > 1 and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory and rename: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def poly_lr(iters: int, power: float):
    return lambda it: max(0.0, 1.0 - it / iters) ** power


class CsvLog:
    """``log.csv``: one row every ``--log-every`` iterations and one per evaluation.
    On resume, rows past the checkpoint (written before a crash) are dropped."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        rows = []
        if keep_until > 0 and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iter"]) <= keep_until]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def plot(self, path: Path) -> None:
        """Loss and mIoU curves as a PNG (skipped without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 3.5))
        for key in ("loss", "ce"):
            pts = [(int(r["iter"]), float(r[key])) for r in rows if r[key]]
            if pts:
                a.plot(*zip(*pts), label=key)
        a.set_xlabel("iteration"), a.set_ylabel("training loss")
        if a.lines:
            a.legend()
        pts = [(int(r["iter"]), 100 * float(r["miou"])) for r in rows if r["miou"]]
        if pts:
            b.plot(*zip(*pts), marker="o")
        b.set_xlabel("iteration"), b.set_ylabel("val mIoU (%)")
        pts = [(int(r["iter"]), float(r["proto_cos"])) for r in rows if r.get("proto_cos")]
        if pts:
            c.plot(*zip(*pts), marker="o", color="tab:red")
        c.set_xlabel("iteration"), c.set_ylabel("prototype cosine (mean over pairs)")
        c.set_ylim(-0.1, 1.05)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


class Meter:
    """Mean losses over the current log window and training throughput."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.sums, self.n = {}, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.timed, self.t0 = 0, time.perf_counter()

    def add(self, losses) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.n, self.timed = self.n + 1, self.timed + 1

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.n, 1)

    def images_per_s(self) -> float:
        return self.timed * self.images_per_step / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self) -> dict:
        return {**{k: self.mean(k) for k in self.sums}, "images_per_s": self.images_per_s()}


def progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True, mininterval=0.5)


def say(bar, text: str) -> None:
    (bar.write if bar is not None else print)(text)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(net, val_set, args, device, rank, world, out: Path):
    """Per-class IoU over the validation split (sharded over ranks); saves a few predictions."""
    C = val_set.num_classes
    n = len(val_set) if args.val_limit is None else min(args.val_limit, len(val_set))
    view = EvalView(val_set, range(rank, n, world))
    loader = DataLoader(view, batch_size=1, num_workers=min(args.workers, 1), generator=torch.Generator())
    confusion = torch.zeros(C * C, dtype=torch.int64, device=device)  # row: ground truth, column: prediction
    K = net.head.num_prototype
    usage = torch.zeros(C, K, dtype=torch.int64, device=device)  # pixels nearest to each prototype of their class
    was_training = net.training
    net.eval()
    saved = 0
    for image, label, index in loader:
        image, label = image.to(device), label.to(device)
        seg, used = net.predict(image, label)
        pred = seg.argmax(1)
        usage += used
        valid = label != IGNORE_INDEX
        confusion += torch.bincount(label[valid] * C + pred[valid], minlength=C * C)
        if rank == 0 and saved < args.num_preds:
            save_prediction(out / "predictions", val_set, int(index), label[0].cpu().numpy(), pred[0].cpu().numpy())
            saved += 1
    net.train(was_training)
    if world > 1:
        _all_reduce(confusion, usage)
    metrics = iou_metrics(confusion.view(C, C).cpu(), val_set.class_names)
    cos = prototype_cosine(net.head.prototypes).cpu()
    gt_present = confusion.view(C, C).sum(1).cpu() > 0
    # mean over the classes of the validation ground truth (absent classes keep their initial prototypes)
    metrics["prototype_cosine"] = float(cos[gt_present].mean()) if gt_present.any() else float(cos.mean())
    metrics["prototype_cosine_per_class"] = {name: float(cos[c]) for c, name in enumerate(val_set.class_names)}
    metrics["prototype_usage"] = usage_metrics(usage.cpu(), val_set.class_names)
    return metrics


USAGE_MIN_SHARE = 0.01


def usage_metrics(usage: torch.Tensor, class_names) -> dict:
    """``metrics.json``'s ``prototype_usage`` from the ``(C, K)`` counts of :meth:`ProtoSegNet.predict`.

    Over the evaluation, every labeled pixel at the head's resolution counts
    for the prototype of its ground-truth class nearest to it. A prototype is
    in use when it is the nearest for at least ``USAGE_MIN_SHARE`` (1%) of its
    class's pixels: K in use is every sub-centre serving, 1 is collapse or
    dead prototypes. ``mean_in_use`` averages over the classes with pixels."""
    u = prototype_usage(usage, USAGE_MIN_SHARE)
    present = u["pixels"] > 0
    per_class = {
        name: {"pixels": int(u["pixels"][c]), "in_use": int(u["in_use"][c]), "counts": [int(v) for v in usage[c]]}
        for c, name in enumerate(class_names) if present[c]
    }  # fmt: skip
    mean = float(u["in_use"][present].double().mean()) if present.any() else 0.0
    return {"definition": "labeled pixels per prototype of their ground-truth class, nearest by cosine",
            "min_share": USAGE_MIN_SHARE, "num_prototype": int(usage.shape[1]), "mean_in_use": mean,
            "per_class": per_class}  # fmt: skip


def iou_metrics(confusion: torch.Tensor, class_names) -> dict:
    """Per-class IoU and mIoU from a ``(C, C)`` confusion matrix (row: ground truth, column:
    prediction; pixels with an ignored ground truth left out), by the rule of the official
    Cityscapes evaluation (cityscapesscripts' evalPixelLevelSemanticLabeling):
    ``IoU = TP / (TP + FP + FN)``; a class with ``TP + FP + FN = 0`` (absent from the ground
    truth and never predicted) has no IoU (None) and stays out of the mean; a class absent
    from the ground truth but predicted has IoU 0 and counts."""
    confusion = confusion.double()
    tp, gt, pr = confusion.diag(), confusion.sum(1), confusion.sum(0)
    denom = gt + pr - tp
    iou = tp / denom.clamp(min=1)
    scored = denom > 0
    miou = float(iou[scored].mean()) if scored.any() else 0.0
    per_class = {name: (float(iou[c]) if scored[c] else None) for c, name in enumerate(class_names)}
    return {"miou": miou, "per_class_iou": per_class, "pixel_accuracy": float(tp.sum() / gt.sum().clamp(min=1))}


def save_prediction(folder: Path, dataset, index: int, label: np.ndarray, pred: np.ndarray) -> None:
    """``image | ground truth | prediction`` side by side, as one PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image, _ = dataset.load(index)
    panel = np.concatenate([image, colorize(label, dataset.palette), colorize(pred, dataset.palette)], axis=1)
    Image.fromarray(panel).save(folder / f"{dataset.name(index)}.png")


def iou_table(metrics: dict, it: int) -> str:
    """The per-class IoU, prototype cosine and prototypes in use of the scored classes, and the means."""
    present = {n: v for n, v in metrics["per_class_iou"].items() if v is not None}
    cos = metrics.get("prototype_cosine_per_class", {})
    usage = metrics.get("prototype_usage", {})
    K, used = usage.get("num_prototype"), usage.get("per_class", {})
    in_use = f", prototypes in use {usage['mean_in_use']:.1f} of {K}" if usage else ""
    lines = [f"iter {it}: mIoU {100 * metrics['miou']:.2f}  (pixel accuracy {100 * metrics['pixel_accuracy']:.2f}), "
             f"prototype cosine {metrics.get('prototype_cosine', float('nan')):.3f}{in_use}"]  # fmt: skip
    width = max(len(n) for n in present) if present else 5
    lines.append(f"  {'class':<{width}}  IoU (%)  proto cos  in use")

    def use(name):
        return f"{used[name]['in_use']:>3} / {K}" if name in used else "     -"

    lines += [f"  {name:<{width}}  {100 * v:7.2f}  {cos.get(name, float('nan')):9.3f}  {use(name)}"
              for name, v in present.items()]  # fmt: skip
    absent = len(metrics["per_class_iou"]) - len(present)
    if absent:
        lines.append(f"  ({absent} classes neither in the ground truth nor predicted, left out of the mean)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training


def fail(message: str):
    raise SystemExit(f"protoseg-train: error: {message}")


def build_model(args, num_classes: int, device):
    """The network, SGD and the poly schedule; the same initial weights and prototypes on every rank."""
    torch.manual_seed(args.seed)
    net = ProtoSegNet(
        num_classes, proj_dim=args.proj_dim, width=args.width, num_prototype=args.num_prototype,
        head_stride=args.head_stride, ignore_index=IGNORE_INDEX, ppc_weight=args.ppc_weight,
        ppd_weight=args.ppd_weight, gamma=args.gamma, assign=args.assign, backend=args.backend,
        sync=args.proto_sync, backbone=args.backbone, pretrained=args.pretrained, ce_weight=args.ce_weight,
    ).to(device)  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(args.iters, args.poly_power))
    return net, opt, sched


def train_batches(train_set, args, rank: int, world: int, start: int):
    """Endless augmented batches for this rank, from iteration ``start`` of the schedule."""
    sampler = ScheduleSampler(train_set, rank, world, args.seed, start=start * args.batch_size)
    view = TrainView(train_set, args.crop, args.scale_range, not args.no_flip, args.seed, args.aspect_range,
                     args.brightness)  # fmt: skip
    loader = DataLoader(
        view, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        generator=torch.Generator(),  # leaves the global RNG (prototype init, Gumbel noise) alone
    )  # fmt: skip
    return iter(loader)


def _setup_process(args):
    """``(device, rank, world, backend name)``: threads, device, process group, capped workers, kernels."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = setup_distributed(device.type)
    args.world_size = world
    workers = cap_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if workers != args.workers and rank == 0:
        print(f"protoseg-train: --workers {args.workers} capped at {workers} per process "
              f"({available_cores()} cores on this machine)", flush=True)  # fmt: skip
    args.workers = workers
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        backend = resolve_backend(args.backend, device).name
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    return device, rank, world, backend


def _datasets(args):
    """``(train_set, val_set)``, their labels read and checked (unless ``--no-label-check``)."""
    data_kw = dict(root=args.data_root, synthetic_size=args.synthetic_size, synthetic_count=args.synthetic_count,
                   seed=args.seed, synthetic_looks=args.synthetic_looks)  # fmt: skip
    train_set, val_set = build_dataset(args.dataset, "train", **data_kw), build_dataset(args.dataset, "val", **data_kw)
    if args.ce_weight is not None and len(args.ce_weight) != train_set.num_classes:
        fail(f"--ce-weight has {len(args.ce_weight)} values but {args.dataset} has {train_set.num_classes} classes")
    if not args.no_label_check:
        for ds in (train_set, val_set):
            if hasattr(ds, "check_labels"):
                ds.check_labels(threads=max(args.workers, 1))
    return train_set, val_set


def _model(args, num_classes: int, device, rank: int, world: int):
    """``(net, opt, sched)``: the network (BatchNorm synchronised as asked), its optimizer and schedule."""
    try:
        net, opt, sched = build_model(args, num_classes, device)
    except BackboneError as e:
        fail(str(e))
    if rank == 0 and net.pretrained_head:
        skipped = net.pretrained_skipped
        print(f"--pretrained {args.pretrained}: the head's prototypes, feat_norm and mask_norm loaded"
              + (f"; not loaded (another layout or backbone): {len(skipped)} keys ({', '.join(skipped[:3])}"
                 f"{', ...' if len(skipped) > 3 else ''})" if skipped else ""), flush=True)
    net = sync_batchnorm(net, args.sync_bn, world, device)
    return net, opt, sched


def _evaluate_and_record(net, val_set, args, device, rank: int, world: int, out: Path, it: int, bar, log) -> dict:
    """Evaluate; on rank 0 print the IoU table, write metrics.json, log the row and save the pictures."""
    metrics = evaluate(net, val_set, args, device, rank, world, out)
    if rank == 0:
        say(bar, iou_table(metrics, it))
        atomic_save({"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"], "iters": it,
                     "pixel_accuracy": metrics["pixel_accuracy"],
                     "prototype_cosine": metrics["prototype_cosine"],
                     "prototype_cosine_per_class": metrics["prototype_cosine_per_class"],
                     "prototype_usage": metrics["prototype_usage"]},
                    out / "metrics.json")  # fmt: skip
        log.write(iter=it, miou=metrics["miou"], proto_cos=metrics["prototype_cosine"],
                  protos_in_use=metrics["prototype_usage"]["mean_in_use"])
        if args.num_pictures > 0:
            save_pictures(net, val_set, out / "pictures", it, device, args.num_pictures)
    return metrics


def train(args) -> dict:
    """Train (or resume) as ``args`` say; returns the last evaluation's metrics."""
    device, rank, world, backend = _setup_process(args)
    out = Path(args.out)

    # every check that can fail on the user's input runs before anything is written to OUT
    train_set, val_set = _datasets(args)
    net, opt, sched = _model(args, train_set.num_classes, device, rank, world)
    start, resumed_from = 0, None
    if args.resume:
        start, resumed_from = resume(out, args, net, opt, sched, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    stop = min(args.iters, args.stop_at or args.iters)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    batches = train_batches(train_set, args, rank, world, start)

    log = CsvLog(out / "log.csv", start) if rank == 0 else None
    bar = progress(args.iters, start, rank == 0 and not args.no_progress)
    if rank == 0:
        say(bar, f"protoseg-train: {args.dataset}, {len(train_set)} train / {len(val_set)} val images, "
                 f"{train_set.num_classes} classes, {args.backbone} backbone, {world} process(es) on {device.type}, "
                 f"{backend} kernels, iterations {start} to {stop}")  # fmt: skip
        if resumed_from is not None:
            say(bar, f"protoseg-train: resumed from {resumed_from} (iteration {start})")
        elif args.resume:
            say(bar, f"protoseg-train: nothing to resume in {out}, starting at iteration 0")
    metrics, meter = {}, Meter(args.batch_size * world)
    net.train()
    for it in range(start + 1, stop + 1):
        images, labels = (t.to(device, non_blocking=True) for t in next(batches))
        _, losses = model(images, labels)  # CE + 0.01 PPC + 0.001 PPD; updates the prototypes
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sched.step()

        meter.add(losses)
        if bar is not None:
            bar.set_postfix({"loss": f"{meter.mean('loss'):.3f}", "img/s": f"{meter.images_per_s():.1f}"}, refresh=False)
            bar.update(1)
        if log is not None and (it % args.log_every == 0 or it == stop):
            log.write(iter=it, lr=opt.param_groups[0]["lr"], **meter.summary())
        if it % args.log_every == 0 or it == stop:
            meter.reset()
        evaluating = it % args.eval_every == 0 or it == args.iters
        if evaluating:
            metrics = _evaluate_and_record(net, val_set, args, device, rank, world, out, it, bar, log)
        if rank == 0 and (evaluating or it == stop):
            save_checkpoint(out, it, args, net, opt, sched)
            log.plot(out / "curves.png")
        if evaluating:
            meter.restart_clock()  # throughput counts training only
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    return metrics


def save_checkpoint(out: Path, it: int, args, net, opt, sched) -> None:
    """Everything the next step depends on: weights and prototypes, optimizer, schedule, RNG.

    Written to ``OUT/checkpoint.pt``; the checkpoint it replaces becomes
    ``OUT/checkpoint.prev.pt``, so a damaged newest file never loses the run."""
    state = {
        "iter": it,
        "args": dict(vars(args)),
        "model": net.state_dict(),  # includes head.prototypes
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    path, tmp = out / CHECKPOINT, out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    if path.exists():
        os.replace(path, out / PREVIOUS)
    os.replace(tmp, path)


class CheckpointError(Exception):
    """A checkpoint file that cannot be read or is not one of this script's."""


def read_checkpoint(path: Path, device) -> dict:
    """``torch.load`` of a checkpoint, with every way it can fail turned into :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated (OSError, RuntimeError), not a zip, foreign pickles (UnpicklingError)
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    need = ("iter", "args", "model", "optimizer", "scheduler", "rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(f"{path} is not a protoseg-train checkpoint (expected the keys {', '.join(need)})")
    return state


def resume(out: Path, args, net, opt, sched, device):
    """Continue from ``OUT/checkpoint.pt`` or, when it cannot be read, ``OUT/checkpoint.prev.pt``.
    Returns ``(iteration, the file used)``, ``(0, None)`` when OUT has no checkpoint."""
    tried = []
    for name in (CHECKPOINT, PREVIOUS):
        path = out / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path, device)
        except CheckpointError as e:
            tried.append(str(e))
            print(f"protoseg-train: warning: {e}; trying the previous checkpoint", flush=True)
            continue
        return load_checkpoint(state, path, args, net, opt, sched), path
    if tried:
        fail("cannot resume: " + "; ".join(tried) + " (no readable checkpoint left)")
    return 0, None


def load_checkpoint(state: dict, path: Path, args, net, opt, sched) -> int:
    """Restore a checkpoint of the same schedule; returns the iteration to continue from."""
    saved = state["args"]
    # a setting newer than the checkpoint had, when it was written, the value that was then the only one
    before = {"backbone": "compact", "synthetic_looks": 1, "aspect_range": [1.0, 1.0], "brightness": 0, "ce_weight": None}
    diff = [f"--{k.replace('_', '-')} {saved.get(k, before.get(k))!r} (now {getattr(args, k)!r})"
            for k in SCHEDULE_KEYS if saved.get(k, before.get(k)) != getattr(args, k)]  # fmt: skip
    if diff:
        fail(f"cannot resume {path}: it was trained with " + ", ".join(diff))
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return int(state["iter"])


# ----------------------------------------------------------------------------- pictures


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(plt, fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def _embed_image(net, val_set, i: int, device):
    """Validation image ``i``: ``(image (H, W, 3) uint8, label (H, W), feats (h, w, D), label at (h, w))``,
    where ``feats`` are the head's L2-normalised embeddings (those the prototypes are compared with)."""
    from .data import to_tensors

    image, label = val_set.load(i)
    x, _ = to_tensors(image, label)
    emb = net.embed(x[None].to(device))  # (1, D, h, w)
    h, w = emb.shape[-2:]
    feats = F.normalize(net.head.embed(emb), dim=-1).view(h, w, -1).float().cpu()
    small = F.interpolate(torch.from_numpy(label[None, None].astype(np.float32)), size=(h, w), mode="nearest")
    return image, label, feats, small[0, 0].long()


def similarity_rgb(feats: torch.Tensor, protos: torch.Tensor, mask: torch.Tensor, size):
    """Pixel-prototype similarity of one class as an RGB picture.

    ``feats (h, w, D)`` L2-normalised embeddings, ``protos (K, D)`` the class's prototypes,
    ``mask (h, w)`` its pixels. The three prototypes the class's pixels are most often
    nearest to become R, G and B (cosine similarity, upsampled to ``size``, one linear scale
    for the three channels, spanning the class's pixels): prototypes that coincide give
    equal channels, a grey picture.
    Returns ``((H, W, 3) float array in [0, 1], the three prototype indices)``."""
    K = protos.shape[0]
    sim = feats @ protos.T  # (h, w, K)
    near = torch.bincount(sim[mask].argmax(-1), minlength=K)
    picks = torch.argsort(near, descending=True, stable=True)[: min(3, K)]
    rgb = sim[..., picks].permute(2, 0, 1)[None]  # (1, 3, h, w)
    rgb = F.interpolate(rgb, size=tuple(size), mode="bilinear", align_corners=True)[0]
    if rgb.shape[0] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(3 - rgb.shape[0], *rgb.shape[1:])])
    own = sim[mask][:, picks] if mask.any() else sim[..., picks]  # the scale: the class's own pixels
    lo, hi = float(own.min()), float(own.max())
    rgb = ((rgb - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    return rgb.permute(1, 2, 0).numpy(), [int(k) for k in picks]


@torch.no_grad()
def save_pictures(net, val_set, folder: Path, it: int, device, count: int = 2, classes: int = 3, pca_classes: int = 5):
    """Two pictures of the prototypes, as the paper draws them, into ``folder``:

    * ``similarity_iterNNNNNN.png``: for ``count`` validation images and their ``classes``
      largest classes, the cosine similarity of every pixel to three prototypes of the class
      as the red, green and blue channels (the three the class's pixels are most often
      nearest to), on one scale for the three: distinct sub-centres show as distinct
      colours, collapsed prototypes as grey; pixels of other classes are dimmed.
    * ``embedding_iterNNNNNN.png``: a 2-D PCA of sampled pixel embeddings of the
      ``pca_classes`` largest classes and of their prototypes (stars).
    """
    plt = _pyplot()
    if plt is None:
        return
    was_training = net.training
    net.eval()
    protos = F.normalize(net.head.prototypes.float(), dim=-1).cpu()  # (C, K, D)
    C, K, _ = protos.shape
    names, palette = val_set.class_names, np.asarray(val_set.palette, np.float32) / 255
    n_img = min(count, len(val_set))
    shots = [_embed_image(net, val_set, i, device) for i in range(max(n_img, min(4, len(val_set))))]
    net.train(was_training)

    fig, axes = plt.subplots(n_img, 2 + classes, figsize=(3.2 * (2 + classes), 1.9 * n_img + 0.4), squeeze=False)
    for row, (image, label, feats, small) in zip(axes, shots[:n_img]):
        H, W = label.shape
        row[0].imshow(image)
        row[1].imshow(colorize(label, val_set.palette))
        row[0].set_title("image", fontsize=8), row[1].set_title("ground truth", fontsize=8)
        counts = np.bincount(small[small < C].numpy(), minlength=C)
        for ax, c in zip(row[2:], np.argsort(-counts)[:classes]):
            if counts[c] == 0:
                ax.set_visible(False)
                continue
            rgb, picks = similarity_rgb(feats, protos[c], small == c, (H, W))
            ax.imshow(np.where((label == c)[..., None], rgb, 0.3 * rgb))
            ax.set_title(f"{names[c]}: prototypes {', '.join(map(str, picks))} as R, G, B", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"pixel-prototype similarity, iteration {it}", fontsize=9)
    fig.tight_layout()
    _save_figure(plt, fig, folder / f"similarity_iter{it:06d}.png")

    # PCA of pixel embeddings and prototypes
    feats = torch.cat([f.view(-1, f.shape[-1]) for _, _, f, _ in shots])
    labels = torch.cat([s.view(-1) for _, _, _, s in shots])
    counts = torch.bincount(labels[labels < C], minlength=C)
    chosen = [int(c) for c in torch.argsort(counts, descending=True, stable=True)[:pca_classes] if counts[c] > 0]
    if not chosen:
        return
    g = torch.Generator().manual_seed(0)
    sample = {c: feats[labels == c][torch.randperm(int(counts[c]), generator=g)[:300]] for c in chosen}
    X = torch.cat(list(sample.values())).double()
    mean = X.mean(0)
    _, _, V = torch.linalg.svd(X - mean, full_matrices=False)
    axes2 = V[:2].T  # (D, 2)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in chosen:
        pts = ((sample[c].double() - mean) @ axes2).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.35, color=palette[c], label=names[c])
        pp = ((protos[c].double() - mean) @ axes2).numpy()
        ax.scatter(pp[:, 0], pp[:, 1], s=140, marker="*", color=palette[c], edgecolors="black", linewidths=0.8)
    ax.set_xlabel("PC 1"), ax.set_ylabel("PC 2")
    ax.set_title(f"pixel embeddings (dots) and the {K} prototypes per class (stars), iteration {it}", fontsize=8)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    fig.tight_layout()
    _save_figure(plt, fig, folder / f"embedding_iter{it:06d}.png")


def _dataset_error_text(e: DatasetError) -> str:
    """The original message, also when the error was re-raised from a loader worker."""
    text = str(e).strip()
    marker = "DatasetError: "
    return text.rsplit(marker, 1)[-1] if "Original Traceback" in text and marker in text else text


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except DatasetError as e:
        fail(_dataset_error_text(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

