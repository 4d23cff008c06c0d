"""Export a trained model to ONNX and check it: ``python -m protoseg_ext.train.export``.

    python -m protoseg_ext.train.export --checkpoint runs/x/checkpoint.pt --out model.onnx

Rebuilds the network of a ``protoseg-train`` checkpoint (compact or timm
backbone; the weights come from the checkpoint, nothing is downloaded), writes
it as ONNX with dynamic batch, height and width (``protoseg_ext.deploy``), then
runs the file in ONNX Runtime on the checkpoint's validation images and
compares its mIoU with the PyTorch model's: the command fails unless they agree
within ``--tolerance`` points (default 0.1). ``--aoti PATH`` also writes an
AOTInductor package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from .. import deploy
from .data import IGNORE_INDEX, DatasetError, EvalView, build_dataset
from .loop import CheckpointError, build_model, iou_metrics, parse_args, read_checkpoint
from .model import BackboneError


class SegModel(nn.Module):
    """``images (B, 3, H, W)`` -> seg logits ``(B, C, H, W)``: the network's inference output alone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


def _fail(message: str):
    raise SystemExit(f"protoseg-export: error: {message}")


def load_trained(checkpoint: Path, data_root=None):
    """``(SegModel in eval mode, validation dataset, training args)`` of a protoseg-train checkpoint."""
    try:
        state = read_checkpoint(checkpoint, "cpu")
    except CheckpointError as e:
        _fail(str(e))
    args = parse_args(["--dataset", "synthetic"])  # today's defaults for settings the checkpoint predates
    vars(args).update(state["args"])
    args.pretrained = None  # the weights come from the checkpoint
    if data_root is not None:
        args.data_root = data_root
    try:
        val_set = build_dataset(args.dataset, "val", root=args.data_root, synthetic_size=args.synthetic_size,
                                synthetic_count=args.synthetic_count, seed=args.seed)
        net, _, _ = build_model(args, val_set.num_classes, "cpu")
    except (DatasetError, BackboneError) as e:
        _fail(str(e))
    net.load_state_dict(state["model"])
    return SegModel(net).eval(), val_set, args


@torch.no_grad()
def compare_miou(model: nn.Module, onnx_path: Path, val_set, limit=None) -> dict:
    """mIoU of the PyTorch model and of ONNX Runtime on the first ``limit`` validation images."""
    C = val_set.num_classes
    conf = {"pytorch": torch.zeros(C * C, dtype=torch.int64), "onnxruntime": torch.zeros(C * C, dtype=torch.int64)}
    session = deploy._ort_session(onnx_path)
    n = len(val_set) if limit is None else min(limit, len(val_set))
    view, worst = EvalView(val_set, range(n)), 0.0
    for i in range(n):
        image, label, _ = view[i]
        image, label = image[None], label[None].long()
        ref = model(image)
        out = deploy.run_onnx(onnx_path, image, session)
        worst = max(worst, float((out - ref).abs().max()))
        valid = label != IGNORE_INDEX
        for name, seg in (("pytorch", ref), ("onnxruntime", out)):
            conf[name] += torch.bincount(label[valid] * C + seg.argmax(1)[valid], minlength=C * C)
    names = val_set.class_names
    miou = {name: iou_metrics(c.view(C, C), names)["miou"] for name, c in conf.items()}
    return {"images": n, "miou": miou, "max_abs_diff": worst}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="protoseg-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a protoseg-train checkpoint.pt")
    p.add_argument("--out", required=True, type=Path, help="the ONNX file to write")
    p.add_argument("--data-root", help="the dataset directory, if not the one the checkpoint was trained on")
    p.add_argument("--val-limit", type=int, metavar="N", help="check on the first N validation images only")
    p.add_argument("--tolerance", type=float, default=0.1, help="mIoU points ONNX Runtime may differ by (default: 0.1)")
    p.add_argument("--no-check", action="store_true", help="write the file without running ONNX Runtime")
    p.add_argument("--aoti", type=Path, metavar="PATH", help="also write an AOTInductor package (.pt2)")
    a = p.parse_args(argv)
    model, val_set, args = load_trained(a.checkpoint, a.data_root)
    example = EvalView(val_set, [0])[0][0][None]
    deploy.export_onnx(model, example, a.out)
    print(f"wrote {a.out} (backbone {args.backbone}, {val_set.num_classes} classes; dynamic batch, height, width)")
    if a.aoti:
        deploy.export_aoti(model, example, a.aoti)
        print(f"wrote {a.aoti} (AOTInductor; load with protoseg_ext.deploy.load_aoti)")
    if a.no_check:
        return {}
    result = compare_miou(model, a.out, val_set, a.val_limit)
    pt, ort = result["miou"]["pytorch"], result["miou"]["onnxruntime"]
    diff = abs(pt - ort) * 100
    ok = diff <= a.tolerance
    print(f"mIoU on {result['images']} validation images: PyTorch {pt * 100:.2f}%, ONNX Runtime {ort * 100:.2f}% "
          f"(difference {diff:.3f} points, max |logit difference| {result['max_abs_diff']:.2e}): "
          + ("OK" if ok else f"FAILED, more than {a.tolerance} points"), flush=True)
    if not ok:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
