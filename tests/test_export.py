"""ONNX export (one graph per exit stage) and the ONNX Runtime early-exit runner."""

import json

import numpy as np
import pytest

from met_lightning.checkpoint import load_trainable
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.macs import model_exit_costs
from tests.helpers import entry_config, run_split

pytest.importorskip("onnxruntime")
from met_lightning.export.__main__ import export  # noqa: E402
from met_lightning.export.ort_runner import OrtEarlyExit  # noqa: E402


def export_cfg(**values):
    return entry_config("export", **values)


def split_images(run, split):
    """The images [N, C, H, W] of a run's split (as its datamodule loads them)."""
    return run_split(run, split)[0]


def assert_same_as_engine(net, runner, images, thresholds):
    expected = EarlyExitEngine(net, thresholds, runner.kind)(images)
    got = runner(images.numpy())
    assert np.array_equal(got.exit_index, expected.exit_index.numpy())
    assert np.array_equal(got.predictions, expected.predictions.numpy())
    np.testing.assert_allclose(got.logits, expected.logits.numpy(), atol=1e-4, rtol=0)
    return got


def test_onnx_stages_reproduce_the_engine(tiny_run, tmp_path):
    out = tmp_path / "onnx"
    manifest = export(export_cfg(checkpoint=str(tiny_run), out=str(out)))
    net, _ = load_trainable(tiny_run)
    net.eval()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert [s["file"] for s in on_disk["stages"]] == ["stage_0.onnx", "stage_1.onnx"]
    assert all((out / s["file"]).is_file() for s in on_disk["stages"])
    assert on_disk["exits"] == [2, 4]
    assert on_disk["macs_per_exit"] == list(model_exit_costs(net).to_exit)
    stage0, stage1 = on_disk["stages"]
    assert stage0["inputs"] == {"images": [None, 3, 32, 32]}
    assert stage0["outputs"]["tokens_out"] == stage1["inputs"]["tokens"]  # the early c_1 left
    assert stage0["outputs"]["tokens_out"][1] == 17 and stage1["outputs"] == {"logits": [None, 10]}
    report = json.loads((tiny_run / "budget.json").read_text())
    assert [b["budget"] for b in on_disk["budgets"]] == [b["budget"] for b in report["budgets"]]

    images = split_images(tiny_run, "val")
    for budget in on_disk["budgets"]:
        runner = OrtEarlyExit(out, budget=budget["budget"])
        assert_same_as_engine(net, runner, images, runner.thresholds)
    first = np.sort(OrtEarlyExit(out, thresholds=[0.0])(images.numpy()).confidence)
    median = float(first[len(first) // 2 - 1] + first[len(first) // 2]) / 2  # between two images
    got = assert_same_as_engine(net, OrtEarlyExit(out, thresholds=[median]), images, [median])
    assert set(got.exit_index.tolist()) == {0, 1}  # both exits answer
    assert set(OrtEarlyExit(out)(images[:5].numpy()).exit_index.tolist()) == {1}  # no early exit

    with pytest.raises(ConfigError, match="not one of the exported run's budgets"):
        OrtEarlyExit(out, budget=0.123)
    with pytest.raises(CheckpointError, match="manifest.json does not exist"):
        OrtEarlyExit(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        export(export_cfg(checkpoint=str(tmp_path / "nope"), out=str(out)))
    with pytest.raises(ConfigError, match="format=tflite"):
        export(export_cfg(checkpoint=str(tiny_run), out=str(out), format="tflite"))


@pytest.mark.demo
def test_onnx_runner_equals_the_engine_on_the_demo_test_split(demo_run, tmp_path):
    _, folder = demo_run
    out = tmp_path / "onnx"
    manifest = export(export_cfg(checkpoint=str(folder), out=str(out)))
    assert len(manifest["stages"]) == len(manifest["exits"]) and manifest["class_names"]
    net, _ = load_trainable(folder)
    net.eval()
    images = split_images(folder, "test")
    budget = min(manifest["budgets"], key=lambda b: abs(b["budget"] - 0.5))["budget"]
    runner = OrtEarlyExit(out, budget=budget)
    got = assert_same_as_engine(net, runner, images, runner.thresholds)
    assert len(set(got.exit_index.tolist())) > 1
