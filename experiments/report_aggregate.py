"""The report's numbers: per run (accuracies, MACs, early-exit points from summary.json and
budget.json), per setting (mean ± sample std over seeds, pandas groupby) and per VTAB-1K suite
(group means), and the long table of every setting."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.report_load import RunRecord, get
from experiments.run_vtab1k import GROUPS, VTAB_GROUPS
from met_lightning.atomic import write_text

KEEP = (("keep100", "1", "keep 100 %"), ("keep99", "0.99", "keep 99 %"))


def _point_from_summary(summary: Mapping[str, Any], setting: str) -> dict[str, Any] | None:
    for point in get(summary, "budget.points") or []:
        if point.get("setting") == setting:
            return point
    return None


def _budget_setting(budget: float) -> str:
    """summary.json's name of a budget point: 'budget 50 %' (fractions) or 'budget 8.00 GMACs'
    (MACs per image, as met_lightning.macs.format_macs writes them)."""
    if budget <= 1:
        return f"budget {100 * budget:g} %"
    for unit, scale in (("GMACs", 1e9), ("MMACs", 1e6), ("KMACs", 1e3)):
        if budget >= scale:
            return f"budget {budget / scale:.2f} {unit}"
    return f"budget {budget:.0f} MACs"


def run_numbers(run: RunRecord, budgets: Sequence[float]) -> dict[str, float | None]:
    """The numbers of one run that the tables aggregate (accuracies as fractions)."""
    exits = run.summary["exits"]
    full = float(exits[-1]["macs"])
    numbers: dict[str, float | None] = {
        f"acc_exit{e['exit']}": _num(e.get("accuracy")) for e in exits
    }
    numbers.update({f"acc_block{e['block']}": _num(e.get("accuracy")) for e in exits})
    numbers["acc_last"] = _num(exits[-1].get("accuracy"))
    numbers["full_macs"] = full
    numbers["params_trainable"] = _num(run.summary.get("params_trainable"))
    numbers["params_total"] = _num(run.summary.get("params_total"))
    numbers["storage_kb"] = _num(run.summary.get("storage_kb"))
    report = run.budget or {}
    for name, key, setting in KEEP:
        point = (report.get("keep") or {}).get(key) or _point_from_summary(run.summary, setting)
        _add_point(numbers, name, point, full)
    for b in budgets:
        point = None
        for entry in report.get("budgets") or []:
            if math.isclose(float(entry["budget"]), b, rel_tol=1e-9):
                point = entry["evaluated"]
        if point is None:
            point = _point_from_summary(run.summary, _budget_setting(b))
        _add_point(numbers, budget_key(b), point, full)
    return numbers


def budget_key(budget: float) -> str:
    return f"budget{budget:g}"


def _add_point(numbers: dict, name: str, point: Mapping[str, Any] | None, full: float) -> None:
    point = point or {}
    macs = _num(point.get("mean_macs"))
    numbers[f"{name}_acc"] = _num(point.get("accuracy"))
    numbers[f"{name}_macs"] = macs
    numbers[f"{name}_macs_fraction"] = None if macs is None else macs / full
    speedup = _num(point.get("speedup"))
    numbers[f"{name}_speedup"] = speedup if speedup is not None or macs is None else full / macs


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def budgets_in(runs: Iterable[RunRecord]) -> list[float]:
    """Every budget a run has a point for (budget.json budgets, summary 'budget X %' points)."""
    found: set[float] = set()
    for run in runs:
        for entry in (run.budget or {}).get("budgets") or []:
            found.add(float(entry["budget"]))
        for point in get(run.summary, "budget.points") or []:
            setting = str(point.get("setting", ""))
            if setting.startswith("budget ") and setting.endswith(" %"):
                try:
                    found.add(float(setting[len("budget ") : -2]) / 100)
                except ValueError:
                    pass
    rounded = {round(b, 9) for b in found}
    return sorted(rounded)


# ---------------------------------------------------------------------- aggregation
@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample std over seeds; None for n < 2
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = [v for v in values if v is not None]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


@dataclass
class Group:
    suite: str
    dataset: str
    split: str
    method: str
    variant: str
    runs: list[RunRecord] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.runs), key=str)

    @property
    def label(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def blocks(self) -> str:
        return "/".join(str(e["block"]) for e in self.runs[0].summary["exits"])

    @property
    def num_exits(self) -> int:
        return max(len(r.summary["exits"]) for r in self.runs)

    def value(self, key: str) -> float | None:
        stat = self.stats.get(key)
        return stat.mean if stat else None


GROUP_KEYS = ["suite", "dataset", "split", "method", "variant"]


def group_runs(runs: Sequence[RunRecord], budgets: Sequence[float]) -> list[Group]:
    """One Group per (suite, dataset, split, method, variant), its numbers aggregated over runs."""
    numbers = [run_numbers(r, budgets) for r in runs]
    frame = pd.DataFrame(numbers, dtype=float).assign(
        **{k: [getattr(r, k) for r in runs] for k in GROUP_KEYS}
    )
    groups = []
    for key, rows in frame.groupby(GROUP_KEYS, sort=False).groups.items():
        group = Group(*key, runs=[runs[i] for i in rows])
        keys = dict.fromkeys(k for i in rows for k in numbers[i])  # the keys its runs have
        group.stats = {k: Stat.of(frame.loc[rows, k].dropna()) for k in keys}
        groups.append(group)
    return sorted(groups, key=_group_order)


def _dataset_order(suite: str, dataset: str) -> tuple:
    if suite == "vtab1k":
        order = list(VTAB_GROUPS).index(dataset) if dataset in VTAB_GROUPS else len(VTAB_GROUPS)
        return (0, order, dataset)
    return (1, 0, dataset)


SPLIT_ORDER = {"final": 0, "test": 0, "tune": 1, "val": 2}


def _group_order(g: Group) -> tuple:
    return (*_dataset_order(g.suite, g.dataset), SPLIT_ORDER.get(g.split, 3), g.method, g.variant)


# ---------------------------------------------------------------------- (b) VTAB-1K suite
def _mean(values: Iterable[float]) -> float | None:
    xs = list(values)
    return statistics.fmean(xs) if xs else None


def suite_means(per_task: Mapping[str, float]) -> dict[str, float | None]:
    """Group means, the plain mean over tasks and the mean of the group means, of tasks present."""
    result: dict[str, float | None] = {}
    for group in GROUPS:
        result[group] = _mean(v for t, v in per_task.items() if VTAB_GROUPS[t] == group)
    result["mean"] = _mean(per_task.values())
    result["group mean"] = _mean(result[g] for g in GROUPS if result[g] is not None)
    return result


def suite_groups(groups: Sequence[Group]) -> tuple[dict[str, dict[str, Group]], list[str]]:
    """method -> task -> the final-split group of that task; notes on variants left out."""
    by_method: dict[str, dict[str, list[Group]]] = defaultdict(lambda: defaultdict(list))
    for g in groups:
        if g.suite == "vtab1k" and g.split == "final" and g.dataset in VTAB_GROUPS:
            by_method[g.method][g.dataset].append(g)
    chosen: dict[str, dict[str, Group]] = {}
    notes = []
    for method in sorted(by_method):
        chosen[method] = {}
        for task, candidates in by_method[method].items():
            best = sorted(candidates, key=lambda g: (-g.n, g.variant))[0]
            chosen[method][task] = best
            if len(candidates) > 1:
                others = ", ".join(f"[{g.variant}] (n={g.n})" for g in candidates if g is not best)
                notes.append(
                    f"- {method} on {task}: {len(candidates)} settings; the suite tables use "
                    f"[{best.variant}] (n={best.n}, the most runs), not {others}"
                )
    return chosen, notes


# ---------------------------------------------------------------------- long CSV
def long_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[Any]]]:
    """One row per group: identity, n, seeds, then `<number>_mean` / `<number>_std` columns."""
    number_keys: list[str] = []
    for g in groups:
        for key in g.stats:
            if key not in number_keys:
                number_keys.append(key)
    exit_keys = sorted(
        (k for k in number_keys if k.startswith("acc_exit")), key=lambda k: int(k[8:])
    )
    number_keys = exit_keys + [k for k in number_keys if not k.startswith("acc_exit")]
    header = ["suite", "dataset", "vtab_group", "split", "method", "variant", "n", "seeds",
              "blocks"]  # fmt: skip
    header += [f"{k}_{s}" for k in number_keys for s in ("mean", "std")]
    header += ["run_dirs"]
    rows = []
    for g in groups:
        row: list[Any] = [g.suite, g.dataset, VTAB_GROUPS.get(g.dataset, "") if g.suite == "vtab1k"
                          else "", g.split, g.method, g.variant, g.n,
                          " ".join(map(str, g.seeds)), g.blocks]  # fmt: skip
        for key in number_keys:
            stat = g.stats.get(key)
            row += ["" if stat is None or stat.mean is None else stat.mean,
                    "" if stat is None or stat.std is None else stat.std]  # fmt: skip
        row.append(";".join(str(r.path) for r in g.runs))
        rows.append(row)
    return header, rows


def write_csv(groups: Sequence[Group], path: Path) -> None:
    """The long table as CSV (temporary file + rename: never half-written)."""
    header, rows = long_rows(groups)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=header, dtype=object)
    write_text(path, table.to_csv(index=False, lineterminator="\r\n"))
