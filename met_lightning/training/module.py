"""LightningModule that trains every exit of a multi-exit network jointly."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from met_lightning.errors import CheckpointError, TrainingDivergedError
from met_lightning.losses.multi_exit import LossConfig, MultiExitLoss
from met_lightning.models.multi_exit_vit import NetConfig
from met_lightning.structured import target_config
from met_lightning.training.loggers import flush_csv

STAGES = ("train", "val", "test")
Batch = tuple[torch.Tensor, torch.Tensor]  # images [B, C, H, W], labels [B]
# Our part of a Lightning checkpoint besides the trainable parameters: what an exact resume needs.
RESUME_STATE = "met_resume_state"


def collect_rng_states() -> dict[str, Any]:
    """Python / numpy / torch (and CUDA) RNG states as tensors and plain values (weights-only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `collect_rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def compute_and_reset(metrics: Any) -> list[torch.Tensor]:
    """The values of torchmetrics `metrics`, which start over."""
    values = [metric.compute() for metric in metrics]
    for metric in metrics:
        metric.reset()
    return values


class MultiExitClassifier(L.LightningModule):
    """Logs `stage/acc_exit{k}` for every exit and `stage/acc` for the last one.

    Its arguments are the `model` node (`ModelConfig`): `name` (the method's label in reports),
    `optimizer` / `scheduler` (partials completed in `configure_optimizers`; no scheduler: a
    constant learning rate), `compile` / `compile_mode` (`compile_network`). Checkpoints hold the
    trainable parameters only: the frozen backbone is rebuilt from config.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: MultiExitLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        name: str = "met",
    ) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        # scheduler=none: a config without `_target_` (the demo's warmup_epochs may be left in it)
        self.scheduler_factory = scheduler if callable(scheduler) else None
        self.strict_loading = False  # the frozen backbone is not in our checkpoints
        num_exits = net.num_exits
        # keys are "train_acc" etc.: a plain "train" would shadow nn.Module.train;
        # validate_args=False: the argument checks read values on the host, a sync per update
        self.accuracy = nn.ModuleDict()
        for stage in STAGES:
            self.accuracy[f"{stage}_acc"] = nn.ModuleList(
                MulticlassAccuracy(net.num_classes, average="micro", validate_args=False)
                for _ in range(num_exits)
            )
        # nan_strategy="disable": the default NaN check reads a value on the host every update;
        # a NaN loss is caught by the divergence record (see `_record_divergence`)
        self.val_loss = MeanMetric(nan_strategy="disable")
        # epoch means of the loss terms, synced by torchmetrics in our hook on every rank;
        # `self.log(sync_dist=True)` syncs lazily: a deadlock if only rank 0's bar asks for it
        self.train_term_names = (
            ["train/loss_epoch"]
            + [f"train/ce_exit{k + 1}" for k in range(num_exits)]
            + [f"train/graph_exit{k + 1}" for k in range(num_exits - 1)]
        )
        self.train_terms = nn.ModuleList(
            MeanMetric(nan_strategy="disable") for _ in self.train_term_names
        )
        self.val_acc_best = MaxMetric()
        self.num_trainable, self.num_total = count_parameters(net)
        # the first non-finite training step, kept on the device (see `_record_divergence`);
        # plain attributes, not buffers: DDP would overwrite every rank's with rank 0's
        self._bad_step: torch.Tensor | None = None  # [3] global step, epoch, batch; -1: none
        self._bad_parts: torch.Tensor | None = None  # [2K] loss, ce per exit, graph per exit
        if compile:  # trainer=gpu turns it on
            self.compile_network(mode=compile_mode)

    def compile_network(self, mode: str | None = None, **options: Any) -> None:
        """torch.compile the network and the loss in place (`nn.Module.compile`): parameter names
        stay the eager modules', and the early-exit engine's direct calls run eagerly."""
        self.net.compile(mode=mode, **options)
        self.loss.compile(mode=mode, **options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of every exit [B, K, C]."""
        return self.net(images).logits

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: Batch, stage: str) -> tuple[Any, dict[str, torch.Tensor]]:
        images, labels = batch
        out = self.net(images)
        parts = self.loss(out.logits, out.features, labels)
        for k, metric in enumerate(self.accuracy[f"{stage}_acc"]):
            metric.update(out.logits[:, k].detach(), labels)
        # the logits are for callbacks (the budget analysis)
        return parts, {"logits": out.logits.detach(), "labels": labels}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        parts, _ = self._shared_step(batch, "train")
        self._record_divergence(parts, batch_idx)  # checked every log_every_n_steps, no sync here
        # for the logger (read every log_every_n_steps), not the progress bar (reads every batch)
        self.log("train/loss", parts.total, on_step=True, on_epoch=False)
        terms = [parts.total.detach(), *parts.ce, *parts.graph]
        # a tensor weight: a Python number is turned into a tensor and checked for NaN on the host
        weight = torch.full_like(terms[0], batch[0].shape[0])
        for metric, value in zip(self.train_terms, terms, strict=True):
            metric.update(value, weight=weight)
        return parts.total

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        parts, outputs = self._shared_step(batch, "val")
        self.val_loss.update(parts.total, weight=torch.full_like(parts.total, batch[0].shape[0]))
        return outputs

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")[1]

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Logits of every exit [B, K, C] (`batch` is images, or (images, labels))."""
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # ------------------------------------------------------------------ epoch ends
    def _log_accuracy(self, stage: str) -> torch.Tensor:
        values = compute_and_reset(self.accuracy[f"{stage}_acc"])
        self.log_dict({f"{stage}/acc_exit{k + 1}": v for k, v in enumerate(values)})
        self.log(f"{stage}/acc", values[-1], prog_bar=True)
        return values[-1]

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()  # before ModelCheckpoint's hook, which runs after this one
        self._log_accuracy("train")
        means = compute_and_reset(self.train_terms)
        self.log_dict(dict(zip(self.train_term_names, means, strict=True)))

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.raise_if_diverged()  # validation at the end of a training epoch comes first

    def on_validation_epoch_end(self) -> None:
        acc = self._log_accuracy("val")
        self.log("val/loss", compute_and_reset([self.val_loss])[0])
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_train_start(self) -> None:
        self._bad_step = self._bad_parts = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        if every > 0 and (batch_idx + 1) % every == 0:
            self.raise_if_diverged()
            # the progress bar's loss, on the host: the bar converts its values every batch, a
            # device tensor there would be a sync per step
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False,
                         on_step=True, on_epoch=False)  # fmt: skip

    def on_train_epoch_start(self) -> None:
        flush_csv(self.loggers)  # the previous epoch's last rows, logged after its checkpoint

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def on_fit_start(self) -> None:
        counts = {"params/trainable": self.num_trainable, "params/total": self.num_total}
        for logger in self.loggers:
            logger.log_hyperparams(counts)
            logger.log_metrics(counts, step=0)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        # named: met_lightning.training.optim.AdamW groups them (no decay on norms, biases, γ)
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.train_dataloader is None:  # max_epochs=-1: Lightning did not load it
            trainer.fit_loop.setup_data()
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        scheduler = self.scheduler_factory(
            optimizer=optimizer, total_steps=total, steps_per_epoch=per_epoch
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ divergence
    def _record_divergence(self, parts: Any, batch_idx: int) -> None:
        """Keep the step and loss parts of the first non-finite loss, on the device (no sync)."""
        total = parts.total.detach().float()
        if self._bad_step is None or self._bad_step.device != total.device:
            self._empty_record(total.device)
        first = ~torch.isfinite(total) & (self._bad_step[0] < 0)
        where = torch.stack(
            [torch.full_like(self._bad_step[0], v)
             for v in (self.global_step, self.current_epoch, batch_idx)]
        )  # fmt: skip
        values = torch.cat([total[None], parts.ce.float(), parts.graph.float()])
        self._bad_step = torch.where(first, where, self._bad_step)
        self._bad_parts = torch.where(first, values, self._bad_parts)

    def _empty_record(self, device: torch.device) -> None:
        self._bad_step = torch.full((3,), -1, dtype=torch.long, device=device)
        self._bad_parts = torch.zeros(2 * self.net.num_exits, device=device)

    def raise_if_diverged(self) -> None:
        """Raise TrainingDivergedError if a training step of any process had a non-finite loss.

        One device->host read; under DDP a collective (every process calls it at the same
        point), so every process raises together and none waits in the next all-reduce.
        """
        trainer = self._trainer
        # a collective only where every process calls this: inside a running fit
        collective = (
            trainer is not None
            and trainer.world_size > 1
            and trainer.state.fn == "fit"
            and trainer.state.status == "running"
        )
        if self._bad_step is None:
            if not collective:
                return
            self._empty_record(self.device)  # no step trained yet; still in the collective
        record = torch.cat([self._bad_step.double(), self._bad_parts.double()])
        width = record.shape[0]
        if collective:
            record = trainer.strategy.all_gather(record)  # [world, width]
        rows = [r for r in record.reshape(-1, width).cpu().tolist() if r[0] >= 0]
        if not rows:
            return
        step, epoch, batch, total, *rest = min(rows)  # the earliest step of any process
        ce, graph = rest[: self.net.num_exits], rest[self.net.num_exits :]
        raise TrainingDivergedError(
            f"training diverged: the loss is {total} at step {int(step)} (epoch {int(epoch)}, "
            f"batch {int(batch)}); loss parts: ce per exit {_fmt(ce)}, graph per exit "
            f"{_fmt(graph)}. {self._after_divergence()}"
        )

    # ------------------------------------------------------------------ checkpoints
    def _trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def _after_divergence(self) -> str:
        """How to go on after a divergence: the last good checkpoint and the usual fix."""
        trainer, lr, saved, start = self._trainer, "", [], None
        if trainer is not None:
            if trainer.optimizers:
                group = trainer.optimizers[0].param_groups[0]
                lr = f" (now {group.get('initial_lr', group['lr']):.3g})"
            saved = [
                path
                for callback in trainer.checkpoint_callbacks
                for path in (getattr(callback, "last_model_path", ""), callback.best_model_path)
                if path and os.path.isfile(path)
            ]
            start = trainer.ckpt_path
        if last := max(saved, key=os.path.getmtime, default=""):
            kept = f"the last good checkpoint is {last}"
        elif start:
            kept = f"this run wrote no checkpoint; it started from {start}"
        else:
            kept = "no checkpoint was written before"
        return (
            f"Nothing of this state is saved; {kept}. Lower optimizer.lr{lr} or set "
            "trainer.gradient_clip_val and start again"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a step that diverged since the last check: its (and later) weights are not saved
        self.raise_if_diverged()
        keep = self._trainable_keys()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        bad += [
            k
            for k in ("val/loss", "train/loss_epoch")
            if k in metrics and not torch.isfinite(torch.as_tensor(metrics[k])).all()
        ]
        if bad:  # never save a diverged model over the last good checkpoint
            raise TrainingDivergedError(
                f"training diverged: parameters or epoch losses are NaN/infinite at step "
                f"{self.global_step} (epoch {self.current_epoch}): {bad[:3]}. "
                f"{self._after_divergence()}"
            )
        checkpoint["state_dict"] = state
        flush_csv(self.loggers)  # metrics.csv holds every row logged before this checkpoint
        # for an exact resume: the best val accuracy so far and the RNG states (data order)
        checkpoint[RESUME_STATE] = {
            "val_acc_best": self.val_acc_best.max_value.detach().cpu().clone(),
            "rng": collect_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = set(checkpoint.get("state_dict", {}))
        expected = self._trainable_keys()
        if stored != expected:
            missing, extra = sorted(expected - stored), sorted(stored - expected)
            raise CheckpointError(
                "checkpoint does not match this model's trainable parameters "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}): it was made with another "
                "method / model / backbone config"
            )
        params = dict(self.named_parameters())
        wrong = [
            f"{k} {list(v.shape)} (this model: {list(params[k].shape)})"
            for k, v in checkpoint["state_dict"].items()
            if tuple(v.shape) != tuple(params[k].shape)
        ]
        if wrong:
            raise CheckpointError(
                f"checkpoint does not fit this model: {'; '.join(wrong[:3])}; it was made with "
                "another number of classes (data.num_classes) or another model config"
            )
        resume = checkpoint.get(RESUME_STATE)
        if resume is not None and self._trainer is not None and self.trainer.state.fn == "fit":
            best = self.val_acc_best
            best.max_value = resume["val_acc_best"].to(best.max_value.device)
            best._computed = None
            # Lightning restores the modules before it creates the training data iterator (in
            # `estimated_stepping_batches` or at the first epoch): the resumed epoch draws its
            # data order from these states, as the uninterrupted run did
            set_rng_states(resume["rng"])


# the `model` node: MultiExitClassifier's arguments; the method files (conf/method/*.yaml) start
# from `method=base` and override what they change. train() completes `net` and `loss`.
ModelConfig = target_config(
    MultiExitClassifier,
    net=NetConfig,
    loss=LossConfig,
    optimizer="${optimizer}",
    scheduler="${scheduler}",
)
ConfigStore.instance().store(group="method", name="base", package="model", node=ModelConfig)
