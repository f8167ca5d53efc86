"""Backbone: local weight files, clear errors for bad names, bad files and the offline hub."""

import time

import pytest
import torch
from safetensors.torch import save_file

from met_lightning.errors import BackboneError
from met_lightning.models.backbone import create_backbone, describe_backbone
from tests.conftest import TINY_KWARGS, TINY_NAME


@pytest.fixture
def source():
    return create_backbone(TINY_NAME, model_kwargs=TINY_KWARGS)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file(tmp_path, source, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = create_backbone(TINY_NAME, weights_file=str(path), model_kwargs=TINY_KWARGS)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="backbone.weights_file=.*does not exist"):
        create_backbone(
            TINY_NAME, weights_file=str(tmp_path / "nope.pth"), model_kwargs=TINY_KWARGS
        )


def test_weights_file_of_another_architecture(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="could not be loaded into"):
        create_backbone(
            TINY_NAME, weights_file=str(path), model_kwargs={**TINY_KWARGS, "embed_dim": 64}
        )


def test_unknown_model_name():
    with pytest.raises(BackboneError, match="not a timm model"):
        describe_backbone("vit_does_not_exist")


def test_not_a_vit():
    with pytest.raises(BackboneError, match="not a timm VisionTransformer"):
        describe_backbone("resnet18")


def test_hub_weights_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    start = time.monotonic()
    with pytest.raises(BackboneError) as info:
        create_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "backbone.weights_file=" in message and "backbone.pretrained=false" in message


def test_describe_matches_built_model(source):
    spec = describe_backbone(TINY_NAME, TINY_KWARGS)
    assert (spec.depth, spec.embed_dim, spec.num_patches, spec.num_prefix_tokens) == (4, 48, 16, 1)
