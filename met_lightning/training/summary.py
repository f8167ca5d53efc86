"""The end-of-run table: accuracy and MACs of every exit, trainable vs total parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from met_lightning.atomic import write_text
from met_lightning.checkpoint.trainable import storage_bytes
from met_lightning.inference.analysis import BudgetReport
from met_lightning.inference.budget import BudgetPoint
from met_lightning.macs import format_macs, model_exit_costs
from met_lightning.training.module import count_parameters


def budget_summary(report: BudgetReport) -> dict[str, Any]:
    """The headline budget points: keeping 100 % / 99 % of the last exit, requested budgets."""

    def point(label: str, pt: BudgetPoint) -> dict[str, Any]:
        return {
            "setting": label,
            "accuracy": pt.accuracy,
            "mean_macs": pt.mean_macs,
            "macs_fraction": pt.mean_macs / report.full_macs,
            "speedup": report.speedup(pt),
            "shares": list(pt.shares),
        }

    rows = [point(f"keep {100 * f:g} %", pt) for f, pt in report.keep.items() if pt is not None]
    for b in report.budgets:
        budget = b["budget"]
        name = f"{100 * budget:g} %" if budget <= 1 else format_macs(budget)
        rows.append(point(f"budget {name}", b["evaluated"]))
    return {
        "confidence": report.confidence,
        "calibration_split": report.calibration_split,
        "evaluation_split": report.evaluation_split,
        "points": rows,
    }


def budget_table(budget: Mapping[str, Any]) -> Table:
    table = Table(
        title=f"Early exit: thresholds on {budget['confidence']} calibrated on "
        f"{budget['calibration_split']}, measured on {budget['evaluation_split']}",
        title_justify="left",
        caption="keep X %: the cheapest point of the budget curve with X % of the last exit's "
        "accuracy; budget X %: the thresholds with the best val accuracy within X % of the full "
        "MACs",
        caption_justify="left",
    )
    table.add_column("setting")
    for name in ("acc (%)", "mean MACs", "of last exit", "speed-up", "share per exit (%)"):
        table.add_column(name, justify="right")
    for row in budget["points"]:
        table.add_row(
            row["setting"],
            f"{100 * row['accuracy']:.2f}",
            format_macs(row["mean_macs"]),
            f"{100 * row['macs_fraction']:.0f} %",
            f"{row['speedup']:.2f}x",
            "/".join(f"{100 * s:.0f}" for s in row["shares"]),
        )
    return table


def run_summary(  # noqa: ANN001 - net is a MultiExitViT
    net, metrics: Mapping[str, Any], budget: BudgetReport | None = None
) -> dict[str, Any]:
    """Per-exit accuracy (test if available, else val) and MACs, parameter counts, budgets."""
    stage = "test" if "test/acc" in metrics else "val"
    costs = model_exit_costs(net)
    trainable, total = count_parameters(net)
    accuracies = [metrics.get(f"{stage}/acc_exit{k + 1}") for k in range(len(net.exits))]
    exits = [
        {
            "exit": k + 1,
            "block": block,
            "accuracy": None if acc is None else float(acc),
            "macs": costs.to_exit[k],
            "macs_fraction": costs.fraction(k),
        }
        for k, (block, acc) in enumerate(zip(net.exits, accuracies, strict=True))
    ]
    return {
        "split": stage,
        "exits": exits,
        "backbone_macs": costs.backbone,
        "params_trainable": trainable,
        "params_total": total,
        # bytes of trainable.safetensors' tensors (1-bit adapter weights packed), in KiB
        "storage_kb": storage_bytes(net) / 1024,
        "budget": budget_summary(budget) if budget is not None else None,
    }


def summary_table(summary: Mapping[str, Any], title: str = "Run summary") -> Table:
    trainable, total = summary["params_trainable"], summary["params_total"]
    table = Table(
        title=title,
        title_justify="left",
        caption=f"trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f} %), stored in {summary['storage_kb']:,.1f} KB; "
        f"plain frozen backbone: {format_macs(summary['backbone_macs'])} per image",
        caption_justify="left",
    )
    header = ["exit", "after block", f"{summary['split']} acc (%)", "MACs to exit", "of last exit"]
    for name in header:
        table.add_column(name, justify="right")
    for row in summary["exits"]:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}"
        table.add_row(
            str(row["exit"]),
            str(row["block"]),
            acc,
            format_macs(row["macs"]),
            f"{100 * row['macs_fraction']:.0f} %",
        )
    return table


def weights_line(weights: Mapping[str, Any]) -> str:
    """One line naming the evaluated and exported weights (`train.exported_weights`)."""
    where = f"epoch {weights['epoch']}, step {weights['global_step']}"
    if weights.get("checkpoint") is None:
        return f"weights: the last epoch ({where})"
    score = ""
    if weights.get("monitor") is not None and weights.get("score") is not None:
        score = f", {weights['monitor']} {weights['score']:.4f}"
    return f"weights: {weights['source']} {weights['checkpoint']} ({where}{score})"


def report_summary(  # noqa: ANN001 - net is a MultiExitViT
    net,
    metrics: Mapping[str, Any],
    output_dir: Path,
    budget: BudgetReport | None = None,
    method: str = "met",
    weights: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the summary tables and write them to `output_dir/summary.json`, with `weights` (the
    evaluated and exported ones, `train.exported_weights`) under the key `weights`."""
    summary = {"method": method, **run_summary(net, metrics, budget)}
    console = Console()
    title = "MET run summary" if method == "met" else f"{method} run summary"
    console.print(summary_table(summary, title=title))
    if weights is not None:
        summary["weights"] = dict(weights)
        console.print(weights_line(weights))
    if summary["budget"] is not None:
        console.print(budget_table(summary["budget"]))
    write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
