"""The report's markdown: the VTAB-1K suite tables, one table per dataset and the legend."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.report_aggregate import (
    KEEP,
    SPLIT_ORDER,
    Group,
    Stat,
    _budget_setting,
    _dataset_order,
    budget_key,
    group_runs,
    suite_groups,
    suite_means,
)
from experiments.report_load import RunRecord, assign_variants
from experiments.run_vtab1k import GROUPS, VTAB_GROUPS

# Short column names of the VTAB-1K tasks, as in the PETL papers' tables.
VTAB_SHORT = {
    "cifar": "cifar", "caltech101": "caltech101", "dtd": "dtd", "oxford_flowers102": "flowers102",
    "oxford_iiit_pet": "pets", "svhn": "svhn", "sun397": "sun397", "patch_camelyon": "camelyon",
    "eurosat": "eurosat", "resisc45": "resisc45", "diabetic_retinopathy": "retinopathy",
    "clevr_count": "clevr-count", "clevr_dist": "clevr-dist", "dmlab": "dmlab", "kitti": "kitti",
    "dsprites_loc": "dspr-loc", "dsprites_ori": "dspr-ori", "smallnorb_azi": "snorb-azi",
    "smallnorb_ele": "snorb-ele",
}  # fmt: skip


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
