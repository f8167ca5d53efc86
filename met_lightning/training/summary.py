"""The end-of-run table: accuracy and MACs of every exit, trainable vs total parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from met_lightning.macs import format_macs, model_exit_costs
from met_lightning.training.module import count_parameters


def run_summary(net, metrics: Mapping[str, Any]) -> dict[str, Any]:  # noqa: ANN001 - MultiExitViT
    """Per-exit accuracy (test if available, else val) and MACs, and parameter counts."""
    stage = "test" if "test/acc" in metrics else "val"
    costs = model_exit_costs(net)
    trainable, total = count_parameters(net)
    exits = []
    for k, block in enumerate(net.exits):
        acc = metrics.get(f"{stage}/acc_exit{k + 1}")
        exits.append(
            {
                "exit": k + 1,
                "block": block,
                "accuracy": None if acc is None else float(acc),
                "macs": costs.to_exit[k],
                "macs_fraction": costs.fraction(k),
            }
        )
    return {
        "split": stage,
        "exits": exits,
        "backbone_macs": costs.backbone,
        "params_trainable": trainable,
        "params_total": total,
    }


def summary_table(summary: Mapping[str, Any], title: str = "MET run summary") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("exit", justify="right")
    table.add_column("after block", justify="right")
    table.add_column(f"{summary['split']} acc (%)", justify="right")
    table.add_column("MACs to exit", justify="right")
    table.add_column("of last exit", justify="right")
    for row in summary["exits"]:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}"
        table.add_row(
            str(row["exit"]),
            str(row["block"]),
            acc,
            format_macs(row["macs"]),
            f"{100 * row['macs_fraction']:.0f} %",
        )
    trainable, total = summary["params_trainable"], summary["params_total"]
    table.caption = (
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %); "
        f"plain frozen backbone: {format_macs(summary['backbone_macs'])} per image"
    )
    table.caption_justify = "left"
    return table


def report_summary(net, metrics: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """Print the summary table and write it to `output_dir/summary.json`."""
    summary = run_summary(net, metrics)
    Console().print(summary_table(summary))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
