"""H100 roofline of every op at the benchmark sizes: what a first GPU run is judged against.

    python bench/roofline.py [--sizes cityscapes,ade20k] [--dtype bfloat16] [--out bench/results/roofline.md]

For each op: FLOPs and compulsory HBM bytes from the shapes, the time at the
H100 SXM's published peaks (protoseg_ext.kernels.roofline), and the bound.
Compare a measured GPU time (bench/run.py --device cuda) with the larger of
the two times.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.providers import SIZES  # noqa: E402
from protoseg_ext.kernels.roofline import OPS, h100_roofline  # noqa: E402


def table(sizes, dtype: str) -> str:
    rows = [
        f"H100 SXM roofline, {dtype} (peaks: NVIDIA H100 datasheet)",
        "",
        "| size | op | GFLOP | MB moved | compute us | memory us | bound |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for name in sizes:
        s = SIZES[name]
        for op in OPS:
            r = h100_roofline(op, s.N, s.D, s.C, s.K, dtype)
            rows.append(
                f"| {name} | {op} | {r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.1f} | "
                f"{r['t_compute_s'] * 1e6:.1f} | {r['t_memory_s'] * 1e6:.1f} | {r['bound']} |"
            )
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="cityscapes,ade20k,cocostuff,d256,fullres,fullres-ade20k")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    sizes = [s for s in a.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; known: {', '.join(SIZES)}")
    md = table(sizes, a.dtype)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
