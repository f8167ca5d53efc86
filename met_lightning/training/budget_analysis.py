"""Lightning callback: after testing, store every exit's logits and run the budget analysis.

It collects the logits of `train()`'s `trainer.validate` and `trainer.test` (not of the
validation inside `fit`), gathered from all DDP processes, writes the logit store (with the
trainer's precision, which predict runs in), calibrates thresholds on val, evaluates them on test
and writes / logs the results (a table and an image on wandb) on rank 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from met_lightning.inference.analysis import BudgetReport, analyze, curve_rows, write_report
from met_lightning.inference.budget import DEFAULT_P_VALUES, resolve_budget
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, check_confidence
from met_lightning.inference.logit_store import FILENAME, LogitStore, SplitLogits, concat_batches
from met_lightning.macs import model_exit_costs
from met_lightning.structured import target_config

log = logging.getLogger(__name__)


# the passes whose logits are collected: not the validation inside `fit`
SPLITS = {TrainerFn.VALIDATING: "val", TrainerFn.TESTING: "test"}


class BudgetAnalysis(L.Callback):
    """Budget analysis of the tested model into `output_dir`; `report` holds it after testing.

    `budgets`: to choose thresholds for on val, fractions of the full cost in (0, 1] or MACs per
    image; `p_values`: the MSDNet sweep (default: 40 values in (0, 2]).
    """

    def __init__(
        self,
        output_dir: str | Path,
        confidence: str = DEFAULT_CONFIDENCE,
        budgets: Sequence[float] = (0.5, 0.75),
        p_values: Sequence[float] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.confidence = check_confidence(confidence, "callbacks.budget_analysis.confidence")
        self.budgets = list(budgets or [])
        for i, budget in enumerate(self.budgets):
            resolve_budget(budget, 1, key=f"callbacks.budget_analysis.budgets[{i}]")
        self.p_values = tuple(p_values) if p_values else DEFAULT_P_VALUES
        self._batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self._sizes: dict[str, int] = {}
        self.report: BudgetReport | None = None
        self.metrics: dict[str, float] = {}  # budget/* scalars, also returned by train()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split = SPLITS.get(trainer.state.fn)
        if split is not None:
            self._batches[split] = []
            loaders = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            self._sizes[split] = len(loader.dataset)

    def on_validation_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
        split = SPLITS.get(trainer.state.fn)
        if split is not None and isinstance(outputs, dict) and "logits" in outputs:
            self._batches[split].append((outputs["logits"].detach().cpu(), outputs["labels"].cpu()))

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def _gathered(self, pl_module: L.LightningModule, split: str) -> SplitLogits:
        """This split's logits of every process, in dataset order, without DDP's padding."""
        data = concat_batches(self._batches[split])
        world = pl_module.trainer.world_size
        if world == 1:
            return data
        # DistributedSampler(shuffle=False) gives rank r the samples r, r + W, ... and pads the
        # last round with the first samples again: interleave the ranks and cut the padding.
        size = min(self._sizes[split], world * len(data.labels))
        gathered = (pl_module.all_gather(t).transpose(0, 1).flatten(0, 1)[:size] for t in data)
        return SplitLogits(*(t.cpu() for t in gathered))  # logits, then labels

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._batches["val"] or not self._batches["test"]:
            rank_zero_warn(
                "budget analysis skipped: it needs the logits of trainer.validate and then "
                "trainer.test on the same weights (train() does both when test=true)"
            )
            return
        splits = {split: self._gathered(pl_module, split) for split in ("val", "test")}
        if not trainer.is_global_zero:
            return
        try:
            net = pl_module.net
            precision = str(trainer.precision)  # the precision validate / test ran in
            store = LogitStore(splits, tuple(net.exits), model_exit_costs(net).to_exit, precision)
            store.save(self.output_dir / FILENAME)
            self.report = analyze(store, self.confidence, self.budgets, self.p_values)
            files = write_report(self.report, self.output_dir)
            self._log(trainer, self.report, files)
            log.info("budget analysis: %s", ", ".join(str(p) for p in files.values()))
        except Exception as err:  # the trained model and its summary must still be saved
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            rank_zero_warn(f"budget analysis failed, the run goes on without it: {err!r}")

    def _log(self, trainer: L.Trainer, report: BudgetReport, files: dict[str, Path]) -> None:
        metrics = {}
        for fraction, point in report.keep.items():
            tag = f"{100 * fraction:g}"
            metrics[f"budget/keep{tag}_macs"] = point.mean_macs
            metrics[f"budget/keep{tag}_speedup"] = report.speedup(point)
            metrics[f"budget/keep{tag}_acc"] = point.accuracy
        for b in report.budgets:
            metrics[f"budget/at_{b['budget']:g}_acc"] = b["evaluated"].accuracy
            metrics[f"budget/at_{b['budget']:g}_macs"] = b["evaluated"].mean_macs
        self.metrics = {k: float(v) for k, v in metrics.items()}
        header, rows = curve_rows(report)
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=trainer.global_step)
                if isinstance(logger, WandbLogger):
                    logger.log_table("budget/curve", columns=header, data=rows)
                    logger.log_image("budget/plot", images=[str(files["png"])])
            except Exception as err:  # a logging outage must not fail a finished run
                rank_zero_warn(
                    f"could not log the budget analysis to {type(logger).__name__}: {err}"
                )


# callbacks.budget_analysis (conf/callbacks/default.yaml selects it): its keys and defaults are
# BudgetAnalysis's arguments, so `callbacks.budget_analysis.budgets=[0.3]` overrides one
ConfigStore.instance().store(
    group="callbacks",
    name="budget_analysis_node",
    node=target_config(BudgetAnalysis, output_dir="${paths.output_dir}"),
)
