"""kill -9 in the middle of an epoch, then `resume=RUN_DIR`: the same run as without the kill."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from met_lightning.checkpoint import load_lightning_checkpoint, resume_argv
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.train import train
from tests.helpers import compose_config, run_cli
from tests.reliability.faults import ENV, TINY_DETERMINISTIC, popen_cli

ARGS = [
    *TINY_DETERMINISTIC,
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=8",
    "scheduler.warmup_epochs=1",
]
ARTIFACTS = ("trainable.safetensors", "logits.safetensors", "summary.json", "budget.json")


def _rows(path):
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run and, side by side, the same run killed with SIGKILL in its third
    epoch and resumed: (uninterrupted folder, resumed folder, resume result, epoch at kill)."""
    root = tmp_path_factory.mktemp("resume")
    reference, run = root / "reference", root / "run"
    ref = popen_cli([*ARGS, f"hydra.run.dir={reference}"], root, root / "reference.out")
    victim = popen_cli([*ARGS, f"hydra.run.dir={run}"], root, root / "victim.out")
    last = run / "checkpoints" / "last.ckpt"
    seen: dict[int, float] = {}  # inode of last.ckpt -> when it appeared (written, renamed)
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline:
        try:
            seen.setdefault(os.stat(last).st_ino, time.monotonic())
        except FileNotFoundError:
            pass
        if len(seen) == 2:  # epoch 1 just ended: wait half an epoch, then kill
            first, second = sorted(seen.values())
            time.sleep((second - first) / 2)
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert victim.wait() == -signal.SIGKILL, (root / "victim.out").read_text()[-3000:]
    epoch_at_kill = load_lightning_checkpoint(last)["epoch"]
    assert not (run / "summary.json").exists()

    resumed = run_cli([f"resume={run}"], cwd=root, **ENV)
    assert ref.wait(timeout=300) == 0, (root / "reference.out").read_text()[-3000:]
    return reference, run, resumed, epoch_at_kill


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_run(killed_and_resumed):
    reference, run, resumed, epoch_at_kill = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epoch_at_kill == 1  # killed in epoch 2 (0-based), after epoch 1's checkpoint
    assert f"resuming {run}" in (run / "train.log").read_text()
    # the final artifacts come from the resumed run and equal the uninterrupted run's
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
    for name in ("trainable.safetensors", "logits.safetensors"):
        ours, theirs = load_file(run / name), load_file(reference / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (run / "summary.json").read_text() == (reference / "summary.json").read_text()
    # every metric of every epoch, once: nothing lost, nothing logged twice
    assert _rows(run / "metrics.csv") == _rows(reference / "metrics.csv")
    last = load_lightning_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 4 * 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir()
    )


def _resumed_config(argv: list[str], run):
    """The config `python -m met_lightning ARGV` composes (with resume_argv), run folder `run`."""
    overrides = [a for a in resume_argv(["met", *argv])[1:] if not a.startswith("hydra.")]
    return compose_config(overrides, run)


def test_resume_refuses_a_changed_config_and_a_folder_without_checkpoint(
    killed_and_resumed, tmp_path
):
    """Each check fails before anything is built; in process (the CLI path is the same as for
    the corrupt checkpoints of test_checkpoint_safety)."""
    _, run, _, _ = killed_and_resumed
    config = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        train(_resumed_config([f"resume={run}", "trainer.max_epochs=5"], run))
    assert "trainer.max_epochs: 4 -> 5" in str(err.value) and "ckpt_path=" in str(err.value)
    assert (run / "config.yaml").read_text() == config  # not overwritten

    no_ckpt = tmp_path / "no_ckpt"  # a copy, moved: its paths are compared as moved
    shutil.copytree(run, no_ckpt)
    (no_ckpt / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError) as err:
        train(_resumed_config([f"resume={no_ckpt}"], no_ckpt))
    assert str(no_ckpt / "checkpoints" / "last.ckpt") in str(err.value)
    assert "ckpt_path=" in str(err.value)

    with pytest.raises(CheckpointError, match="overrides.yaml does not exist"):
        resume_argv(["met", f"resume={tmp_path}"])


def test_resume_argv_puts_the_runs_overrides_first(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- debug=deterministic\n- trainer.max_epochs=4\n- +experiment=demo\n- resume=/old\n"
    )
    argv = ["met", f"resume={tmp_path}", "trainer.max_epochs=5"]
    assert resume_argv(argv) == [
        "met",
        "debug=deterministic",
        "+experiment=demo",  # the user's trainer.max_epochs replaces the run's; old resume= goes
        f"resume={tmp_path}",
        "trainer.max_epochs=5",
        f"hydra.run.dir={tmp_path}",
        "hydra.output_subdir=null",
    ]
    assert resume_argv(["met", "seed=1"]) == ["met", "seed=1"]
    assert resume_argv(["met", "resume=null"]) == ["met", "resume=null"]
