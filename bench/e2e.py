"""What the head does to a whole training step: the training script's model, end to end.

    python bench/e2e.py                                   # compact, hrnet_w18_small_v2, hrnet_w48; 1/4 and full res
    python bench/e2e.py --backbones compact --strides 4 --steps 2

One training step of :class:`protoseg_ext.train.model.ProtoSegNet` (backbone,
cls_head, projection to the 720-channel embedding, ProtoSegHead, CE + 0.01 PPC +
0.001 PPD, backward, SGD step) on a random ``512 x 1024`` crop (batch 1,
Cityscapes' 19 classes, 5% of the labels ignored), random weights (nothing is
downloaded), with the head at 1/4 resolution (``head_stride=4``, official: 128 x
256 = 32,768 pixels) and at full resolution (``head_stride=1``: 524,288 pixels),
and two heads:

* ``cpu``: ProtoSegHead with the ``cpu`` backend (the fused kernels);
* ``official``: the official head's eager step on the same parameters
  (:func:`protoseg_ext.testing.official_head_step`: permute, LayerNorm, the
  full ``N x C*K`` similarity, the per-class loop).

Each (backbone, stride, head) runs in a process of its own: ``--steps`` timed
steps after one warm-up step. Reported per row: the step's time (median), the
peak RSS over every step the process ran and the first step's, and the head's
share: the head's own step (the same embedding, detached: head, seg
upsampling, the loss, backward to the embedding) timed in the same process
after each step, over the step's time. A row whose estimated memory exceeds
``--mem-fraction`` of the machine's is skipped with its estimate (the estimate:
the ``cpu`` row's measured peak, less the fused head's estimated memory, plus the
eager head's; see ``bench/providers.estimate_bytes``). Rows go to
``bench/results/e2e.csv`` and ``e2e.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BACKBONES = ("compact", "hrnet_w18_small_v2", "hrnet_w48")
HEADS = ("cpu", "official")
NUM_CLASSES, PROJ_DIM, K = 19, 720, 10
FIELDS = ["run_id", "timestamp", "machine", "torch", "commit", "backbone", "crop", "head_stride", "pixels", "head",
          "status", "step_ms", "steps", "step_ms_all", "head_ms", "head_share", "peak_mem_mb", "first_peak_mem_mb",
          "step_peaks_mb", "estimate_gb"]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--strides", default="4,1", help="head resolutions: 4 (official, 1/4) and/or 1 (full)")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--crop", default="512x1024", help="H x W of the input crop")
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--mem-fraction", type=float, default=0.9)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # worker: backbone,stride,head
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the worker


class OfficialHead:
    """Runs the official eager step in place of ProtoSegHead.forward (same parameters and buffers)."""

    def __init__(self, head):
        self.head = head

    def __call__(self, feats, labels):
        import torch

        from protoseg_ext.head import ProtoSegOutput
        from protoseg_ext.testing import official_head_step

        B, _, H, W = feats.shape
        gt = self.head._labels_at(labels, B, H, W).view(B, H, W)  # nearest-downsampled, as the head
        gt = torch.where(gt == self.head.target_ignore, torch.full_like(gt, self.head.ignore_index), gt)
        seg, ppc, ppd, target, new = official_head_step(self.head, feats, gt)
        with torch.no_grad():
            self.head.prototypes.copy_(new)
        return ProtoSegOutput(seg, ppc, ppd, target)


def _rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args):
    import torch

    from protoseg_ext.train.model import ProtoSegNet

    backbone, stride, head = args.one.split(",")
    stride = int(stride)
    H, W = (int(v) for v in args.crop.split("x"))
    torch.manual_seed(0)
    net = ProtoSegNet(NUM_CLASSES, proj_dim=PROJ_DIM, num_prototype=K, head_stride=stride, ignore_index=255,
                      backend="cpu", backbone=backbone)
    net.train()
    if head == "official":
        net.head.forward = OfficialHead(net.head)  # the module's call runs the official step
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, H, W, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (1, H, W), generator=g)
    labels[torch.rand(1, H, W, generator=g) < 0.05] = 255

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, losses = net(images, labels)
        losses["loss"].backward()
        opt.step()
        return time.perf_counter() - t0

    embed = net.embed

    def head_step():
        """The head's part of the step: the same embedding, detached, through head, upsampling and loss."""
        with torch.no_grad():
            emb = embed(images)
        emb.requires_grad_(True)
        net.embed = lambda _images: emb
        try:
            t0 = time.perf_counter()
            _, losses = net(images, labels)
            losses["loss"].backward()
            return time.perf_counter() - t0
        finally:
            net.embed = embed
            del emb

    peaks, times, head_times = [], [], []
    for i in range(1 + args.steps):
        _rss_reset()
        t = step()
        peaks.append(_hwm_bytes())
        if i > 0:
            times.append(t)
            head_times.append(head_step())
    pixels = images.shape[0] * (H // stride) * (W // stride)
    step_ms = statistics.median(times) * 1e3
    head_ms = statistics.median(head_times) * 1e3
    print("RESULT " + json.dumps(dict(
        status="ok", pixels=pixels, step_ms=step_ms, steps=len(times),
        step_ms_all=";".join(f"{t * 1e3:.0f}" for t in times), head_ms=head_ms, head_share=head_ms / step_ms,
        peak_mem_mb=max(peaks) / 2**20, first_peak_mem_mb=peaks[0] / 2**20,
        step_peaks_mb=";".join(str(round(p / 2**20)) for p in peaks))), flush=True)


# ----------------------------------------------------------------------------- the driver


def eager_estimate_bytes(cpu_peak_bytes, pixels):
    """The official head's row: the cpu row's measured peak, less the fused head's estimate, plus the eager's."""
    from bench.providers import Size, estimate_bytes

    size = Size(pixels, PROJ_DIM, NUM_CLASSES, K, "")
    return cpu_peak_bytes - estimate_bytes("cpu", size) + estimate_bytes("official", size)


def markdown(rows, meta):
    out = [f"Machine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}; {meta['timestamp']}.", "",
           "| backbone | head at | pixels | head | step s | head s | head share | peak GiB (all steps) "
           "| first step GiB | notes |",
           "|---|---|--:|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        res = "1/4" if int(r["head_stride"]) == 4 else "full"
        if r["status"] != "ok":
            out.append(f"| {r['backbone']} | {res} | {int(r['pixels']):,} | {r['head']} | | | | | | {r['status']} |")
            continue
        out.append(f"| {r['backbone']} | {res} | {int(r['pixels']):,} | {r['head']} | {r['step_ms'] / 1e3:.2f} "
                   f"| {r['head_ms'] / 1e3:.2f} | {100 * r['head_share']:.0f}% | {r['peak_mem_mb'] / 1024:.2f} "
                   f"| {r['first_peak_mem_mb'] / 1024:.2f} | steps {r['step_ms_all']} ms |")
    out += ["", "step: one training step of the whole model (forward, backward, SGD), median of the timed steps "
            "after one warm-up; head: the head's own step on the same embedding (head, seg upsampling, loss, "
            "backward to the embedding), timed in the same process; peak: RSS high-water mark over every step "
            "of the process (warm-up included), and the first step's.", ""]
    return "\n".join(out)


def main(argv=None):
    args = _parse(argv)
    if args.one:
        worker(args)
        return 0
    import torch

    from bench.providers import total_memory_bytes
    from bench.run import git_commit, machine_info

    H, W = (int(v) for v in args.crop.split("x"))
    meta = dict(run_id=datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
                timestamp=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_info("cpu"),
                torch=torch.__version__, commit=git_commit())
    print(f"run {meta['run_id']}: {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    capacity = total_memory_bytes("cpu") * args.mem_fraction
    rows = []
    heads = [h for h in HEADS if h in args.heads.split(",")]  # cpu first: the eager estimate builds on it
    for backbone in [b for b in args.backbones.split(",") if b]:
        for stride in [int(s) for s in args.strides.split(",") if s]:
            pixels = (H // stride) * (W // stride)
            cpu_peak = None
            for head in heads:
                row = dict(meta, backbone=backbone, crop=args.crop, head_stride=stride, pixels=pixels, head=head)
                est = None
                if head == "official" and cpu_peak is not None:
                    est = eager_estimate_bytes(cpu_peak, pixels)
                    row["estimate_gb"] = round(est / 2**30, 1)
                if est is not None and est > capacity:
                    row["status"] = (f"skipped: the eager head needs ~{est / 2**30:.0f} GB "
                                     f"(of {capacity / 2**30:.0f} usable)")
                else:
                    t0 = time.perf_counter()
                    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{backbone},{stride},{head}",
                           "--crop", args.crop, "--steps", str(args.steps)]
                    try:
                        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
                        res = next((json.loads(ln[7:]) for ln in proc.stdout.splitlines()
                                    if ln.startswith("RESULT ")), None)
                        if res is None:
                            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
                            res = {"status": "OOM (killed)" if proc.returncode in (-9, 137)
                                   else f"error: {(tail or ['exit ' + str(proc.returncode)])[0][:200]}"}
                    except subprocess.TimeoutExpired:
                        res = {"status": f"timeout after {args.timeout:.0f} s"}
                    row.update(res)
                    if head == "cpu" and res.get("status") == "ok":
                        cpu_peak = res["peak_mem_mb"] * 2**20
                    print(f"  {backbone} stride {stride} {head}: {time.perf_counter() - t0:.0f} s", flush=True)
                rows.append(row)
                if row["status"] == "ok":
                    print(f"    step {row['step_ms'] / 1e3:.2f} s, head {row['head_ms'] / 1e3:.2f} s "
                          f"({100 * row['head_share']:.0f}%), peak {row['peak_mem_mb'] / 1024:.2f} GiB "
                          f"(first step {row['first_peak_mem_mb'] / 1024:.2f})", flush=True)
                else:
                    print(f"    {row['status']}", flush=True)
    csv_path = os.path.join(args.out_dir, "e2e.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    md = markdown(rows, meta)
    with open(os.path.join(args.out_dir, "e2e.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
