"""A run folder and a checkpoint are data: nothing in them runs code, resolves an interpolation,
deletes or reads outside the run, or costs more than the file itself (issue 19, items 1-5, 12,
and the `.env` rule)."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from met_lightning.checkpoint import (
    FILENAME,
    SafeCheckpointIO,
    load_trainable,
    resume_argv,
    verify,
)
from met_lightning.checkpoint.tagged import read_tagged, write_tagged
from met_lightning.checkpoint.trainable import FORMAT
from met_lightning.errors import CheckpointError
from met_lightning.train import env_file
from tests.helpers import legacy_model_config, run_task
from tests.test_predict import write_digits

PREDICT = "met_lightning.predict"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def with_config(run: Path, dest: Path, change) -> Path:
    """A copy of `run` whose trainable.safetensors' recorded config is `change(config)`."""
    dest = copy_run(run, dest)
    tensors, metadata = read_tagged(dest, FILENAME, FORMAT, "checkpoint")
    config = json.loads(metadata["config"])
    metadata["config"] = json.dumps(change(config))
    write_tagged(dest / FILENAME, tensors, FORMAT, {k: v for k, v in metadata.items()
                                                    if k != "format"})  # fmt: skip
    return dest


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def predict_on(run: Path, tmp_path: Path, *extra: str):
    images = write_digits(tmp_path / "in", range(2))
    return run_task([f"checkpoint={run}", f"input={images}", *extra], tmp_path, module=PREDICT)


# ---------------------------------------------------------------------- item 1
def test_a_checkpoint_naming_files_outside_the_run_deletes_nothing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    crafted = str(run / "checkpoints" / ".." / ".." / "victim_dir")
    for state in checkpoint["callbacks"].values():
        state["best_model_path"] = crafted
        state["best_k_models"] = {crafted: torch.tensor(0.0)}
    torch.save(checkpoint, last)

    result = run_task([f"resume={run}"], run)
    assert "names files outside the run's checkpoint folders" in one_error_line(result)
    assert (victim / "precious.txt").read_text() == "keep me"

    # the same state loaded by a trainer (ckpt_path=, or past the check): the paths are dropped,
    # and the checkpoint IO never deletes outside its folders, nor a folder
    io = SafeCheckpointIO(confine=[str(run / "checkpoints")])
    for state in io.load_checkpoint(last)["callbacks"].values():
        assert state["best_model_path"] == "" and state["best_k_models"] == {}
    io.remove_checkpoint(crafted)
    (run / "checkpoints" / "sub").mkdir()
    io.remove_checkpoint(run / "checkpoints" / "sub")
    os.symlink(victim / "precious.txt", run / "checkpoints" / "link.ckpt")
    io.remove_checkpoint(run / "checkpoints" / "link.ckpt")
    assert (victim / "precious.txt").is_file() and (run / "checkpoints" / "sub").is_dir()
    io.remove_checkpoint(last)  # its own files still go
    assert not last.exists()


# ---------------------------------------------------------------------- item 2
class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "override",
    [
        "+callbacks.evil={_target_:torch.load,f:PICKLE,weights_only:false}",
        "++callbacks.evil={_target_:torch.load,f:PICKLE,weights_only:false}",
        "callbacks.model_checkpoint._target_=torch.load",
        "+callbacks.evil._target_=torch.load",
        "hydra.searchpath=[file:///tmp]",
        "paths.data_dir=${oc.env:HOME}",
        "+experiment=../../../tmp/evil",
        "data=/etc/passwd",
        "+x@_global_=a",
        "+trainer.plugins=[a]",
        "seed=1,2",
    ],
)
def test_resume_never_applies_a_run_folders_code_choosing_override(tiny_run, tmp_path, override):
    marker = tmp_path / "payload_ran"
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(Payload(str(marker))))
    run = copy_run(tiny_run, tmp_path / "run")
    recorded = (run / ".hydra" / "overrides.yaml").read_text()
    override = override.replace("PICKLE", str(evil_pickle))
    (run / ".hydra" / "overrides.yaml").write_text(recorded + f"- '{override}'\n")
    with pytest.raises(SystemExit):
        resume_argv_exit(run)
    result = run_task([f"resume={run}"], run)
    line = one_error_line(result)
    assert "overrides.yaml holds" in line and "never chooses code to run" in line
    assert not marker.exists()


def resume_argv_exit(run: Path) -> None:
    from met_lightning.cli import exit_on_user_error

    exit_on_user_error(lambda: resume_argv(["met", f"resume={run}"]))


def test_resume_still_applies_plain_and_group_overrides(tmp_path):
    (tmp_path / ".hydra").mkdir()
    saved = ["+experiment=demo", "debug=fast", "model.net.exits=[2,4]", "~callbacks.progress_bar",
             "paths.log_dir=/tmp/some folder", "backbone.model_kwargs={depth: 4}",
             "++backbone.model_kwargs={img_size: 64}"]  # fmt: skip
    (tmp_path / ".hydra" / "overrides.yaml").write_text(json.dumps(saved))
    argv = resume_argv(["met", f"resume={tmp_path}"])
    assert argv[1 : 1 + len(saved)] == saved


# ---------------------------------------------------------------------- item 3
def test_recorded_interpolations_are_never_resolved(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MET_SECRET", "hunter2-secret")

    def interpolated(config):
        config["backbone"]["name"] = "${oc.env:MET_SECRET}"
        return config

    run = with_config(tiny_run, tmp_path / "a", interpolated)
    with pytest.raises(CheckpointError, match=r"interpolation .* in backbone\.name") as err:
        load_trainable(run)
    assert "hunter2" not in str(err.value)
    line = one_error_line(predict_on(run, tmp_path / "p"))
    assert "hunter2" not in line and "interpolation" in line


@pytest.mark.parametrize("interpolate", [True, False])
def test_recorded_model_kwargs_cannot_reach_timms_downloads(
    tiny_run, tmp_path, monkeypatch, interpolate
):
    monkeypatch.setenv("MET_SECRET", "hunter2-secret")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        name = "${oc.env:MET_SECRET}" if interpolate else "weights"

        def overlay(config):
            config["backbone"]["pretrained"] = True
            config["backbone"]["model_kwargs"]["pretrained_cfg_overlay"] = {
                "url": f"http://127.0.0.1:{port}/{name}.pth", "hf_hub_id": None,
            }  # fmt: skip
            return config

        run = with_config(tiny_run, tmp_path / "run", overlay)
        with pytest.raises(CheckpointError, match="interpolation|pretrained_cfg_overlay"):
            load_trainable(run)
        with pytest.raises(CheckpointError):
            verify(run)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected

    def hub_source(config):
        config["backbone"]["name"] = "hf-hub:someone/model"
        return config

    with pytest.raises(CheckpointError, match="not a timm model name"):
        load_trainable(with_config(tiny_run, tmp_path / "hub", hub_source))


# ---------------------------------------------------------------------- item 4
def test_recorded_sizes_are_checked_against_the_header_before_building(tiny_run, tmp_path):
    def huge(config):
        config["model"]["net"]["adapter"]["rank"] = 400_000
        return config

    run = with_config(tiny_run, tmp_path / "run", huge)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="has shape"):
        load_trainable(run)
    seconds = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert seconds < 5 and grown_mib < 100, (seconds, grown_mib)

    def wide_input(config):
        config["input_spec"]["input_size"] = [3, 100_000, 100_000]
        return config

    with pytest.raises(CheckpointError, match="input_size"):
        load_trainable(with_config(tiny_run, tmp_path / "wide", wide_input))


# ---------------------------------------------------------------------- item 5
def _short_names(config):
    config["class_names"] = config["class_names"][:3]
    return config


def _ten(config):
    config["num_classes"] = "ten"
    return config


def _legacy_missing_keys(config):
    config["model"] = {"exits": config["model"]["net"]["exits"]}  # no adapter, no switches
    config["method"] = {"name": "met"}
    return config


@pytest.mark.parametrize(
    "change, words",
    [
        (_short_names, "class_names (3) that are not 10 strings"),
        (_ten, "num_classes='ten'"),
        (_legacy_missing_keys, "does not build a network"),
    ],
)
def test_malformed_recorded_configs_are_one_error_line(tiny_run, tmp_path, change, words):
    run = with_config(tiny_run, tmp_path / "run", change)
    assert words in one_error_line(predict_on(run, tmp_path / "p"))


def test_the_legacy_shape_still_loads(tiny_run, tmp_path):
    from omegaconf import OmegaConf

    def legacy(config):
        method, model = legacy_model_config(OmegaConf.create({"model": config["model"]}))
        return {**config, "method": method, "model": model}

    net, _ = load_trainable(with_config(tiny_run, tmp_path / "run", legacy))
    reference, _ = load_trainable(tiny_run)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(net(images).logits, reference(images).logits)


# ---------------------------------------------------------------------- item 12
def test_file_names_with_markup_print_as_they_are_and_the_csv_is_written(
    tiny_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "400")  # whole paths in the table
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")
    (folder / "x[").mkdir()  # the path .../x[/bold].png closes a tag that was never opened
    for name in ("IMG[copy].png", "x[/bold].png", "[bold red]y.png"):
        Image.fromarray(pixels, "L").save(folder / name)
    out = tmp_path / "rows.csv"
    result = run_task([f"checkpoint={tiny_run}", f"input={folder}", f"output={out}"],
                      tmp_path, module=PREDICT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.replace("\n", "")
    for name in ("IMG[copy].png", "x[/bold].png", "[bold red]y.png"):
        assert name in printed
    assert len(out.read_text().splitlines()) == 4


# ---------------------------------------------------------------------- .env
def test_only_the_working_directorys_own_env_file_is_loaded(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MET_FROM_PARENT=1\n")
    child = tmp_path / "child"
    child.mkdir()
    monkeypatch.chdir(child)
    found = env_file()
    assert found is None or found != tmp_path / ".env"
    (child / ".env").write_text("MET_OWN=1\n")
    assert env_file() == child / ".env"
