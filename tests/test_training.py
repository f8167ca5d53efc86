"""Training through the real `train()`: frozen weights untouched, artifacts complete, reload."""

import json

import pytest
import torch
from safetensors.torch import load_file

import met_lightning.train as train_module
from met_lightning.checkpoint import load_trainable, read_trainable
from met_lightning.errors import CheckpointError
from tests.helpers import TINY_OVERRIDES, compose_config

FAST = [
    *TINY_OVERRIDES,
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run; yields (output_dir, metrics, backbone before, backbone after)."""
    output_dir = tmp_path_factory.mktemp("run")
    captured = {}
    instantiate_model = train_module.instantiate_model
    build_datamodule = train_module.build_datamodule

    def capture_data(data_cfg, input_spec):  # before the backbone exists
        assert "backbone" not in captured
        captured["spec"] = input_spec
        captured["datamodule"] = build_datamodule(data_cfg, input_spec)
        return captured["datamodule"]

    def capture(model, backbone, num_classes):  # the backbone as train() built it, and the net
        captured["before"] = {k: v.clone() for k, v in backbone.state_dict().items()}
        captured["backbone"] = backbone
        module = instantiate_model(model, backbone, num_classes)
        captured["net"] = module.net
        return module

    train_module.instantiate_model, train_module.build_datamodule = capture, capture_data
    try:
        metrics = train_module.train(compose_config(FAST, output_dir))
    finally:
        train_module.instantiate_model = instantiate_model
        train_module.build_datamodule = build_datamodule
    return output_dir, metrics, captured


def test_frozen_backbone_bit_identical_after_training(trained):
    _, _, captured = trained
    after = captured["backbone"].state_dict()
    assert set(after) == set(captured["before"])
    for key, value in captured["before"].items():
        assert torch.equal(after[key], value), f"frozen weight {key} changed"


def test_run_folder_artifacts(trained):
    output_dir, metrics, _ = trained
    for name in (
        "config.yaml",
        "metrics.csv",
        "trainable.safetensors",
        "summary.json",
        "checkpoints/last.ckpt",
    ):
        assert (output_dir / name).is_file(), name
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["split"] == "test" and [e["block"] for e in summary["exits"]] == [2, 4]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in summary["exits"])
    assert summary["exits"][0]["macs"] < summary["exits"][1]["macs"]
    header = (output_dir / "metrics.csv").read_text().splitlines()[0]
    for key in (
        "val/acc",
        "val/acc_exit1",
        "val/acc_exit2",
        "train/acc_exit1",
        "test/acc_exit2",
        "params/trainable",
        "train/graph_exit1",
    ):
        assert key in header, key
    assert metrics["test/acc"] == pytest.approx(metrics["test/acc_exit2"])


def test_input_spec_given_to_the_datamodule_at_construction_is_the_backbones(trained):
    """train() resolves the spec from the backbone config before building anything; the
    DataModule gets it at construction, and it is what the built backbone expects and what the
    trainable checkpoint records for predict / export."""
    from dataclasses import asdict

    from met_lightning.data.base import InputSpec

    output_dir, _, captured = trained
    spec = captured["spec"]
    assert captured["datamodule"].input_spec == spec
    assert InputSpec.from_timm(captured["backbone"]) == spec
    _, config = read_trainable(output_dir / "trainable.safetensors")
    assert config["input_spec"] == json.loads(json.dumps(asdict(spec)))


def test_lightning_checkpoint_holds_trainable_params_only(trained):
    output_dir, _, captured = trained
    ckpt = torch.load(output_dir / "checkpoints/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and not any(k.startswith("net.backbone.") for k in keys)
    tensors, _ = read_trainable(output_dir / "trainable.safetensors")
    assert {f"net.{k}" for k in tensors} == keys


def test_trainable_checkpoint_rebuilds_same_predictions(trained):
    output_dir, _, captured = trained
    net, config = load_trainable(output_dir)
    assert config["num_classes"] == 10 and config["model"]["net"]["exits"] == [2, 4]
    tensors = load_file(str(output_dir / "trainable.safetensors"))
    for name, value in net.trainable_state_dict().items():
        assert torch.equal(value, tensors[name])
    # the tiny test backbone has random weights: give the rebuilt one the trained run's weights
    net.backbone.load_state_dict(captured["before"])
    trained_net = captured["net"].eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(images).logits, trained_net(images).logits)


def test_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_trainable(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_trainable(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a met_lightning"):
        read_trainable(foreign)
