"""Checkpoints that are corrupt, malicious, for another backbone, or half-written."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from met_lightning import checkpoint
from met_lightning.checkpoint import (
    FILENAME,
    SafeCheckpointIO,
    backbone_fingerprint,
    load_lightning_checkpoint,
    load_trainable,
    read_trainable,
    save_trainable,
    verify,
)
from met_lightning.checkpoint import FINGERPRINT_KEY as KEY
from met_lightning.checkpoint.tagged import write_tagged
from met_lightning.errors import CheckpointError
from met_lightning.models.backbone import create_backbone
from met_lightning.train import resolve_ckpt_path
from met_lightning.training.loggers import AtomicExperimentWriter
from tests.helpers import run_task


class Evil:
    """Unpickling this creates `marker`: code from the file would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _build(config):
    """The recorded backbone architecture with random weights from the current seed."""
    return create_backbone(
        config["backbone"]["name"], model_kwargs=config["backbone"]["model_kwargs"]
    )


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


def test_corrupt_malicious_and_foreign_checkpoints_are_refused(tiny_run, tmp_path):
    # a truncated last.ckpt (a crash of something else than met_lightning, a full disk)
    truncated = _copy(tiny_run, tmp_path / "truncated")
    ckpt = truncated / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    # a pickle with a payload in place of last.ckpt (below also given as ckpt_path)
    marker = tmp_path / "payload_ran"
    evil = _copy(tiny_run, tmp_path / "evil")
    payload = {"state_dict": {}, "epoch": 0, "x": Evil(str(marker))}
    torch.save(payload, evil / "checkpoints" / "last.ckpt")
    # the trainable checkpoint on a backbone with other weights (same architecture)
    _, config = read_trainable(tiny_run)
    other = tmp_path / "other_backbone.safetensors"
    torch.manual_seed(1234)
    backbone = _build(config)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, other)
    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")).save(image)
    predict = "met_lightning.predict"

    results = [  # in-process `python -m ...` runs (the entries' Hydra tasks)
        run_task([f"resume={truncated}"], truncated),  # the run folder of resume= itself
        run_task([f"resume={evil}"], evil),
        run_task([f"checkpoint={tiny_run}", f"input={image}", f"weights_file={other}"], tmp_path,
                 module=predict),
    ]  # fmt: skip
    for result in results:
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    truncated_r, evil_r, foreign_r = (r.stderr for r in results)
    assert "corrupt or truncated" in truncated_r and str(ckpt) in truncated_r
    assert "objects other than tensors" in evil_r and "run code" in evil_r
    assert not marker.exists()  # the payload never ran
    assert "is for another backbone" in foreign_r and "weights_file=" in foreign_r
    assert "sha256" in foreign_r
    # nothing of the original runs was touched
    assert (truncated / FILENAME).read_bytes() == (tiny_run / FILENAME).read_bytes()
    assert (truncated / "config.yaml").read_text() == (tiny_run / "config.yaml").read_text()

    # the same payload as ckpt_path= of a new run, and a corrupt trainable checkpoint
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        resolve_ckpt_path(str(evil / "checkpoints" / "last.ckpt"))
    assert not marker.exists()
    (evil / FILENAME).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_trainable(evil)


def test_trainable_checkpoint_records_and_checks_its_backbone(tiny_run, tmp_path, caplog):
    tensors, config = read_trainable(tiny_run)
    assert config[KEY]["name"] == config["backbone"]["name"]
    assert len(config[KEY]["sha256"]) == 64
    net, _ = load_trainable(tiny_run)  # the recorded backbone is rebuilt and matches
    torch.manual_seed(int(config["seed"]))
    rebuilt = _build(config)
    assert backbone_fingerprint(rebuilt, config["backbone"]["name"]) == config[KEY]

    # a checkpoint from before fingerprints: loads, with one warning
    old = {k: v for k, v in config.items() if k != KEY}
    save_trainable(net, tmp_path / FILENAME, old)
    with caplog.at_level(logging.WARNING):
        load_trainable(tmp_path)
    assert "records no backbone weights hash" in caplog.text

    # a tampered hash is a mismatch
    save_trainable(net, tmp_path / FILENAME, {**config, KEY: {**config[KEY], "sha256": "0" * 64}})
    with pytest.raises(CheckpointError, match="is for another backbone"):
        load_trainable(tmp_path)


def test_verify_runs_the_checks_of_load_without_building_the_network(
    tiny_run, tmp_path, monkeypatch
):
    def no_network(*args, **kwargs):
        raise AssertionError("verify built the network")

    _, config = read_trainable(tiny_run)
    net, _ = load_trainable(tiny_run)
    monkeypatch.setattr(checkpoint.trainable, "rebuild_network", no_network)
    assert verify(tiny_run) == config
    assert verify(tiny_run / FILENAME) == config

    with pytest.raises(CheckpointError, match="does not exist"):
        verify(tmp_path / "missing")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / FILENAME).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        verify(tmp_path / "corrupt")
    logits = write_tagged(tmp_path / "logits.safetensors", {"x": torch.zeros(1)}, "other/1", {})
    with pytest.raises(CheckpointError, match="expected 'met_lightning.trainable/1'"):
        verify(logits)
    no_config = write_tagged(tmp_path / FILENAME, {"x": torch.zeros(1)}, checkpoint.FORMAT, {})
    with pytest.raises(CheckpointError, match="no readable rebuild config"):
        verify(no_config)
    # the backbone check: a tampered hash, and the right checkpoint on other weights
    tampered = tmp_path / "tampered" / FILENAME
    save_trainable(net, tampered, {**config, KEY: {**config[KEY], "sha256": "0" * 64}})
    with pytest.raises(CheckpointError, match="is for another backbone"):
        verify(tampered)
    torch.manual_seed(1234)
    other = tmp_path / "other_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in _build(config).state_dict().items()}, other)
    with pytest.raises(CheckpointError, match="is for another backbone"):
        verify(tiny_run, weights_file=str(other))


@pytest.mark.parametrize("kind", ["lightning_ckpt", "metrics_csv", "trainable"])
def test_a_crash_while_writing_leaves_the_old_file_intact(tmp_path, monkeypatch, kind):
    """The rename is the last step: if anything fails before it, the old file stays whole."""
    if kind == "lightning_ckpt":
        path = tmp_path / "last.ckpt"
        io = SafeCheckpointIO()
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
        write = lambda: io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)  # noqa: E731
    elif kind == "metrics_csv":
        path = tmp_path / "metrics.csv"
        writer = AtomicExperimentWriter(str(tmp_path))
        writer.log_metrics({"a": 1.0}, step=0)
        writer.flush()
        writer.log_metrics({"a": 2.0}, step=1)
        write = writer.flush
    else:
        path = tmp_path / FILENAME
        net = torch.nn.Linear(2, 2)
        save_trainable(net, path, {"x": 1})
        write = lambda: save_trainable(net, path, {"x": 2})  # noqa: E731
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write()
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left
    if kind == "lightning_ckpt":
        assert torch.equal(load_lightning_checkpoint(path)["state_dict"]["w"], torch.zeros(3))


def test_a_truncated_lightning_checkpoint_never_loads(tmp_path):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100)}}, path)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_lightning_checkpoint(path)
