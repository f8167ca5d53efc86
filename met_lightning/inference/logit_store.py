"""The logit store (`logits.safetensors` in a run folder): every exit's logits and the labels of
the held-out and test splits, written once per run; all budget analysis reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from met_lightning.checkpoint.tagged import read_tagged, write_tagged
from met_lightning.errors import CheckpointError

FORMAT = "met_lightning.logits/1"
FILENAME = "logits.safetensors"
MISSING_HINT = " (a training run writes it after testing; runs with test=false have none)"


class SplitLogits(NamedTuple):
    logits: torch.Tensor  # [N, K, C] float32
    labels: torch.Tensor  # [N] long


@dataclass(frozen=True)
class LogitStore:
    """Per-split logits of every exit, with the exits and their MACs per image."""

    splits: Mapping[str, SplitLogits]
    exits: tuple[int, ...]  # 1-based blocks
    exit_macs: tuple[int, ...]  # cumulative MACs per image to reach each exit
    # Lightning precision the logits were made in; None: unknown (an older store)
    precision: str | None = None

    def __post_init__(self) -> None:
        for name, split in self.splits.items():
            n, k, _ = split.logits.shape
            if k != len(self.exits) or split.labels.shape != (n,):
                raise ValueError(
                    f"split {name!r}: logits {tuple(split.logits.shape)} / labels "
                    f"{tuple(split.labels.shape)} do not match {len(self.exits)} exits"
                )

    def __getitem__(self, split: str) -> SplitLogits:
        if split not in self.splits:
            raise CheckpointError(
                f"the logit store has no {split!r} split (it has {sorted(self.splits)})"
            )
        return self.splits[split]

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, split in self.splits.items():
            tensors[f"{name}/logits"] = split.logits.detach().float().cpu().contiguous()
            tensors[f"{name}/labels"] = split.labels.detach().long().cpu().contiguous()
        metadata = {key: json.dumps(list(getattr(self, key))) for key in ("exits", "exit_macs")}
        if self.precision is not None:
            metadata["precision"] = str(self.precision)
        return write_tagged(path, tensors, FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> LogitStore:
        """Read a store file, or `<run folder>/logits.safetensors`."""
        tensors, metadata = read_tagged(path, FILENAME, FORMAT, "logit store", MISSING_HINT)
        names = sorted({key.split("/")[0] for key in tensors})
        splits = {n: SplitLogits(tensors[f"{n}/logits"], tensors[f"{n}/labels"]) for n in names}
        exits, exit_macs = (tuple(json.loads(metadata[key])) for key in ("exits", "exit_macs"))
        return cls(splits, exits, exit_macs, metadata.get("precision"))


def recorded_precision(path: str | Path) -> str | None:
    """The precision a store was made in (None: not recorded), from its header alone."""
    _, metadata = read_tagged(path, FILENAME, FORMAT, "logit store", MISSING_HINT, tensors=False)
    return metadata.get("precision")


def concat_batches(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> SplitLogits:
    """One SplitLogits from a list of (logits [B, K, C], labels [B]) batches."""
    if not batches:
        raise ValueError("no batches to store")
    logits = torch.cat([b[0].detach().float().cpu() for b in batches])
    labels = torch.cat([b[1].detach().long().cpu() for b in batches])
    return SplitLogits(logits, labels)
