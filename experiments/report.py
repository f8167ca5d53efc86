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
Reads only JSON / YAML, so it does not import torch.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import shlex
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: python experiments/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.run_vtab1k import GROUPS, VTAB_GROUPS  # noqa: E402
from met_lightning.atomic import write_text  # noqa: E402

SUMMARY_FILE = "summary.json"
# Short column names of the VTAB-1K tasks, as in the PETL papers' tables.
VTAB_SHORT = {
    "cifar": "cifar", "caltech101": "caltech101", "dtd": "dtd", "oxford_flowers102": "flowers102",
    "oxford_iiit_pet": "pets", "svhn": "svhn", "sun397": "sun397", "patch_camelyon": "camelyon",
    "eurosat": "eurosat", "resisc45": "resisc45", "diabetic_retinopathy": "retinopathy",
    "clevr_count": "clevr-count", "clevr_dist": "clevr-dist", "dmlab": "dmlab", "kitti": "kitti",
    "dsprites_loc": "dspr-loc", "dsprites_ori": "dspr-ori", "smallnorb_azi": "snorb-azi",
    "smallnorb_ele": "snorb-ele",
}  # fmt: skip
KEEP = (("keep100", "1", "keep 100 %"), ("keep99", "0.99", "keep 99 %"))
# Config values that never make two runs different settings (seeds, places, logging, workers).
IGNORED_KEYS = (
    "seed", "data.seed", "paths", "task_name", "tags", "logger", "ckpt_path", "optimized_metric",
    "trainer.default_root_dir", "callbacks.model_checkpoint.dirpath", "callbacks.last_checkpoint",
    "resume",
    "callbacks.budget_analysis.output_dir", "callbacks.progress_bar", "data.root",
    "data.num_workers", "data.eval_batch_size", "data.download", "backbone.weights_file",
)  # fmt: skip


class ReportError(Exception):
    pass


# ---------------------------------------------------------------------- method labels
def get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """`config["a"]["b"]` for "a.b"; `default` when a key is missing."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


# (suffix, rule): the suffix joins the label when the rule holds for the run's resolved config.
# A rule must return False for configs without its keys (`get` returns None for them). MET's
# ablation switches only name an ablation of MET: a linear probe has no graph term to remove.
MethodRule = tuple[str, Callable[[Mapping[str, Any]], bool]]


def _is_met(c: Mapping[str, Any]) -> bool:
    return get(c, "method.name", "met") == "met"


METHOD_RULES: list[MethodRule] = [
    ("no graph", lambda c: _is_met(c) and get(c, "model.loss.graph_weight") == 0),
    (
        "teacher graph",
        lambda c: (
            _is_met(c)
            and get(c, "model.loss.graph") == "teacher"
            and get(c, "model.loss.graph_weight") != 0
        ),
    ),
    ("shared γ", lambda c: _is_met(c) and get(c, "model.adapter.exit_specific") is False),
    ("no separate cls", lambda c: _is_met(c) and get(c, "model.adapter.separate_cls") is False),
    ("1-bit", lambda c: get(c, "model.adapter.bits") == 1),
]


def method_label(
    config: Mapping[str, Any],
    choices: Mapping[str, Any] | None = None,
    rules: Sequence[MethodRule] = METHOD_RULES,
) -> str:
    """`met`, `met (no graph)`, `met (shared γ, no separate cls)`, `linear_probe`, ...

    The base is the `method` config choice (else `method.name`); each rule that holds adds its
    suffix.
    """
    base = (choices or {}).get("method") or get(config, "method.name") or "?"
    suffixes = [name for name, rule in rules if rule(config)]
    return f"{base} ({', '.join(suffixes)})" if suffixes else str(base)


# ---------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    choices: dict[str, Any]
    summary: dict[str, Any]
    budget: dict[str, Any] | None
    suite: str  # "vtab1k" or the dataset itself
    dataset: str  # VTAB-1K task or data config name
    split: str  # VTAB-1K: tune | final; else the split summary.json reports on (test | val)
    method: str
    seed: Any
    variant: str = ""  # filled in by `assign_variants`

    @property
    def vtab_group(self) -> str | None:
        return VTAB_GROUPS.get(self.dataset) if self.suite == "vtab1k" else None


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dataset_of(config: Mapping[str, Any], choices: Mapping[str, Any]) -> tuple[str, str]:
    """(suite, dataset): ("vtab1k", task) or (data choice, data choice)."""
    data = config.get("data") or {}
    choice = choices.get("data")
    target = str(data.get("_target_", ""))
    if choice == "vtab1k" or "vtab" in target.lower():
        return "vtab1k", str(data.get("task", "?"))
    if not choice:  # no .hydra/hydra.yaml: the DataModule's class name
        name = target.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
        choice = name or "?"
    if choice == "image_folder" and data.get("root"):
        choice = f"image_folder:{Path(str(data['root'])).name}"
    return str(choice), str(choice)


def load_run(path: Path) -> RunRecord:
    """Read one run folder; ReportError if its summary.json or config.yaml is unreadable."""
    path = Path(path)
    try:
        summary = _load_json(path / SUMMARY_FILE)
        config = _load_yaml(path / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ReportError(f"{path}: {err}") from err
    if not isinstance(config, dict) or not isinstance(summary, dict) or not summary.get("exits"):
        raise ReportError(f"{path}: config.yaml or summary.json is not a run's")
    choices: dict[str, Any] = {}
    try:
        hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml")
        choices = dict(get(hydra_cfg, "hydra.runtime.choices") or {})
    except (OSError, ValueError, yaml.YAMLError):
        pass  # only the method and data names come from there; config.yaml has fallbacks
    try:
        budget = _load_json(path / "budget.json")
    except (OSError, ValueError):
        budget = None
    suite, dataset = dataset_of(config, choices)
    split = get(config, "data.split") if suite == "vtab1k" else None
    return RunRecord(
        path=path,
        config=config,
        choices=choices,
        summary=summary,
        budget=budget,
        suite=suite,
        dataset=dataset,
        split=str(split or summary.get("split", "?")),
        method=method_label(config, choices),
        seed=config.get("seed"),
    )


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every folder under `roots` (or a root itself) holding summary.json, sorted, once each."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise ReportError(f"{root} does not exist")
        found.update(p.parent.resolve() for p in root.rglob(SUMMARY_FILE))
    return sorted(found)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def assign_variants(runs: Sequence[RunRecord]) -> None:
    """Within each (dataset, split, method), name the config values that differ between runs.

    Runs identical up to IGNORED_KEYS (seeds, paths, logging) share the variant "" and are
    aggregated; otherwise the variant is e.g. "rank=4, lr=0.001".
    """
    families: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in runs:
        families[(run.suite, run.dataset, run.split, run.method)].append(run)
    for members in families.values():
        flats = [{k: v for k, v in flatten(r.config).items() if not _ignored(k)} for r in members]
        keys = sorted(set().union(*flats))
        differing = [
            k
            for k in keys
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1
        ]
        short = _short_names(differing)
        for run, flat in zip(members, flats, strict=True):
            run.variant = ", ".join(f"{short[k]}={_show(flat.get(k))}" for k in differing)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where the last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


# ---------------------------------------------------------------------- per-run numbers
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


def group_runs(runs: Sequence[RunRecord], budgets: Sequence[float]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.suite, run.dataset, run.split, run.method, run.variant)
        groups.setdefault(key, Group(*key)).runs.append(run)
    for group in groups.values():
        numbers = [run_numbers(r, budgets) for r in group.runs]
        keys = dict.fromkeys(k for n in numbers for k in n)
        group.stats = {k: Stat.of(n.get(k) for n in numbers) for k in keys}
    return sorted(groups.values(), key=_group_order)


def _dataset_order(suite: str, dataset: str) -> tuple:
    if suite == "vtab1k":
        order = list(VTAB_GROUPS).index(dataset) if dataset in VTAB_GROUPS else len(VTAB_GROUPS)
        return (0, order, dataset)
    return (1, 0, dataset)


SPLIT_ORDER = {"final": 0, "test": 0, "tune": 1, "val": 2}


def _group_order(g: Group) -> tuple:
    return (*_dataset_order(g.suite, g.dataset), SPLIT_ORDER.get(g.split, 3), g.method, g.variant)


# ---------------------------------------------------------------------- formatting
def fmt_acc(stat: Stat | None, with_std: bool = True) -> str:
    if stat is None or stat.mean is None:
        return "-"
    text = f"{100 * stat.mean:.2f}"
    if with_std and stat.std is not None:
        text += f" ± {100 * stat.std:.2f}"
    return text


def fmt_macs(macs: float | None) -> str:
    """'8.12 G', '12.3 M' (MACs per image)."""
    if macs is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


def fmt_macs_fraction(group: Group, name: str) -> str:
    macs, fraction = group.value(f"{name}_macs"), group.value(f"{name}_macs_fraction")
    if macs is None:
        return "-"
    return f"{fmt_macs(macs)} ({100 * fraction:.0f} %)" if fraction is not None else fmt_macs(macs)


def fmt_speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_params(group: Group) -> str:
    trainable, total = group.value("params_trainable"), group.value("params_total")
    if trainable is None:
        return "-"
    text = f"{trainable / 1e6:.3f} M"
    return f"{text} ({100 * trainable / total:.2f} %)" if total else text


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first: int = 1) -> str:
    """A GitHub markdown table; the first `align_first` columns left, the others right."""
    aligns = [":---" if i < align_first else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def budget_label(b: float) -> str:
    """'budget 50 %' for a fraction of the full cost, 'budget 8.00 GMACs' for MACs per image."""
    return _budget_setting(b)


# ---------------------------------------------------------------------- (a) per dataset
def dataset_section(groups: Sequence[Group], budgets: Sequence[float]) -> str:
    first = groups[0]
    title = f"{first.suite} / {first.dataset}" if first.suite != first.dataset else first.dataset
    group_name = VTAB_GROUPS.get(first.dataset) if first.suite == "vtab1k" else None
    heading = f"### {title}" + (f" ({group_name})" if group_name else "")
    blocks = sorted({int(e["block"]) for g in groups for r in g.runs for e in r.summary["exits"]})
    acc_keys = ["acc_last"] + [f"acc_block{b}" for b in blocks]
    best = {key: _best(groups, key) for key in acc_keys}
    header = ["split", "method", "n", "last exit"]
    header += [f"exit @ block {b}" for b in blocks]
    header += ["keep 100 %: MACs", "speed-up", "keep 99 %: acc", "MACs", "speed-up"]
    for b in budgets:
        header += [f"{budget_label(b)}: acc", "MACs"]
    header += ["trainable params", "storage (KB)"]
    rows = []
    for g in groups:
        row = [g.split, g.label, str(g.n)]
        row += [_bold_if(fmt_acc(g.stats.get(key)), g is best[key]) for key in acc_keys]
        row += [fmt_macs_fraction(g, "keep100"), fmt_speedup(g.value("keep100_speedup"))]
        row += [fmt_acc(g.stats.get("keep99_acc")), fmt_macs_fraction(g, "keep99"),
                fmt_speedup(g.value("keep99_speedup"))]  # fmt: skip
        for b in budgets:
            key = budget_key(b)
            row += [fmt_acc(g.stats.get(f"{key}_acc")), fmt_macs_fraction(g, key)]
        storage = g.value("storage_kb")
        row += [fmt_params(g), "-" if storage is None else f"{storage:,.1f}"]
        rows.append(row)
    notes = []
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(map(str, seeds))) != len(seeds):
            notes.append(f"- {g.split} / {g.label}: several runs with the same seed ({seeds})")
    return "\n".join(
        [heading, "", md_table(header, rows, align_first=3), *([""] + notes if notes else [])]
    )


def _best(groups: Sequence[Group], key: str) -> Group | None:
    """The group with the highest mean of `key` among the final / test ones, if several have it."""
    scored = [g for g in groups if g.value(key) is not None and SPLIT_ORDER.get(g.split) == 0]
    return max(scored, key=lambda g: g.value(key)) if len(scored) > 1 else None


def _bold_if(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != "-" else text


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


def suite_section(groups: Sequence[Group], budgets: Sequence[float]) -> str | None:
    chosen, variant_notes = suite_groups(groups)
    if not chosen:
        return None
    tasks = list(VTAB_GROUPS)
    header = ["method", "metric"] + [VTAB_SHORT[t] for t in tasks]
    header += [*GROUPS, "mean", "group mean"]
    out = ["## VTAB-1K suite (final split: train800val200, test set)", ""]
    out.append(
        "Cells: mean over seeds of each task's test result; natural / specialized / structured: "
        "the mean over the group's tasks; mean: the plain mean over tasks; group mean: the mean "
        "of the three group means. `*`: taken over the tasks present only (see missing tasks)."
    )
    out.append("")
    missing_lines = []
    for method, per_task in chosen.items():
        missing = [t for t in tasks if t not in per_task]
        if missing:
            missing_lines.append(
                f"- {method}: {len(per_task)} of {len(tasks)} tasks; missing: {', '.join(missing)}"
            )
        seeds = sorted({g.n for g in per_task.values()})
        if len(seeds) > 1:
            missing_lines.append(f"- {method}: seeds per task vary: {seeds[0]}-{seeds[-1]}")
    settings = [("acc_last", None, "last exit")]
    settings += [(f"{name}_acc", name, label) for name, _, label in KEEP]
    settings += [(f"{budget_key(b)}_acc", budget_key(b), budget_label(b)) for b in budgets]
    for acc_key, point, title in settings:
        rows = []
        for method, per_task in chosen.items():
            rows.append(_suite_row(method, "acc (%)", per_task, acc_key, 100, ".2f"))
            if point is not None:
                rows.append(_suite_row(method, "MACs (% of last exit)", per_task,
                                       f"{point}_macs_fraction", 100, ".0f"))  # fmt: skip
            else:
                rows.append(_suite_row(method, "trainable params (M)", per_task,
                                       "params_trainable", 1e-6, ".3f"))  # fmt: skip
        if all(all(c == "-" for c in row[2:]) for row in rows):
            continue  # e.g. a budget no final run has
        what = (
            "test accuracy of the last exit"
            if point is None
            else (f"{title}: test accuracy and mean MACs with thresholds calibrated on val200")
        )
        out += [f"### {title}", "", what, "", md_table(header, rows, align_first=2), ""]
    if missing_lines or variant_notes:
        out += ["Missing tasks and notes:", "", *missing_lines, *variant_notes, ""]
    return "\n".join(out).rstrip() + "\n"


def _suite_row(
    method: str, metric: str, per_task: Mapping[str, Group], key: str, scale: float, spec: str
) -> list[str]:
    values = {t: g.value(key) for t, g in per_task.items()}
    values = {t: v for t, v in values.items() if v is not None}
    means = suite_means(values)
    row = [method, metric]
    row += [format(scale * values[t], spec) if t in values else "-" for t in VTAB_GROUPS]
    for name in (*GROUPS, "mean", "group mean"):
        value = means[name]
        if value is None:
            row.append("-")
            continue
        complete = (
            all(t in values for t, g in VTAB_GROUPS.items() if g == name)
            if name in GROUPS
            else len(values) == len(VTAB_GROUPS)
        )
        row.append(format(scale * value, spec) + ("" if complete else "*"))
    return row


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
    header, rows = long_rows(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buffer.getvalue())  # temporary file + rename: never half-written


# ---------------------------------------------------------------------- the report
LEGEND = """\
Columns: `last exit` and `exit @ block b` are the test accuracy (%) of that exit alone, its
"anytime" accuracy (tune runs: val200, which is their test list); bold: the best method in the
column. `keep 100 %` / `keep 99 %`: the cheapest point of the budget curve (thresholds
calibrated on val, measured on test) with 100 % / 99 % of the last exit's accuracy: mean MACs per
image (share of the last exit's cost) and speed-up (last exit's MACs over the mean). `budget X %`:
the thresholds with the best val accuracy within X % of the full cost, measured on test.
Accuracies are mean ± sample std over the n seeds (no ± for n = 1); MACs, speed-ups and parameter
counts are means. `storage`: the size of the trainable state as exported (`trainable.safetensors`'
tensors: fp32, 1-bit adapter weights packed 8 per byte plus their mean and std).
`method [a=b]`: runs of that method whose config differs in a=b from the
others of the same dataset."""


def build_report(
    runs: Sequence[RunRecord],
    budgets: Sequence[float],
    command: str,
    roots: Sequence[Path],
    skipped: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> tuple[str, list[Group]]:
    assign_variants(runs)
    groups = group_runs(runs, budgets)
    now = now or dt.datetime.now(dt.timezone.utc)
    out = ["# MET results", ""]
    out.append(f"Made with `{command}` on {now:%Y-%m-%d %H:%M} UTC.")
    out.append("")
    datasets = sorted({(g.suite, g.dataset) for g in groups}, key=lambda d: _dataset_order(*d))
    out.append(
        f"{len(runs)} run folder(s) under {', '.join(f'`{r}`' for r in roots)}; "
        f"{len(datasets)} dataset(s), {len(groups)} setting(s)."
    )
    if skipped:
        out += ["", f"Skipped {len(skipped)} unreadable run folder(s):", ""]
        out += [f"- {s}" for s in skipped]
    out.append("")
    suite = suite_section(groups, budgets)
    if suite:
        out += [suite.rstrip(), ""]
    out += ["## Per dataset", "", LEGEND, ""]
    for suite_name, dataset in datasets:
        members = [g for g in groups if (g.suite, g.dataset) == (suite_name, dataset)]
        out += [dataset_section(members, budgets), ""]
    return "\n".join(out).rstrip() + "\n", groups


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
