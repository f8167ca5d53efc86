"""Plot the budget curves of several methods in one figure, averaged over seeds.

    python experiments/plot_budget_curves.py RUN_ROOT [RUN_ROOT ...] --out curves.png

Every run folder under the roots (one holding summary.json and budget_curve.csv) is labelled as
in experiments/report.py (method plus ablation switches); the curves of a label's seeds are
averaged point by point (they share the p sweep, so point i is the same p in every seed).
x: mean MACs per image as a share of the method's own last exit; y: test accuracy. A method with
one exit is a single point. Reads only CSV / JSON / YAML, plus matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.report import ReportError, assign_variants, find_runs, load_run  # noqa: E402

CURVE_FILE = "budget_curve.csv"


def read_curve(run_dir: Path) -> tuple[list[float], list[float]] | None:
    """(mean MACs per image, accuracy) of a run's budget curve; None without the file."""
    path = Path(run_dir) / CURVE_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [float(r["mean_macs"]) for r in rows], [float(r["accuracy"]) for r in rows]


def mean_curves(roots: Sequence[Path]) -> dict[str, dict]:
    """label -> {'macs': [...], 'fraction': [...], 'acc': [...], 'n': seeds, 'full': MACs}."""
    by_label: dict[str, list[tuple[list[float], list[float], float]]] = defaultdict(list)
    runs = []
    for path in find_runs(roots):
        try:
            runs.append(load_run(path))
        except ReportError as err:
            print(f"warning: skipped {err}", file=sys.stderr)
    assign_variants(runs)  # e.g. `full_finetune [lr=0.0001]`, as in the report
    for run in runs:
        curve = read_curve(run.path)
        if curve is not None:
            label = f"{run.method} [{run.variant}]" if run.variant else run.method
            by_label[label].append((*curve, float(run.summary["exits"][-1]["macs"])))
    curves = {}
    for label, members in sorted(by_label.items()):
        length = min(len(m[0]) for m in members)
        macs = [statistics.fmean(m[0][i] for m in members) for i in range(length)]
        acc = [statistics.fmean(m[1][i] for m in members) for i in range(length)]
        full = statistics.fmean(m[2] for m in members)
        curves[label] = {
            "macs": macs,
            "fraction": [x / full for x in macs],
            "acc": acc,
            "n": len(members),
            "full": full,
        }
    return curves


def plot(curves: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.0), dpi=120)
    colors = plt.get_cmap("tab20").colors
    for i, (label, c) in enumerate(curves.items()):
        points = sorted(zip(c["macs"], c["acc"], strict=True))
        xs = [x / 1e6 for x, _ in points]
        ys = [100 * y for _, y in points]
        text = f"{label} (n={c['n']})"
        color = colors[(2 * i) % 20 + (2 * i) // 20 % 2]  # the dark shades first
        if len(set(xs)) == 1:  # one exit: a single point
            ax.plot(xs[:1], ys[:1], "s", markersize=7, color=color, label=text)
        else:
            ax.plot(xs, ys, "-", marker=".", markersize=4, linewidth=1.3, color=color, label=text)
    ax.set_xlabel("mean MACs per image (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot_budget_curves.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("roots", nargs="+", type=Path, metavar="RUN_ROOT")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", default="Budget curves (thresholds calibrated on val)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        curves = mean_curves(args.roots)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not curves:
        print(f"error: no run folder with {CURVE_FILE} under {args.roots}", file=sys.stderr)
        return 1
    plot(curves, args.out, args.title)
    print(f"wrote {args.out} ({len(curves)} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
