"""Shared by the training-step tests (host syncs, compile, precision, DDP, optimizer groups):
every method's real config on the tiny ViT, and a sync-op counter."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from met_lightning.config import validate_config
from met_lightning.train import instantiate_model
from met_lightning.training.module import MultiExitClassifier
from tests.helpers import TINY_BACKBONE, compose_config, tiny_backbone

NUM_CLASSES = 10


def build_module(method: str, tmp_path: Path, *overrides: str) -> MultiExitClassifier:
    """The method's MultiExitClassifier (network, loss, optimizer from the composed config, no
    scheduler) on the tiny random ViT; MET and multi_exit_linear with exits [2, 4]."""
    exits = "[2,4]" if method in ("met", "multi_exit_linear") else "[-1]"
    overrides = (
        "scheduler=none",
        f"method={method}",
        *TINY_BACKBONE,
        f"model.net.exits={exits}",
        *overrides,
    )
    cfg = compose_config(list(overrides), tmp_path)
    validate_config(cfg)
    torch.manual_seed(0)
    return instantiate_model(cfg.model, tiny_backbone(), NUM_CLASSES)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, 32, 32] and labels [n] with repeated classes (the label graph has edges)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3


def loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    images, labels = batch(n)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def tiny_trainer(root: Path, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints or progress bar."""
    options = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that force a device -> host sync: scalar reads, nonzero,
    masked_select, and index / index_put with a boolean index tensor (`counts`: op -> number)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in INDEX_OPS and len(args) > 1:
            indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.counts[f"{name}(bool)"] += 1
        return func(*args, **(kwargs or {}))


class PoisonRank(L.Callback):
    """Makes one process's loss infinite from batch `batch` of epoch `epoch` on (an inf pixel):
    a divergence that only rank `rank` sees. Reach it from the CLI with PYTHONPATH=<repo> and
    `+callbacks.poison._target_=tests.step_helpers.PoisonRank`."""

    def __init__(self, rank: int = 1, epoch: int = 0, batch: int = 1) -> None:
        self.rank, self.epoch, self.batch = rank, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and (trainer.current_epoch, batch_idx) >= (
            self.epoch, self.batch
        ):  # fmt: skip
            batch[0][0, 0, 0, 0] = float("inf")
