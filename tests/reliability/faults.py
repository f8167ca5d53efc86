"""Shared pieces of the fault suite: fault injection and CLI runs that can go side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L

from tests.helpers import REPO, TINY_OVERRIDES

# One thread per run: on a small shared machine, torch's default thread pool makes a
# seconds-long tiny run several times slower, and it lets two runs go side by side.
ENV = {"OMP_NUM_THREADS": "1"}
# A tiny model, a few batches per epoch, bit-reproducible on CPU (conf/debug/deterministic.yaml).
TINY_DETERMINISTIC = [
    *TINY_OVERRIDES,
    "debug=deterministic",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


class LrSpike(L.Callback):
    """From batch `batch` of epoch `epoch` on, every optimizer step uses learning rate `lr`: a
    divergence on cue. Test-only; reach it from the CLI with PYTHONPATH=<repo> (with_repo_on_path)
    and `+callbacks.lr_spike._target_=tests.reliability.faults.LrSpike +callbacks.lr_spike.epoch=1`.
    """

    def __init__(self, epoch: int = 1, batch: int = 0, lr: float = 1e30) -> None:
        self.epoch, self.batch, self.lr = epoch, batch, lr
        self._batch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if (trainer.current_epoch, self._batch) >= (self.epoch, self.batch):
            for group in optimizer.param_groups:
                group["lr"] = self.lr


def popen_cli(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """`python -m met_lightning ARGS` started in the background (no wandb, no hub); output to
    `log`. The environment is that of tests.helpers.run_cli."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **ENV, **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "met_lightning", *args],
        cwd=cwd,
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_side_by_side(
    commands: list[tuple[list[str], dict[str, str]]], cwd: Path, module: str = "met_lightning"
) -> list[subprocess.CompletedProcess]:
    """Run short CLI commands (args, extra env) at the same time; their results, in order.

    `module` (the training entry by default) is the default for the commands; a command may
    name its own as a third element: (args, env, module)."""
    procs = []
    for args, env, *own in commands:
        full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **ENV, **env}
        full_env.pop("HYDRA_FULL_ERROR", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", own[0] if own else module, *args],
                cwd=cwd,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def with_repo_on_path() -> dict[str, str]:
    """The environment that lets a CLI subprocess import tests.reliability.faults."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}
