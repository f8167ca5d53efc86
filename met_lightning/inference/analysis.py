"""The budget analysis of a run, from its logit store: calibrate on the held-out split, evaluate
on test, write `budget_curve.csv` (one row per p), `budget_curve.png` (accuracy vs. mean GMACs,
with the anytime exits) and `budget.json` (anytime accuracies, the cheapest points keeping 100 % /
99 % of the last exit's accuracy, thresholds chosen for each requested budget).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from met_lightning.atomic import atomic_path, write_text
from met_lightning.inference.budget import (
    DEFAULT_P_VALUES,
    BudgetPoint,
    SplitScores,
    anytime_points,
    budget_candidates,
    budget_curve,
    evaluate,
    keeping,
    resolve_budget,
    select_for_budget,
)
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, check_confidence
from met_lightning.inference.logit_store import LogitStore
from met_lightning.macs import format_macs

log = logging.getLogger(__name__)

CURVE_FILE = "budget_curve.csv"
PLOT_FILE = "budget_curve.png"
REPORT_FILE = "budget.json"
KEEP_FRACTIONS = (1.0, 0.99)


@dataclass
class BudgetReport:
    """Everything the budget analysis found; `to_json()` is what `budget.json` holds."""

    confidence: str
    calibration_split: str
    evaluation_split: str
    exits: tuple[int, ...]
    exit_macs: tuple[int, ...]
    curve: list[tuple[float, BudgetPoint]]
    anytime: list[BudgetPoint]  # evaluation split, every image out at exit k
    keep: dict[float, BudgetPoint]  # fraction of last-exit accuracy -> cheapest curve point
    budgets: list[dict[str, Any]] = field(default_factory=list)
    skipped_budgets: list[float] = field(default_factory=list)  # below exit 1's cost

    @property
    def full_macs(self) -> int:
        return self.exit_macs[-1]

    def speedup(self, point: BudgetPoint) -> float:
        """Full cost over the point's mean cost."""
        return self.full_macs / point.mean_macs

    def to_json(self) -> dict[str, Any]:
        def point(p: BudgetPoint) -> dict[str, Any]:
            thresholds = [finite(t) for t in p.thresholds]  # in asdict's place
            return {**asdict(p), "thresholds": thresholds, "speedup": self.speedup(p)}

        return {
            "confidence": self.confidence,
            "calibration_split": self.calibration_split,
            "evaluation_split": self.evaluation_split,
            "exits": list(self.exits),
            "exit_macs": list(self.exit_macs),
            "anytime": [point(p) for p in self.anytime],
            "keep": {f"{f:g}": point(p) for f, p in self.keep.items()},
            "budgets": [
                {**b, "selected": point(b["selected"]), "evaluated": point(b["evaluated"])}
                for b in self.budgets
            ],
            "skipped_budgets": self.skipped_budgets,
            "curve": [{"p": p, **point(pt)} for p, pt in self.curve],
        }


def finite(value: float) -> float | str:
    """JSON has no infinities: write them as the strings 'inf' / '-inf'."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def analyze(
    store: LogitStore,
    kind: str = DEFAULT_CONFIDENCE,
    budgets: Sequence[float] = (),
    p_values: Sequence[float] = DEFAULT_P_VALUES,
    calibration_split: str = "val",
    evaluation_split: str = "test",
) -> BudgetReport:
    """Calibrate thresholds on `calibration_split` for each p and each budget; evaluate them."""
    check_confidence(kind)
    calib = SplitScores.from_logits(*store[calibration_split], kind)
    evalu = SplitScores.from_logits(*store[evaluation_split], kind)
    macs = store.exit_macs
    curve = budget_curve(calib, evalu, macs, p_values)
    anytime = anytime_points(evalu, macs)
    candidates = [pt for _, pt in curve] + anytime
    keep = {f: (keeping(candidates, anytime[-1].accuracy, f) or [None])[0] for f in KEEP_FRACTIONS}
    report = BudgetReport(
        kind, calibration_split, evaluation_split, store.exits, macs, curve, anytime, keep
    )
    selectable = budget_candidates(calib, macs) if budgets else []
    for i, budget in enumerate(budgets):
        budget_macs = resolve_budget(budget, macs[-1], key=f"budgets[{i}]")
        if budget_macs < macs[0]:  # infeasible for this model: report it, do not fail the run
            log.warning("budget %s skipped: below the cost of exit 1 (%s per image)",
                        budget, format_macs(macs[0]))  # fmt: skip
            report.skipped_budgets.append(budget)
            continue
        selected = select_for_budget(
            calib, macs, budget_macs, key=f"budgets[{i}]={budget}", candidates=selectable
        )
        evaluated = evaluate(evalu, selected.thresholds, macs, selected.label)
        report.budgets.append(
            {"budget": budget, "budget_macs": budget_macs, "selected": selected,
             "evaluated": evaluated}
        )  # fmt: skip
    return report


# ---------------------------------------------------------------------- files
def curve_rows(report: BudgetReport) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of `budget_curve.csv` (also logged as a wandb table)."""
    k = len(report.exits)
    header = (
        ["p"]
        + [f"threshold_exit{i + 1}" for i in range(k)]
        + [f"share_exit{i + 1}" for i in range(k)]
        + ["mean_macs", "mean_gmacs", "macs_fraction", "speedup", "accuracy"]
    )
    rows = [
        [round(p, 6)]
        + [finite(t) for t in pt.thresholds]
        + [round(s, 6) for s in pt.shares]
        + [
            round(pt.mean_macs),
            round(pt.mean_macs / 1e9, 6),
            round(pt.mean_macs / report.full_macs, 6),
            round(report.speedup(pt), 4),
            round(pt.accuracy, 6),
        ]
        for p, pt in report.curve
    ]
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    return write_text(path, buffer.getvalue())


def plot_curve(report: BudgetReport, path: Path, title: str = "MET early exit") -> Path:
    """Test accuracy vs. mean GMACs per image: the budget curve, anytime exits, last exit only."""
    import matplotlib  # heavy, for this plot only (not on predict's or serve's path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    curve = sorted((pt.mean_macs / 1e9, 100 * pt.accuracy) for _, pt in report.curve)
    ax.plot(*zip(*curve, strict=True), "-o", ms=3, label="dynamic exit (budget curve)")
    anytime = [(pt.mean_macs / 1e9, 100 * pt.accuracy) for pt in report.anytime]
    ax.plot(*zip(*anytime, strict=True), "s--", color="tab:orange", label="anytime: exit k only")
    for k, xy in enumerate(anytime):
        ax.annotate(f"exit {k + 1}", xy, textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot(*anytime[-1], "*", ms=14, color="tab:red", label="last exit only")
    for fraction, pt in report.keep.items():
        if pt is not None and fraction < 1:
            level, label = 100 * fraction * report.anytime[-1].accuracy, f"{100 * fraction:g} %"
            ax.axhline(level, color="grey", lw=0.6, ls=":", label=f"{label} of last exit")
    ax.set_xlabel(f"mean GMACs per image ({report.evaluation_split})")
    ax.set_ylabel(f"{report.evaluation_split} accuracy (%)")
    ax.set_title(f"{title} — confidence {report.confidence}, calibrated on "
                 f"{report.calibration_split}", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(report: BudgetReport, output_dir: Path) -> dict[str, Path]:
    """Write the CSV, the PNG and `budget.json` into `output_dir`; return their paths."""
    output_dir = Path(output_dir)
    return {
        "csv": write_csv(output_dir / CURVE_FILE, *curve_rows(report)),
        "png": plot_curve(report, output_dir / PLOT_FILE),
        "json": write_text(output_dir / REPORT_FILE, json.dumps(report.to_json(), indent=2)),
    }
