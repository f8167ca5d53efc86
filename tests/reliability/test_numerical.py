"""A NaN / Inf loss stops the run with one clear line and keeps the last good checkpoint."""

from __future__ import annotations

import torch

from met_lightning.checkpoint import load_lightning_checkpoint
from tests.helpers import TINY_OVERRIDES, run_task

SHORT = [
    *TINY_OVERRIDES,
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "scheduler.warmup_epochs=0",
    "callbacks.budget_analysis=null",
]
SPIKE = "+callbacks.lr_spike._target_=tests.reliability.faults.LrSpike"


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _only_good_checkpoints(folder, epoch: int) -> None:
    """checkpoints/ holds the checkpoints of epochs <= `epoch` only; last.ckpt is `epoch`'s,
    loads, and every tensor in it is finite."""
    last = load_lightning_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert last["epoch"] == epoch
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(t).all() for s in last["optimizer_states"][0]["state"].values()
               for t in s.values())  # fmt: skip
    names = {p.name for p in (folder / "checkpoints").iterdir()}
    assert names == {"last.ckpt", f"epoch_{epoch:03d}.ckpt"} or names == {"last.ckpt"}, names


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    runs = {name: tmp_path / name for name in ("lr", "loss", "weights")}
    spike = [*SHORT, SPIKE, "+callbacks.lr_spike.epoch=1"]
    results = [  # in-process `python -m met_lightning` runs (the Hydra task)
        # a real cause: a learning rate far too high (NaN from the first steps)
        run_task([*SHORT, "optimizer.lr=1e30", "logger=csv"], runs["lr"]),
        # the same blow-up after one good epoch, at the start of epoch 1: NaN loss
        run_task(spike, runs["loss"]),
        # ... at the last step of epoch 1: the loss of every step was finite, but the
        # weights are ruined; validation sees it and the checkpoint is refused
        run_task([*spike, "+callbacks.lr_spike.batch=2"], runs["weights"]),
    ]
    for result in results:
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    lr, loss, weights = (_error_line(r.stderr) for r in results)

    assert lr.startswith("error: training diverged: the loss is nan at step ")
    assert "ce per exit [nan, nan], graph per exit [nan]" in lr
    assert "no checkpoint was written" in lr and "Lower optimizer.lr (now 1e+30)" in lr
    assert not (runs["lr"] / "checkpoints").exists()  # nothing saved from the diverged run
    assert not (runs["lr"] / "trainable.safetensors").exists()
    assert "lr-AdamW" in (runs["lr"] / "metrics.csv").read_text()  # the local log is kept

    assert "training diverged: the loss is" in loss and "(epoch 1, batch " in loss
    assert f"the last good checkpoint is {runs['loss'] / 'checkpoints'}" in loss
    _only_good_checkpoints(runs["loss"], epoch=0)

    assert "parameters or epoch losses are NaN/infinite" in weights and "(epoch 1)" in weights
    assert f"the last good checkpoint is {runs['weights'] / 'checkpoints'}" in weights
    _only_good_checkpoints(runs["weights"], epoch=0)
