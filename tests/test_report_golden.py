"""experiments/report.py renders, to the byte, the markdown and CSV that the hand-written report
(before its split onto pandas, commit 41f771a) rendered on the same fixture run folders:
tests/data/report_golden.md / .csv were written by that code."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from experiments import report
from tests.test_report import LAST, _as_method, make_run

GOLDEN = Path(__file__).resolve().parent / "data"
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
ROOT = "<ROOT>"


def make_tree(root: Path) -> None:
    """tests/test_report.py's fixture runs, plus baselines, 1-bit and a duplicated seed."""
    for (task, method), accs in LAST.items():
        for seed, acc in enumerate(accs):
            make_run(
                root / "vtab" / method / task / "final" / f"seed{seed}",
                task=task,
                seed=seed,
                accs=(acc - 0.3, acc - 0.2, acc - 0.1, acc),
                graph_weight=0.0 if method == "nograph" else 0.1,
                keep99_macs=8e9 if seed == 0 else 10e9,
                budget_acc=None if (task, method, seed) == ("dmlab", "met", 1) else acc - 0.05,
            )
    make_run(root / "vtab" / "met" / "cifar" / "tune" / "seed0", task="cifar", split="tune",
             accs=(0.1, 0.2, 0.3, 0.99))  # fmt: skip
    make_run(root / "vtab" / "met_r4" / "cifar" / "final" / "seed0", task="cifar", rank=4)
    make_run(root / "c100" / "seed0", data="cifar100", task=None, accs=(0.6, 0.7, 0.8, 0.9))
    make_run(root / "c100" / "again0", data="cifar100", task=None, accs=(0.6, 0.7, 0.8, 0.91))
    for seed in (0, 1):
        make_run(root / "c100_rank4" / f"seed{seed}", data="cifar100", task=None, rank=4,
                 accs=(0.5, 0.6, 0.7, 0.85), with_budget_json=False)  # fmt: skip
    probe = {"exits": [-1], "adapter": {"kind": "none", "exit_specific": False,
             "separate_cls": False, "bits": 32}, "loss": {"graph_weight": 0.0}}  # fmt: skip
    for seed in (0, 1):
        folder = make_run(root / "lp" / f"s{seed}", data="cifar100", task=None, seed=seed,
                          accs=(0.1, 0.2, 0.3, 0.7 + 0.02 * seed))  # fmt: skip
        _as_method(folder, "linear_probe", probe, [12], 300.0)
        folder = make_run(root / "bin" / f"s{seed}", data="cifar100", task=None, seed=seed,
                          accs=(0.55, 0.6, 0.7, 0.9))  # fmt: skip
        adapter = {"kind": "e_adapter", "bits": 1, "exit_specific": True, "separate_cls": True}
        model = {"exits": [3, 6, 9, 12], "adapter": adapter, "loss": {"graph_weight": 0.1}}
        _as_method(folder, "met", model, [3, 6, 9, 12], 75.0)
    broken = root / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")


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
