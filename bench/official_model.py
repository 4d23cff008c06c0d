"""The official model's training step, unpatched and accelerated, against ProtoSegHead.

    python bench/official_model.py                       # B=2, D=720, 128x128 features, C=19, K=10
    python bench/official_model.py --fullres             # 1 x 720 x 1024 x 2048 head input: memory

The step is the official ``HRNet_W48_Proto.forward`` from the backbone
features on (identity ``cls_head`` and ``proj_head``, as written in
``protoseg_ext.testing.official``), ``PixelPrototypeCELoss`` and the backward,
with labels at 4x the feature resolution (the official 1/4-resolution head) and
10% of them ignored. Providers, each in a process of its own, rounds
interleaved, best time kept:

* ``official``: the eager transcription, unpatched;
* ``accelerated``: the same classes after ``protoseg_ext.compat.accelerate``;
* ``head``: ``ProtoSegHead`` on the same map with CE + 0.01 PPC + 0.001 PPD.

``peak`` is the RSS high-water mark over every measured step, ``extra`` that
peak less the memory just before the first step (the step's own memory beyond
its inputs). ``--fullres`` runs one step of ``accelerated`` and ``head`` at
1 x 720 x 1024 x 2048 (labels at the same size) and compares their peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROVIDERS = ("official", "accelerated", "head")


def _inputs(B, D, H, W, C, scale, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=g)
    gt = torch.randint(0, C, (B, H * scale, W * scale), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.1] = -1
    return feats.requires_grad_(), gt


def _step_fn(provider, D, C, K):
    """A closure running one training step on ``(feats, gt)``."""
    import torch
    import torch.nn.functional as F

    from protoseg_ext import ProtoSegHead, compat
    from protoseg_ext.testing.official import OfficialProtoLoss, OfficialProtoModel

    torch.manual_seed(0)
    if provider == "head":
        head = ProtoSegHead(D, C, K)

        def step(feats, gt):
            out = head(feats, F.interpolate(gt[:, None].float(), size=feats.shape[2:], mode="nearest")[:, 0].long())
            seg = F.interpolate(out.seg, size=gt.shape[1:], mode="bilinear", align_corners=True)
            loss = F.cross_entropy(seg, gt, ignore_index=-1) + 0.01 * out.loss_ppc + 0.001 * out.loss_ppd
            loss.backward()

        return step

    class Model(OfficialProtoModel):
        pass

    class Loss(OfficialProtoLoss):
        pass

    if provider == "accelerated":
        compat.accelerate(Model, Loss)
    model, criterion = Model(D, C, K), Loss()

    def step(feats, gt):
        criterion(model(feats, gt_semantic_seg=gt[:, None]), gt).backward()

    return step


def worker(args):
    import torch

    from bench.worker import PeakMemory

    B, D, H, W = args.shape
    step = _step_fn(args.provider, D, args.classes, args.prototypes)
    feats, gt = _inputs(B, D, H, W, args.classes, args.label_scale)
    mem = PeakMemory("cpu")
    times, first_peak = [], None
    mem.reset()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(feats, gt)
        feats.grad = None
        t = time.perf_counter() - t0
        if i == 0:
            first_peak = mem.peak()
        if i >= args.warmup:
            times.append(t)
    peak = mem.peak()
    print("RESULT " + json.dumps({
        "provider": args.provider, "times_s": times, "peak_mib": peak / 2**20, "first_step_peak_mib": first_peak / 2**20,
        "extra_mib": (peak - mem.base) / 2**20, "threads": torch.get_num_threads(),
    }), flush=True)


def _run(provider, args, shape, steps, warmup, label_scale):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--shape", *map(str, shape),
           "--classes", str(args.classes), "--prototypes", str(args.prototypes), "--steps", str(steps),
           "--warmup", str(warmup), "--label-scale", str(label_scale)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"provider": provider, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "baseline"
    except (OSError, StopIteration):
        isa = "?"
    return f"{platform.processor() or platform.machine()}, {isa}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=PROVIDERS, dest="provider", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=4, default=(2, 720, 128, 128), metavar=("B", "D", "H", "W"))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--prototypes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every provider (default: 3)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--label-scale", type=int, default=4, help="label size / feature size (official head: 4)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, of " + ", ".join(PROVIDERS))
    p.add_argument("--fullres", action="store_true", help="two steps at 1 x 720 x 1024 x 2048: accelerated vs head")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.provider:
        return worker(args)
    if args.fullres:
        shape, providers, rounds, steps, warmup, scale = (1, 720, 1024, 2048), ("accelerated", "head"), 1, 2, 0, 1
    else:
        providers = tuple(args.providers.split(","))
        if not set(providers) <= set(PROVIDERS):
            p.error(f"--providers: unknown {sorted(set(providers) - set(PROVIDERS))}")
        shape, rounds, steps, warmup, scale = args.shape, args.rounds, args.steps, args.warmup, args.label_scale
    best = {}
    for r in range(rounds):
        for prov in providers:
            res = _run(prov, args, shape, steps, warmup, scale)
            print(f"round {r + 1} {prov}: {json.dumps(res)}", flush=True)
            old = best.get(prov)
            if "error" in res or old is None or "error" in old:
                best[prov] = res if old is None or "error" in old else old
                continue
            old["times_s"] = [min(min(old["times_s"]), min(res["times_s"]))]
            for k in ("peak_mib", "first_step_peak_mib", "extra_mib"):
                old[k] = max(old[k], res[k])  # a training run's peak: the worst round
    B, D, H, W = shape
    print(f"\nofficial-style step, B={B} D={D} {H}x{W} features, labels x{scale}, C={args.classes} "
          f"K={args.prototypes}; CPU: {_cpu_name()}")
    print(f"{'provider':<12} {'best step':>10} {'vs official':>12} {'peak RSS':>10} {'extra':>10}")
    base = best.get("official", {}).get("times_s")
    for prov in providers:
        res = best[prov]
        if "error" in res:
            print(f"{prov:<12} failed: {res['error']}")
            continue
        t = min(res["times_s"])
        ratio = f"{min(base) / t:.2f}x" if base else ""
        print(f"{prov:<12} {t * 1e3:>8.0f} ms {ratio:>12} {res['peak_mib']:>6.0f} MiB {res['extra_mib']:>6.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": shape, "cpu": _cpu_name(), "results": best}, f, indent=1)


if __name__ == "__main__":
    main()
