"""Markdown table and PNG chart of benchmark rows; re-plots from the CSV.

    python bench/plot.py                          # latest run in bench/results/bench.csv
    python bench/plot.py --run-id all --csv my.csv --png my.png --markdown my.md

``bench/run.py`` calls :func:`write_markdown` and :func:`plot` at the end of a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

FIELDS = [
    "run_id", "timestamp", "machine", "device", "torch", "commit",
    "size", "N", "D", "C", "K", "labels", "provider", "mode", "status",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "repeats", "first_ms",
    "floor_ms", "x_floor", "floor_inproc_ms", "x_floor_inproc", "x_floor_strict", "vs_official",
    "rounds", "round_ms", "failed_rounds",
    "peak_mem_mb", "first_peak_mem_mb", "extra_mem_mb", "step_peaks_mb", "step_start_mb", "mem_kind", "phases",
    "ops", "views", "syncs", "sync_detail", "graph_breaks", "graphs", "load1",
]  # fmt: skip

MODE_ORDER = ("forward", "backward", "full", "update")
PROVIDER_ORDER = ("official", "official+compile", "vectorized", "cpu", "triton", "cuda")
FLOOR = "floor"

COLUMN_HELP = """\
Columns: **median** and **p20-p80**: wall time of one step over the timed repeats of the provider's best
round (milliseconds; the first call is timed apart as *first*); **rounds**: each round's median (each
round runs the floor and every provider once, in turn, each in a fresh process). **x floor**: median / the
GEMM floor of the same size and mode (forward: `feats @ P.T`, N x D x CK; backward: `dS @ P`; full: both;
on contiguous (N, D) rows, into outputs allocated before the clock starts; update has none: the fused
update needs only the K own-class columns), the floor timed in a process of its own in the same rounds;
**in-proc**: the same ratio against the floor timed in the provider's process after each of its repeats
(up to 262,144 pixels); the larger of the two is the one to quote (**strict** in the summary). **vs
official**: official median / this median. **peak MB**: the highest RSS high-water mark (CPU) or
`max_memory_allocated` (GPU) over every step the provider ran (warm-up and timed, every round: what a
training run needs), **1st MB** the first step's; **+step MB**: the peak less the process with its
inputs, i.e. what the steps themselves need (on CPU it includes some 150 MB of one-time runtime
allocations, thread pools and workspaces, visible even at the tiny size). **ops**: aten and custom ops
dispatched in one step (each is at least one kernel launch on a GPU; views included), **syncs**: those
with a data-dependent output shape or a host value (boolean indexing, `nonzero`, `.item()`,
`bool(tensor)`): each stops the host until the GPU catches up. Counted with a TorchDispatchMode;
`official+compile` runs fused code and is not counted, its *graphs / breaks* are Dynamo's compiled graphs
and graph breaks. **phases** (with `--phases`): one more step under torch.profiler, wall ms of each op
at top level (backward nodes as `evaluate_function: <Node>`), `gemm` the ATen GEMMs' time (self time over
all threads / threads)."""


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def select_run(rows, run_id="latest"):
    if run_id == "all" or not rows:
        return rows
    if run_id == "latest":
        run_id = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fmt_ms(v):
    x = _num(v)
    if x is None:
        return ""
    return f"{x:,.0f}" if x >= 100 else (f"{x:.1f}" if x >= 1 else f"{x:.3f}")


def _fmt(v, spec):
    x = _num(v)
    return "" if x is None else format(x, spec)


def _key(row):
    mode = row["mode"]
    prov = row["provider"]
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else 99,
            -1 if prov == FLOOR else (PROVIDER_ORDER.index(prov) if prov in PROVIDER_ORDER else 98))


def _groups(rows):
    """Rows grouped by (size, labels) in the order they first appear; floor rows join every labels group."""
    groups = OrderedDict()
    floors = {}
    for r in rows:
        if r["provider"] == FLOOR:
            floors.setdefault(r["size"], []).append(r)
            continue
        groups.setdefault((r["size"], r["labels"]), []).append(r)
    for (size, labels), rs in groups.items():
        rs.extend(floors.get(size, []))
        rs.sort(key=_key)
    for size, rs in floors.items():  # a floor-only size still shows
        if not any(k[0] == size for k in groups):
            groups[(size, rs[0]["labels"])] = sorted(rs, key=_key)
    return groups


def summary(rows, mode="full") -> list:
    """Lines of a compact table: one row per (size, labels), the median of ``mode`` per provider.

    The last columns compare the fastest fused provider with the official and
    vectorized paths and with the GEMM floor.
    """
    rs = [r for r in rows if r["mode"] == mode]
    if not rs:
        return []
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rs)]
    fused = [p for p in ("cpu", "cuda", "triton") if p in providers]
    head = ["size", "labels", "GEMM floor"] + providers
    if fused:
        head += ["fused vs official", "fused vs vectorized", "fused x floor (strict)"]
    out = [f"{mode.capitalize()} step, median ms (fused = the fastest of {', '.join(fused) or 'none'}):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "--:|" * (len(head) - 2)]
    for (size, labels), grp in _groups(rs).items():
        med = {r["provider"]: _num(r["median_ms"]) if r["status"] == "ok" else None for r in grp}
        status = {r["provider"]: r["status"] for r in grp}
        cells = [size, labels, _fmt_ms(med.get(FLOOR))]
        for p in providers:
            cells.append(_fmt_ms(med[p]) if med.get(p) is not None else status.get(p, "").split(":")[0])
        if fused:
            best = min((med[p] for p in fused if med.get(p) is not None), default=None)

            def ratio(a, b):
                return f"{a / b:.2f}x" if a is not None and b else ""

            best_row = next((r for r in grp if r["provider"] in fused and _num(r.get("median_ms")) == best), {})
            x_floor = _num(best_row.get("x_floor_strict"))  # the larger of the two floors' ratios
            cells += [ratio(med.get("official"), best), ratio(med.get("vectorized"), best),
                      f"{x_floor:.2f}x" if x_floor is not None else ratio(best, med.get(FLOOR))]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def markdown(rows) -> str:
    if not rows:
        return "No benchmark rows.\n"
    r0 = rows[0]
    out = [
        f"Machine: {r0['machine']}; device {r0['device']}; torch {r0['torch']}; commit {r0['commit']}; "
        f"{r0['timestamp']} (run {r0['run_id']}).",
        "",
    ]
    loads = [x for x in (_num(r.get("load1")) for r in rows) if x is not None]
    if loads:
        cores = r0["machine"].split(" cores")[0].rsplit(" ", 1)[-1]
        out += [f"Load average (1 min) before each measurement: {min(loads):.1f} to {max(loads):.1f} "
                f"on {cores} cores (a 1-minute average: it still counts the previous measurement's own threads"
                f"{'' if max(loads) <= (_num(cores) or 1.0) + 0.5 else '; above that, other work was running and timings are noisy'}).",
                ""]
    out += summary(rows, "full")
    for (size, labels), rs in _groups(rows).items():
        a = rs[0]
        out.append(f"**{size}**: N={int(a['N']):,}, D={a['D']}, C={a['C']}, K={a['K']}; labels {labels}, 10% ignored")
        out.append("")
        out.append("| mode | provider | median ms | p20-p80 ms | rounds | x floor | in-proc | vs official | peak MB "
                   "| 1st MB | +step MB | ops | syncs | notes |")
        out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
        for r in rs:
            prov = "GEMM floor" if r["provider"] == FLOOR else r["provider"]
            if r["status"] != "ok":
                status = r["status"].replace("|", "/")
                status = status if len(status) <= 90 else status[:87] + "..."
                out.append(f"| {r['mode']} | {prov} | {status} | | | | | | | | | | | |")
                continue
            spread = f"{_fmt_ms(r['p20_ms'])}-{_fmt_ms(r['p80_ms'])}"
            notes = []
            if r.get("graphs"):
                first = _num(r["first_ms"]) / 1e3
                notes.append(f"graphs {r['graphs']}, breaks {r['graph_breaks']}, first call {first:.1f} s")
            if r.get("sync_detail"):
                notes.append(r["sync_detail"])
            if r["provider"] == FLOOR:
                notes.append("the two GEMMs only" if r["mode"] == "full" else "")
            if r.get("phases"):
                notes.append("phases ms: " + ", ".join(f"{k} {v}" for k, v in json.loads(r["phases"]).items()))
            if r.get("failed_rounds"):
                notes.append("failed rounds: " + r["failed_rounds"])
            vs = _fmt(r.get("vs_official"), ".2f")
            out.append(
                f"| {r['mode']} | {prov} | {_fmt_ms(r['median_ms'])} | {spread} "
                f"| {(r.get('round_ms') or '').replace(';', ', ')} | {_fmt(r.get('x_floor'), '.2f')} "
                f"| {_fmt(r.get('x_floor_inproc'), '.2f')} "
                f"| {vs + 'x' if vs else ''} | {_fmt(r.get('peak_mem_mb'), ',.0f')} "
                f"| {_fmt(r.get('first_peak_mem_mb'), ',.0f')} "
                f"| {_fmt(r.get('extra_mem_mb'), ',.0f')} | {r.get('ops', '')} | {r.get('syncs', '')} "
                f"| {'; '.join(n for n in notes if n)} |"
            )
        out.append("")
    out.append(COLUMN_HELP)
    out.append("")
    return "\n".join(out)


def write_markdown(rows, path):
    with open(path, "w") as f:
        f.write(markdown(rows))


def _mantissa(v):
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _ms_tick(v, _=None):
    return f"{v:g}"


def plot(rows, path):
    """One panel per mode: median step time per (size, labels), a bar per provider, the GEMM floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ok = [r for r in rows if r["status"] == "ok" and _num(r["median_ms"]) is not None]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in ok)]
    if not modes:
        return None
    groups = list(_groups(ok).keys())
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in ok)]
    colors = dict(zip(PROVIDER_ORDER, ("#d62728", "#ff7f0e", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd")))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6, 1.2 * len(groups) * len(modes) + 2), 4.5),
                             squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[0], modes):
        for j, prov in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, (size, labels) in enumerate(groups):
                r = next((r for r in ok if r["mode"] == mode and r["provider"] == prov and r["size"] == size
                          and r["labels"] == labels), None)
                if r is None:
                    continue
                m = _num(r["median_ms"])
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(m)
                lo.append(max(0.0, m - _num(r["p20_ms"])))
                hi.append(max(0.0, _num(r["p80_ms"]) - m))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, color=colors.get(prov), capsize=2)
        for i, (size, labels) in enumerate(groups):
            f = next((r for r in ok if r["mode"] == mode and r["provider"] == FLOOR and r["size"] == size), None)
            if f is not None:
                ax.hlines(_num(f["median_ms"]), i - 0.45, i + 0.45, colors="black", linestyles="--",
                          label="GEMM floor" if i == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_ms_tick))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _ms_tick(v) if _mantissa(v) in (2, 5) else ""))
        ax.set_title(mode)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([s if len({g[1] for g in groups}) == 1 else f"{s}\n{l}" for s, l in groups],
                           rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per step (median, p20-p80)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    r0 = ok[0]
    fig.text(0.5, 0.005, f"{r0['machine']} | torch {r0['torch']} | {r0['commit']} | {r0['timestamp']}",
             ha="center", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Re-plot benchmark results from the CSV.")
    p.add_argument("--csv", default=os.path.join(RESULTS, "bench.csv"))
    p.add_argument("--run-id", default="latest", help="a run_id of the CSV, 'latest' (default) or 'all'")
    p.add_argument("--png", default=None, help="default: next to the CSV, bench.png")
    p.add_argument("--markdown", default=None, help="default: next to the CSV, bench.md")
    args = p.parse_args(argv)
    rows = select_run(read_csv(args.csv), args.run_id)
    base = os.path.dirname(os.path.abspath(args.csv))
    md = args.markdown or os.path.join(base, "bench.md")
    png = args.png or os.path.join(base, "bench.png")
    write_markdown(rows, md)
    plot(rows, png)
    print(f"{len(rows)} rows -> {md}, {png}")


if __name__ == "__main__":
    main()
