"""In-process runs for the resume / export tests: a tiny deterministic run, a simulated kill at a
chosen checkpoint write, and what a finished run folder holds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from met_lightning.checkpoint import SafeCheckpointIO, load_lightning_checkpoint
from met_lightning.train import train
from tests.helpers import compose_config
from tests.reliability.faults import TINY_DETERMINISTIC

EPOCHS = 5
# With these, the best val/acc epoch is not the last one (checked where a test relies on it).
ARGS = [
    *TINY_DETERMINISTIC,
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=8",
    "scheduler.warmup_epochs=1",
    "callbacks.progress_bar=null",
]


class SimulatedKill(Exception):
    """Raised from a checkpoint write: the run stops there, as after kill -9."""


def run(folder: Path, *extra: str) -> dict[str, float]:
    """`python -m met_lightning ARGS EXTRA` in process, writing into `folder`."""
    return train(compose_config([*ARGS, *extra], folder))


def resume(folder: Path) -> dict[str, float]:
    """`python -m met_lightning resume=FOLDER` in process (the run's overrides are ARGS)."""
    return train(compose_config([*ARGS, f"resume={folder}"], folder))


@contextmanager
def kill_at(when: Callable[[dict[str, Any], Path], str | None]) -> Iterator[None]:
    """Checkpoint writes go through `when(checkpoint, path)`: "before" stops the run before the
    file is written, "after" right after it is, None goes on."""
    original = SafeCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):  # noqa: ANN001
        stop = when(checkpoint, Path(path))
        if stop == "before":
            raise SimulatedKill(f"before writing {path}")
        original(self, checkpoint, path, storage_options)
        if stop == "after":
            raise SimulatedKill(f"after writing {path}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SafeCheckpointIO, "save_checkpoint", save)
        yield


def killed_run(folder: Path, when: Callable[[dict[str, Any], Path], str | None]) -> None:
    """A run in `folder` stopped by `kill_at(when)`; fails if the kill point is never reached."""
    with kill_at(when), pytest.raises(SimulatedKill):
        run(folder)


def best_checkpoint(folder: Path) -> Path:
    """The one epoch_NNN.ckpt of a run folder (save_top_k: 1)."""
    (best,) = sorted((folder / "checkpoints").glob("epoch_*.ckpt"))
    return best


def epoch_of(path: Path) -> int:
    return int(load_lightning_checkpoint(path)["epoch"])


def listing(folder: Path) -> list[str]:
    """Every file of a run folder (relative paths, hidden ones included), the CSV logger's too."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_results(run_dir: Path, reference: Path) -> None:
    """The artifacts of `run_dir` equal those of the uninterrupted `reference` run."""
    for name in ("trainable.safetensors", "logits.safetensors"):
        ours, theirs = load_file(run_dir / name), load_file(reference / name)
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name} differs"
    assert (run_dir / "summary.json").read_text() == (reference / "summary.json").read_text()
    ours, theirs = (sorted(os.listdir(d / "checkpoints")) for d in (run_dir, reference))
    assert ours == theirs, f"checkpoints/ holds {ours}; the uninterrupted run's: {theirs}"
