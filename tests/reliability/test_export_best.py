"""`trainable.safetensors` holds the best val/acc epoch's weights, with or without testing, and
summary.json names that epoch (issue 11, item 6)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from met_lightning.checkpoint import FILENAME, load_lightning_checkpoint, load_trainable
from met_lightning.checkpoint.trainable import export_state
from tests.reliability.inprocess import EPOCHS, best_checkpoint, run


def _export_of(checkpoint_file, run_dir):
    """What `save_trainable` stores for the weights of a Lightning checkpoint of this run."""
    net, _ = load_trainable(run_dir)
    state = load_lightning_checkpoint(checkpoint_file)["state_dict"]
    missing, unexpected = net.load_state_dict(
        {k.removeprefix("net."): v for k, v in state.items()}, strict=False
    )
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    return export_state(net)


@pytest.mark.parametrize("test", [False, True])
def test_the_best_epoch_is_exported_and_named(tmp_path, test, request):
    if test:  # test=true is the default: the resume tests' uninterrupted run, made once
        run_dir, metrics = request.getfixturevalue("reference_run")
    else:
        run_dir = tmp_path / "run"
        metrics = run(run_dir, "test=false")
    best = best_checkpoint(run_dir)
    saved = load_lightning_checkpoint(best)
    assert saved["epoch"] < EPOCHS - 1, "the test needs a best epoch before the last one"

    exported = load_file(run_dir / FILENAME)
    expected = _export_of(best, run_dir)
    last = _export_of(run_dir / "checkpoints" / "last.ckpt", run_dir)
    assert exported.keys() == expected.keys()
    assert all(exported[k].equal(expected[k]) for k in exported)
    assert not all(exported[k].equal(last[k]) for k in exported)  # the last epoch differs

    weights = {
        "source": "best checkpoint",
        "checkpoint": f"checkpoints/{best.name}",
        "epoch": saved["epoch"],
        "global_step": saved["global_step"],
        "monitor": "val/acc",
        "score": pytest.approx(metrics["val/acc"]),
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights"] == weights
    with safe_open(str(run_dir / FILENAME), framework="pt") as f:
        assert json.loads(f.metadata()["weights"]) == weights
    # the summary's accuracies are the exported epoch's: val (test=false) is the best val/acc
    assert summary["split"] == ("test" if test else "val")
    if not test:
        assert summary["exits"][-1]["accuracy"] == pytest.approx(weights["score"])


def test_without_a_best_checkpoint_the_last_epoch_is_exported_and_named(tmp_path):
    run_dir = tmp_path / "run"
    no_checkpoints = ["callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null"]
    run(run_dir, "test=false", *no_checkpoints, "+trainer.enable_checkpointing=false")
    assert not (run_dir / "checkpoints").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights"] == {
        "source": "last epoch",
        "checkpoint": None,
        "epoch": EPOCHS - 1,
        "global_step": EPOCHS * 8,
    }
