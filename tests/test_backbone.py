"""Backbone: local weight files, clear errors for bad names, bad files and the offline hub."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from met_lightning.errors import BackboneError
from met_lightning.models.backbone import create_backbone, describe_backbone
from tests.helpers import TINY_KWARGS, TINY_NAME


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


def save_google_npz(model, path):
    """Write a timm ViT in the original Google ViT .npz layout (e.g. ViT-B_16.npz)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads

    def n(t):
        return t.detach().numpy()

    w = {
        "embedding/kernel": n(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": n(model.patch_embed.proj.bias),
        "cls": n(model.cls_token),
        "Transformer/posembed_input/pos_embedding": n(model.pos_embed),
        "Transformer/encoder_norm/scale": n(model.norm.weight),
        "Transformer/encoder_norm/bias": n(model.norm.bias),
    }
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[p + f"{ln}/scale"], w[p + f"{ln}/bias"] = n(norm.weight), n(norm.bias)
        weights, biases = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), weights, biases, strict=True):
            w[mha + f"{name}/kernel"] = n(weight.T.reshape(d, heads, d // heads))
            w[mha + f"{name}/bias"] = n(bias.reshape(heads, d // heads))
        out = blk.attn.proj.weight.reshape(d, heads, d // heads)
        w[mha + "out/kernel"] = n(out.permute(1, 2, 0))
        w[mha + "out/bias"] = n(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = n(fc.weight.T)
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = n(fc.bias)
    np.savez(path, **w)


def test_local_weights_file_google_npz(tmp_path, source):
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(std=0.1)  # distinct values everywhere, so a mix-up would show
    path = tmp_path / "ViT-Ti_8.npz"
    save_google_npz(source, path)
    loaded = create_backbone(TINY_NAME, weights_file=str(path), model_kwargs=TINY_KWARGS)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


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
