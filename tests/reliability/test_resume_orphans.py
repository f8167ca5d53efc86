"""A kill between the best-checkpoint write and the last.ckpt write, then `resume=`: the folder
ends with exactly the files of the uninterrupted run (issue 11, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from met_lightning.checkpoint import ResumePoint, remove_stale_files
from tests.reliability.inprocess import (
    assert_same_results,
    epoch_of,
    killed_run,
    listing,
    resume,
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_kill_between_best_and_last_checkpoint_then_resume_leaves_no_orphans(
    tmp_path, reference_run
):
    (reference, _), victim = reference_run, tmp_path / "run"
    killed_at = []

    def after_a_new_best(checkpoint, path):
        """Before last.ckpt of the first epoch >= 1 that wrote a new best: that best is on disk,
        the previous best removed, last.ckpt still the previous epoch's. The kill also leaves
        the atomic writer's temporary file of last.ckpt, half written."""
        epoch = checkpoint["epoch"]
        if (
            path.name == "last.ckpt"
            and epoch >= 1
            and (path.parent / f"epoch_{epoch:03d}.ckpt").exists()
        ):
            killed_at.append(epoch)
            (path.parent / f".last.ckpt.{_dead_pid()}.tmp").write_bytes(b"PK\x03\x04half")
            return "before"
        return None

    killed_run(victim, after_a_new_best)
    (epoch,) = killed_at
    checkpoints = victim / "checkpoints"
    assert epoch_of(checkpoints / "last.ckpt") == epoch - 1
    assert f"epoch_{epoch:03d}.ckpt" in os.listdir(checkpoints)  # the kill's orphan-to-be

    resume(victim)
    assert_same_results(victim, reference)  # checkpoints/ listed alike: no orphan, no -v1
    assert listing(victim) == listing(reference)  # no stray .tmp anywhere either


def _checkpoint(path: Path, step: int) -> Path:
    torch.save({"state_dict": {}, "global_step": step, "epoch": step // 8}, path)
    return path


def test_stale_file_rule_never_removes_what_the_resumed_run_can_use(tmp_path):
    """Only checkpoints written after the resume point, unknown to its callback state, and
    temporary files of writers that are gone are removed."""
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    last = _checkpoint(folder / "last.ckpt", 16)
    best = _checkpoint(folder / "epoch_001.ckpt", 16)  # known to the state
    older = _checkpoint(folder / "epoch_000.ckpt", 8)  # unknown but older: e.g. save_top_k=-1
    same = _checkpoint(folder / "other.ckpt", 16)  # unknown, same step: kept
    future = _checkpoint(folder / "epoch_002.ckpt", 24)  # written after last.ckpt: stale
    future_known = _checkpoint(folder / "pinned.ckpt", 24)  # newer, but the state names it
    broken = folder / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")  # unreadable: kept
    outside = _checkpoint(tmp_path / "outside.ckpt", 99)  # not in the run folder: never touched
    dead_tmp = run_dir / f".summary.json.{_dead_pid()}.tmp"
    live_tmp = folder / f".last.ckpt.{os.getppid()}.tmp"  # a running writer's
    other_tmp = folder / "notes.tmp"  # not the atomic writer's name
    for path in (dead_tmp, live_tmp, other_tmp):
        path.write_text("x")
    state = {
        "best": {
            "dirpath": str(folder),
            "best_model_path": str(best),
            "best_k_models": {str(best): 1.0},
        },
        "last": {"dirpath": str(folder), "best_model_path": str(last), "last_model_path": ""},
        "pin": {"dirpath": str(tmp_path), "kth_best_model_path": str(future_known)},
    }
    point = ResumePoint(str(last), 16, os.path.realpath(run_dir), os.path.realpath(run_dir), state)
    removed = remove_stale_files(point)
    assert sorted(removed) == sorted([future, dead_tmp])
    for path in (last, best, older, same, future_known, broken, outside, live_tmp, other_tmp):
        assert path.exists(), path
