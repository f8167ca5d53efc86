"""Shared pieces of the cluster tests: test-only callbacks (reach them from the CLI with
PYTHONPATH=<repo>, `+callbacks.NAME._target_=tests.cluster.helpers.CLASS`), the local Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from tests.helpers import REPO, TINY_BACKBONE

START_SLURM = REPO / "experiments" / "slurm" / "start_local_slurm.sh"
# one thread per process, no wandb / hub; Slurm jobs and torchrun children run this checkout
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(REPO)}  # fmt: skip
# a seconds-long run of the tiny model: 1 epoch of 3 batches, no test budget analysis, no logger
SHORT = [*TINY_BACKBONE, "method=linear_probe", "debug=fast", "callbacks.budget_analysis=null"]


def env(**extra: str) -> dict[str, str]:
    full = {**os.environ, **ENV, **extra}
    full.pop("HYDRA_FULL_ERROR", None)
    return full


class SaveWeights(L.Callback):
    """After fit: each process writes its trainable weights to OUT/rank<global rank>.safetensors."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().clone().contiguous() for n, p in pl_module.named_parameters()
                   if p.requires_grad}  # fmt: skip
        save_file(weights, self.out / f"rank{trainer.global_rank}.safetensors")


class SlowEpochs(L.Callback):
    """Every training epoch lasts at least `seconds` more: time to signal a running job."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)


def start_local_slurm() -> str | None:
    """Start the one-node Slurm of experiments/slurm/start_local_slurm.sh (installing it with
    apt-get if needed); None if it is up, else why not (the test skips with it)."""
    if sys.platform != "linux":
        return f"local Slurm needs Linux, not {sys.platform}"
    command = [str(START_SLURM)]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "local Slurm not started: not root and no sudo"
        command = ["sudo", "-n", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"local Slurm not started: {err}"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"{START_SLURM} exited with {done.returncode}"
    print(done.stdout.strip())
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
