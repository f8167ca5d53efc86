"""experiments/report.py renders, to the byte, the markdown and CSV that the hand-written report
(before its split onto pandas, commit 41f771a) rendered on the same fixture run folders:
tests/data/report_golden.md / .csv were written by that code."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from experiments import report
from tests.test_report import make_fixture_runs, make_method_runs, make_run

GOLDEN = Path(__file__).resolve().parent / "data"
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
ROOT = "<ROOT>"


def make_tree(root: Path) -> None:
    """tests/test_report.py's fixture runs, plus baselines, 1-bit and a duplicated seed."""
    make_fixture_runs(root)
    make_run(root / "vtab" / "met_r4" / "cifar" / "final" / "seed0", task="cifar", rank=4)
    make_run(root / "c100" / "again0", data="cifar100", task=None, accs=(0.6, 0.7, 0.8, 0.91))
    make_method_runs(root / "methods")


def render(root: Path) -> tuple[str, str]:
    """(markdown, CSV) of the tree at `root`, with the root written as <ROOT>."""
    runs, skipped = [], []
    for path in report.find_runs([root]):
        try:
            runs.append(report.load_run(path))
        except report.ReportError as err:
            skipped.append(str(err))
    budgets = report.budgets_in(runs) + [0.75]
    text, groups = report.build_report(runs, budgets, "python experiments/report.py R", [root],
                                       skipped, now=NOW)  # fmt: skip
    report.write_csv(groups, root / "long.csv")
    with open(root / "long.csv", encoding="utf-8", newline="") as f:
        table = f.read()
    real = str(root.resolve())
    return text.replace(real, ROOT).replace(str(root), ROOT), table.replace(real, ROOT)


def test_markdown_and_csv_are_the_hand_written_reports(tmp_path):
    make_tree(tmp_path)
    text, table = render(tmp_path)
    if os.environ.get("MET_WRITE_GOLDEN") == "1":  # only with the old code: see the docstring
        (GOLDEN / "report_golden.md").write_text(text, encoding="utf-8")
        (GOLDEN / "report_golden.csv").write_bytes(table.encode("utf-8"))
    assert text == (GOLDEN / "report_golden.md").read_text(encoding="utf-8")
    assert table == (GOLDEN / "report_golden.csv").read_bytes().decode("utf-8")
