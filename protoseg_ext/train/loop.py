"""Train ProtoSeg at full resolution: ``python -m protoseg_ext.train`` (or ``protoseg-train``).

    python -m protoseg_ext.train --out runs/synthetic            # procedural scenes, no download
    python -m protoseg_ext.train --dataset cityscapes --data-root DIR --out runs/cs
    torchrun --nproc_per_node=2 -m protoseg_ext.train --out runs/ddp

Loss ``CE(seg) + 0.01 PPC + 0.001 PPD``, SGD with poly learning-rate decay.
``OUT`` holds ``checkpoint.pt`` (the latest, replaced atomically), ``log.csv``,
``curves.png``, ``metrics.json`` and ``predictions/``. ``--resume`` continues
the same schedule from the checkpoint: on CPU, n iterations, a resume and n
more equal 2n iterations bit for bit.
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
from .model import ProtoSegNet

# settings a resumed run must share with its checkpoint (they define the schedule)
SCHEDULE_KEYS = (
    "dataset", "iters", "batch_size", "crop", "scale_range", "no_flip", "lr", "momentum",
    "weight_decay", "poly_power", "width", "proj_dim", "num_prototype", "head_stride",
    "ppc_weight", "ppd_weight", "gamma", "assign", "proto_sync", "seed", "synthetic_size",
    "synthetic_count", "world_size",
)  # fmt: skip
LOG_FIELDS = ("iter", "lr", "loss", "ce", "ppc", "ppd", "images_per_s", "miou")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="protoseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument_group("data").add_argument
    arg("--dataset", choices=["synthetic", "cityscapes", "ade20k"], default="synthetic", help="default: synthetic")
    arg("--data-root", metavar="DIR", help="dataset directory (cityscapes, ade20k)")
    arg("--crop", type=int, nargs=2, metavar=("H", "W"),
        help="training crop (default: the image size for synthetic, 256 512 cityscapes, 256 256 ade20k)")  # fmt: skip
    arg("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"), help="default: 0.5 2.0")
    arg("--no-flip", action="store_true", help="no random horizontal flip")
    arg("--synthetic-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"), help="default: 128 256")
    arg("--synthetic-count", type=int, nargs=2, default=(256, 32), metavar=("TRAIN", "VAL"), help="default: 256 32")
    arg("--workers", type=int, default=1, help="data loading processes per rank, 0: none (default: 1)")
    arg = p.add_argument_group("model").add_argument
    arg("--width", type=int, default=32, help="backbone width w: branches of w, 2w, 4w channels (default: 32)")
    arg("--proj-dim", type=int, default=64, help="embedding size D (default: 64)")
    arg("--num-prototype", type=int, default=10, help="prototypes per class K (default: 10)")
    arg("--head-stride", type=int, choices=[1, 4], default=1,
        help="1: prototype head on every pixel (default); 4: official 1/4 resolution")  # fmt: skip
    arg("--gamma", type=float, default=0.999, help="prototype momentum (default: 0.999)")
    arg("--assign", choices=["gumbel", "argmax"], default="gumbel",
        help="assignment for the prototype update: gumbel (official, default) or argmax (deterministic)")  # fmt: skip
    arg("--proto-sync", choices=["official", "exact"], default="official",
        help="with several processes: average the updated prototypes (official, default) or sum the statistics")  # fmt: skip
    arg("--backend", choices=["auto", "cpu", "cuda", "triton", "reference"], default="auto",
        help="prototype kernels (default: auto, the fastest for the device; PROTOSEG_BACKEND overrides it)")  # fmt: skip
    arg = p.add_argument_group("optimisation").add_argument
    arg("--iters", type=int, default=400, help="default: 400")
    arg("--batch-size", type=int, default=2, help="images per process and step (default: 2)")
    arg("--lr", type=float, default=0.01, help="default: 0.01")
    arg("--momentum", type=float, default=0.9, help="default: 0.9")
    arg("--weight-decay", type=float, default=5e-4, help="default: 5e-4")
    arg("--poly-power", type=float, default=0.9, help="lr = LR * (1 - iter / ITERS) ** POWER (default: 0.9)")
    arg("--ppc-weight", type=float, default=0.01, help="default: 0.01")
    arg("--ppd-weight", type=float, default=0.001, help="default: 0.001")
    arg("--seed", type=int, default=0, help="weights, prototypes, data order, augmentation (default: 0)")
    arg = p.add_argument_group("run").add_argument
    arg("--out", default="runs/protoseg", metavar="DIR", help="checkpoint, log, curves, metrics (default: runs/protoseg)")
    arg("--resume", action="store_true", help="continue from OUT/checkpoint.pt if there is one")
    arg("--stop-at", type=int, metavar="ITER", help="stop after this iteration (checkpoint written); --resume continues")
    arg("--eval-every", type=int, default=100, help="evaluate and checkpoint every N iterations, and at the end (default: 100)")
    arg("--log-every", type=int, default=10, help="default: 10")
    arg("--val-limit", type=int, metavar="N", help="evaluate on the first N validation images only")
    arg("--num-preds", type=int, default=4, help="validation predictions saved as PNG (default: 4)")
    arg("--device", help="cpu or cuda (default: cuda when available)")
    arg("--threads", type=int, help="CPU threads per process (default: torch's; 1 is faster on a busy machine)")
    arg("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--dataset {args.dataset} needs --data-root")
    if args.crop is None:
        args.crop = default_crop(args.dataset, args.synthetic_size)
    # lists, as they come back from a checkpoint, so the resume check compares like with like
    args.crop, args.scale_range = list(args.crop), list(args.scale_range)
    args.synthetic_size, args.synthetic_count = list(args.synthetic_size), list(args.synthetic_count)
    return args


# ----------------------------------------------------------------------------- small helpers


def setup_distributed(device: str):
    """``(rank, world_size)``; joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


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
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
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
    was_training = net.training
    net.eval()
    saved = 0
    for image, label, index in loader:
        image, label = image.to(device), label.to(device)
        pred = net(image)[0].argmax(1)
        valid = label != IGNORE_INDEX
        confusion += torch.bincount(label[valid] * C + pred[valid], minlength=C * C)
        if rank == 0 and saved < args.num_preds:
            save_prediction(out / "predictions", val_set, int(index), label[0].cpu().numpy(), pred[0].cpu().numpy())
            saved += 1
    net.train(was_training)
    if world > 1:
        dist.all_reduce(confusion)
    confusion = confusion.view(C, C).double().cpu()
    tp, gt, pr = confusion.diag(), confusion.sum(1), confusion.sum(0)
    iou = tp / (gt + pr - tp).clamp(min=1)
    present = gt > 0  # mIoU: mean over classes present in the ground truth
    miou = float(iou[present].mean()) if present.any() else 0.0
    per_class = {name: (float(iou[c]) if present[c] else None) for c, name in enumerate(val_set.class_names)}
    return {"miou": miou, "per_class_iou": per_class, "pixel_accuracy": float(tp.sum() / gt.sum().clamp(min=1))}


def save_prediction(folder: Path, dataset, index: int, label: np.ndarray, pred: np.ndarray) -> None:
    """``image | ground truth | prediction`` side by side, as one PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image, _ = dataset.load(index)
    panel = np.concatenate([image, colorize(label, dataset.palette), colorize(pred, dataset.palette)], axis=1)
    Image.fromarray(panel).save(folder / f"{dataset.name(index)}.png")


def iou_table(metrics: dict, it: int) -> str:
    """The per-class IoU of the classes present in the ground truth, and the mIoU over them."""
    present = {n: v for n, v in metrics["per_class_iou"].items() if v is not None}
    lines = [f"iter {it}: mIoU {100 * metrics['miou']:.2f}  (pixel accuracy {100 * metrics['pixel_accuracy']:.2f})"]
    width = max(len(n) for n in present) if present else 5
    lines.append(f"  {'class':<{width}}  IoU (%)")
    lines += [f"  {name:<{width}}  {100 * v:6.2f}" for name, v in present.items()]
    absent = len(metrics["per_class_iou"]) - len(present)
    if absent:
        lines.append(f"  ({absent} classes absent from the ground truth, left out of the mean)")
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
        sync=args.proto_sync,
    ).to(device)  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr(args.iters, args.poly_power))
    return net, opt, sched


def train_batches(train_set, args, rank: int, world: int, start: int):
    """Endless augmented batches for this rank, from iteration ``start`` of the schedule."""
    sampler = ScheduleSampler(train_set, rank, world, args.seed, start=start * args.batch_size)
    view = TrainView(train_set, args.crop, args.scale_range, not args.no_flip, args.seed)
    loader = DataLoader(
        view, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        generator=torch.Generator(),  # leaves the global RNG (prototype init, Gumbel noise) alone
    )  # fmt: skip
    return iter(loader)


def train(args) -> dict:
    """Train (or resume) as ``args`` say; returns the last evaluation's metrics."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = setup_distributed(device.type)
    args.world_size = world
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        backend = resolve_backend(args.backend, device).name
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    data_kw = dict(root=args.data_root, synthetic_size=args.synthetic_size, synthetic_count=args.synthetic_count, seed=args.seed)
    train_set, val_set = build_dataset(args.dataset, "train", **data_kw), build_dataset(args.dataset, "val", **data_kw)
    net, opt, sched = build_model(args, train_set.num_classes, device)
    start, ckpt = 0, out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        start = load_checkpoint(ckpt, args, net, opt, sched, device)
    stop = min(args.iters, args.stop_at or args.iters)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    batches = train_batches(train_set, args, rank, world, start)

    log = CsvLog(out / "log.csv", start) if rank == 0 else None
    bar = progress(args.iters, start, rank == 0 and not args.no_progress)
    if rank == 0:
        say(bar, f"protoseg-train: {args.dataset}, {len(train_set)} train / {len(val_set)} val images, "
                 f"{train_set.num_classes} classes, {world} process(es) on {device.type}, "
                 f"{backend} kernels, iterations {start} to {stop}")  # fmt: skip
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
            metrics = evaluate(net, val_set, args, device, rank, world, out)
            if rank == 0:
                say(bar, iou_table(metrics, it))
                atomic_save({"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"], "iters": it,
                             "pixel_accuracy": metrics["pixel_accuracy"]}, out / "metrics.json")  # fmt: skip
                log.write(iter=it, miou=metrics["miou"])
        if rank == 0 and (evaluating or it == stop):
            save_checkpoint(ckpt, it, args, net, opt, sched)
            log.plot(out / "curves.png")
        if evaluating:
            meter.restart_clock()  # throughput counts training only
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    return metrics


def save_checkpoint(path: Path, it: int, args, net, opt, sched) -> None:
    """Everything the next step depends on: weights and prototypes, optimizer, schedule, RNG."""
    state = {
        "iter": it,
        "args": dict(vars(args)),
        "model": net.state_dict(),  # includes head.prototypes
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    atomic_save(state, path)


def load_checkpoint(path: Path, args, net, opt, sched, device) -> int:
    """Restore a checkpoint of the same schedule; returns the iteration to continue from."""
    state = torch.load(path, map_location=device, weights_only=True)
    saved = state["args"]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
            for k in SCHEDULE_KEYS if saved.get(k) != getattr(args, k)]  # fmt: skip
    if diff:
        fail(f"cannot resume {path}: it was trained with " + ", ".join(diff))
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return int(state["iter"])


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

