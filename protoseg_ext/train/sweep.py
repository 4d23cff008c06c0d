"""Seed sweep of prototype assignments x datasets: ``python -m protoseg_ext.train.sweep``.

    python -m protoseg_ext.train.sweep --out runs/sweep                 # 3 assignments x 2 datasets x 5 seeds
    python -m protoseg_ext.train.sweep --out runs/sweep --seeds 0 1 2 3 4 5 6 7 -- --backend cpu
    python -m protoseg_ext.train.sweep --out runs/sweep --table-only    # the table of the runs done so far

Every run is one ``python -m protoseg_ext.train`` run (in this process, one
after the other) in ``OUT/runs/<dataset>/<assign>/seed<S>``, with the same
settings for every arm (``--iters``, ``--lr`` and everything after ``--`` go
to every run; only ``--assign``, ``--seed`` and the dataset differ). A run
that finished is not run again, an interrupted one resumes, so the command
can be stopped and started again (the runs go seed by seed, so the arms of
a sweep stopped early have the same seeds), or run several times with other
``--seeds`` into the same ``OUT`` (the table collects every finished run).

The datasets: ``synthetic`` (the procedural scenes, one look per class) and
``multilook`` (the same scenes with three looks per class in uneven shares,
``--synthetic-looks 3``). Defaults: 1,000 iterations on 64 x 128 scenes,
gamma 0.99 (the momentum forgets in about 100 iterations), one evaluation at
the end; 30 runs of about 1.5 minutes on two CPU cores.

Writes to ``OUT``:

* ``table.md``: per dataset and assignment, the mean and spread (sample
  standard deviation over the seeds) of the final mIoU, the prototype cosine
  (mean over the classes of the K (K - 1) pairs of distinct prototypes) and
  the prototypes in use per class, and the per-class prototype cosine (mean
  over the seeds);
* ``table.csv`` and ``table.json``: the same numbers; ``runs.csv``: one row per run;
* ``pictures/similarity_<dataset>_<assign>.png``: the pixel-prototype
  similarity picture of each arm's first seed at its last evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

ASSIGNS = ("gumbel", "argmax", "sample")
DATASETS = {
    "synthetic": ["--dataset", "synthetic"],
    "multilook": ["--dataset", "synthetic", "--synthetic-looks", "3"],
}
# the settings every run shares unless given after "--"
DEFAULT_RUN = ["--synthetic-size", "64", "128", "--gamma", "0.99", "--num-pictures", "1", "--num-preds", "0",
               "--no-progress"]  # fmt: skip


def parse_args(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m protoseg_ext.train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="runs/sweep", metavar="DIR", help="default: runs/sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: 0 1 2 3 4")
    p.add_argument("--assign", nargs="+", choices=ASSIGNS, default=list(ASSIGNS), help="default: all three")
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS),
                   help="default: synthetic multilook")  # fmt: skip
    p.add_argument("--iters", type=int, default=1000, help="iterations of every run (default: 1000)")
    p.add_argument("--table-only", action="store_true", help="no training: the table of the finished runs in OUT")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds holds a seed twice")
    args.run_args = extra
    return args


def run_dir(out: Path, dataset: str, assign: str, seed: int) -> Path:
    return out / "runs" / dataset / assign / f"seed{seed}"


def run_argv(args, dataset: str, assign: str, seed: int) -> list:
    """The training script's arguments of one run: the sweep's, then the user's after ``--``."""
    folder = run_dir(Path(args.out), dataset, assign, seed)
    return [*DEFAULT_RUN, *DATASETS[dataset], "--iters", str(args.iters), "--eval-every", str(args.iters),
            *args.run_args, "--assign", assign, "--seed", str(seed), "--out", str(folder), "--resume"]  # fmt: skip


def finished(folder: Path, iters: int):
    """The run's final metrics, or None when it has not reached ``iters``."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("iters") == iters else None


def mean_std(values):
    """Mean and sample standard deviation (NaN for a single value); NaN, NaN for none."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def collect(args):
    """Every finished run of the sweep: ``{(dataset, assign): {seed: metrics}}``."""
    out = Path(args.out)
    found = {}
    for dataset in args.datasets:
        for assign in args.assign:
            runs = {}
            for seed in args.seeds:
                m = finished(run_dir(out, dataset, assign, seed), args.iters)
                if m is not None:
                    runs[seed] = m
            found[(dataset, assign)] = runs
    return found


def summarise(found) -> list:
    """One row per (dataset, assignment): seeds, mean and spread of mIoU (%), prototype cosine,
    prototypes in use, and the per-class prototype cosine (mean over the seeds)."""
    rows = []
    for (dataset, assign), runs in found.items():
        ms = list(runs.values())
        row = {"dataset": dataset, "assign": assign, "seeds": sorted(runs)}
        for key, get in (
            ("miou", lambda m: 100 * m["miou"]),
            ("prototype_cosine", lambda m: m["prototype_cosine"]),
            ("prototypes_in_use", lambda m: m.get("prototype_usage", {}).get("mean_in_use")),
        ):
            row[key + "_mean"], row[key + "_std"] = mean_std([get(m) for m in ms])
        classes = list(ms[0]["prototype_cosine_per_class"]) if ms else []
        present = [c for c in classes if any(m["per_class_iou"].get(c) is not None for m in ms)]
        row["prototype_cosine_per_class"] = {
            c: mean_std([m["prototype_cosine_per_class"][c] for m in ms])[0] for c in present
        }
        rows.append(row)
    return rows


def _pm(m, s, digits):
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(rows, args) -> str:
    extra = " ".join(args.run_args)
    lines = [
        "# Prototype assignment sweep",
        "",
        f"{args.iters} iterations per run, seeds {' '.join(map(str, args.seeds))}; every run: "
        f"`python -m protoseg_ext.train {' '.join(DEFAULT_RUN)} --iters {args.iters}"
        + (f" {extra}" if extra else "") + " --assign A --seed S` and the dataset's flags "
        "(multilook: `--synthetic-looks 3`). Mean ± sample standard deviation over the seeds; "
        "prototype cosine: mean cosine over the K (K - 1) pairs of distinct prototypes of a class "
        "(1: collapsed), averaged over the classes; in use: prototypes of a class that are the "
        "nearest for at least 1% of its validation pixels, averaged over the classes.",
        "",
        "| dataset | assignment | seeds | mIoU (%) | prototype cosine | prototypes in use |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['assign']} | {len(r['seeds'])} | {_pm(r['miou_mean'], r['miou_std'], 1)} | "
            f"{_pm(r['prototype_cosine_mean'], r['prototype_cosine_std'], 3)} | "
            f"{_pm(r['prototypes_in_use_mean'], r['prototypes_in_use_std'], 1)} |"
        )
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        arms = [r for r in rows if r["dataset"] == dataset and r["seeds"]]
        classes = list(dict.fromkeys(c for r in arms for c in r["prototype_cosine_per_class"]))
        if not classes:
            continue
        lines += ["", f"Per-class prototype cosine, {dataset} (mean over the seeds):", "",
                  "| class | " + " | ".join(r["assign"] for r in arms) + " |",
                  "|---|" + "--:|" * len(arms)]  # fmt: skip
        for c in classes:
            cells = [r["prototype_cosine_per_class"].get(c) for r in arms]
            lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(args) -> list:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = collect(args)
    rows = summarise(found)
    (out / "table.md").write_text(markdown(rows, args))
    (out / "table.json").write_text(json.dumps({"iters": args.iters, "run_args": args.run_args, "rows": rows},
                                               indent=2) + "\n")  # fmt: skip
    keys = ["dataset", "assign", "seeds", "miou_mean", "miou_std", "prototype_cosine_mean", "prototype_cosine_std",
            "prototypes_in_use_mean", "prototypes_in_use_std"]  # fmt: skip
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([len(r["seeds"]) if k == "seeds" else r[k] for k in keys])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "assign", "seed", "miou", "prototype_cosine", "prototypes_in_use"])
        for (dataset, assign), runs in found.items():
            for seed, m in sorted(runs.items()):
                use = m.get("prototype_usage", {}).get("mean_in_use")
                w.writerow([dataset, assign, seed, m["miou"], m["prototype_cosine"], use])
    pictures = out / "pictures"
    for (dataset, assign), runs in found.items():
        if not runs:
            continue
        shots = sorted((run_dir(out, dataset, assign, min(runs)) / "pictures").glob("similarity_iter*.png"))
        if shots:
            pictures.mkdir(exist_ok=True)
            shutil.copyfile(shots[-1], pictures / f"similarity_{dataset}_{assign}.png")
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    from .loop import main as train

    if not args.table_only:
        # seed by seed: a sweep stopped early has the same seeds in every arm
        todo = [(d, a, s) for s in args.seeds for d in args.datasets for a in args.assign]
        for n, (dataset, assign, seed) in enumerate(todo, 1):
            folder = run_dir(Path(args.out), dataset, assign, seed)
            if finished(folder, args.iters) is not None:
                print(f"sweep: [{n}/{len(todo)}] {dataset} {assign} seed {seed}: done before, kept", flush=True)
                continue
            print(f"sweep: [{n}/{len(todo)}] {dataset} {assign} seed {seed}", flush=True)
            m = train(run_argv(args, dataset, assign, seed))
            print(f"sweep: [{n}/{len(todo)}] mIoU {100 * m['miou']:.1f}, prototype cosine "
                  f"{m['prototype_cosine']:.3f}", flush=True)  # fmt: skip
            write_table(args)  # the table so far, after every run
    rows = write_table(args)
    print((Path(args.out) / "table.md").read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
