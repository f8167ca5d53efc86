"""Turn finished run folders into a markdown report (and optionally a CSV of the long table).

    python experiments/report.py RUN_ROOT [RUN_ROOT ...] --out report.md [--budgets 0.5 0.75]
        [--csv long.csv]

Finds every run folder (one holding summary.json) under the roots, reads its config.yaml,
.hydra/hydra.yaml (the config group choices), summary.json and budget.json, and groups runs by
dataset (the VTAB-1K task, else the data config's name), split, method label (`method_label`:
the method plus the model switches that make it an ablation, e.g. `met (no graph)`) and variant
(any other config value that differs between runs of the same dataset / split / method, e.g.
`rank=4`). The seeds of a group are aggregated as mean ± sample std, with n shown.

The report has (a) one table per dataset: test accuracy of every exit, mean MACs and speed-up at
the cheapest thresholds keeping 100 % / 99 % of the last exit's accuracy, accuracy and MACs at
each budget, trainable parameters and storage (KB); (b) for VTAB-1K final runs, suite tables
with one column per task, the three group means, the plain mean over tasks and the mean of the
group means.
It works on partial results: a missing task is '-' and the means say over what they were taken.
Reads only JSON / YAML, so it does not import torch. Its parts: experiments/report_load.py (run
folders), report_aggregate.py (numbers, pandas groupby), report_render.py (markdown).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python experiments/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the report's public names, from its parts
from experiments.report_aggregate import budgets_in, suite_means, write_csv  # noqa: E402, F401
from experiments.report_load import (  # noqa: E402, F401
    METHOD_RULES,
    SUMMARY_FILE,
    ReportError,
    assign_variants,
    find_runs,
    get,
    load_run,
    method_label,
)
from experiments.report_render import build_report  # noqa: E402
from experiments.run_vtab1k import VTAB_GROUPS  # noqa: E402, F401
from met_lightning.atomic import write_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("roots", nargs="+", type=Path, metavar="RUN_ROOT",
                        help="folders searched recursively for run folders")  # fmt: skip
    parser.add_argument("--out", type=Path, help="markdown file to write (default: stdout)")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        help="budgets to report (fractions of the full cost, or MACs per image); default: every "
        "budget some run has",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        help="also write the long table (one row per dataset / split / method / variant, mean "
        "and std columns) as CSV",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "experiments/report.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", prog, *argv])
    try:
        paths = find_runs(args.roots)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except ReportError as err:
            skipped.append(str(err))
            print(f"warning: skipped {err}", file=sys.stderr)
    if not runs:
        print(f"error: no run folder (with {SUMMARY_FILE}) under {args.roots}", file=sys.stderr)
        return 1
    budgets = args.budgets if args.budgets is not None else budgets_in(runs)
    text, groups = build_report(runs, budgets, command, args.roots, skipped)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, text)
        print(f"wrote {args.out} ({len(runs)} runs, {len(groups)} settings)")
    else:
        sys.stdout.write(text)
    if args.csv:
        write_csv(groups, args.csv)
        print(f"wrote {args.csv}", file=sys.stderr if not args.out else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
