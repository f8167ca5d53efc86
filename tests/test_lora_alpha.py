"""LoRA's scale follows HF peft: `model.net.adapter.alpha` (peft's `lora_alpha`, default 8) and
B A x scaled by alpha / rank; run folders written before the key existed load unchanged; a
backbone is LoRA-wrapped once."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from met_lightning.checkpoint import load_trainable, save_trainable
from met_lightning.config import validate_config
from met_lightning.errors import ConfigError
from met_lightning.models.adapters import LoRAQKV, add_lora
from met_lightning.models.multi_exit_vit import MultiExitViT
from met_lightning.spec import InputSpec
from tests.helpers import (
    TINY_BACKBONE,
    TINY_KWARGS,
    compose_config,
    legacy_model_config,
    tiny_backbone,
)

D, C = TINY_KWARGS["embed_dim"], 10
# peft (src/peft/tuners/lora/config.py, LoraConfig): `lora_alpha: int = 8`, and the adapter's
# scaling is `lora_alpha / r` (`lora_alpha / sqrt(r)` only with use_rslora=True)
PEFT_DEFAULT_LORA_ALPHA = 8


def peft_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int):
    """peft's LoRA output added to the base layer: (lora_alpha / r) * B A x."""
    return (alpha / r) * (x @ a.t() @ b.t())


def _lora_modules(net: torch.nn.Module) -> list[LoRAQKV]:
    return [m for m in net.modules() if isinstance(m, LoRAQKV)]


def _randomize_b(net: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in _lora_modules(net):
            for b in module.lora_b.values():
                b.normal_()


@pytest.mark.parametrize("rank, alpha", [(4, None), (8, None), (16, 32.0), (2, 1.0), (3, 8.0)])
def test_lora_delta_is_peft_alpha_over_r_times_b_a_x(rank, alpha):
    torch.manual_seed(0)
    net = MultiExitViT(
        tiny_backbone(), C, exits=[-1],
        adapter=dict(kind="lora", rank=rank, exit_specific=False, sites=["q", "v"], alpha=alpha),
    )  # fmt: skip
    _randomize_b(net)
    lora = net.backbone.blocks[0].attn.qkv
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        delta = lora(x) - lora.base(x)
    q, k, v = delta.split(D, dim=-1)
    expected_alpha = PEFT_DEFAULT_LORA_ALPHA if alpha is None else alpha
    for site, got in (("q", q), ("v", v)):
        want = peft_delta(x, lora.lora_a[site], lora.lora_b[site], expected_alpha, rank)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k, torch.zeros_like(k))
    assert all(m.scale == expected_alpha / rank for m in _lora_modules(net))


def _build(tmp_path, *overrides):
    cfg = compose_config(["method=lora", *TINY_BACKBONE, *overrides], tmp_path)
    validate_config(cfg)
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model.net)(backbone=tiny_backbone(), num_classes=C)


@pytest.mark.parametrize(
    "overrides, scale",
    [
        ([], 8 / 8),  # method=lora: rank 8, alpha 8 (peft's defaults)
        (["model.net.adapter.rank=4"], 8 / 4),  # alpha stays 8: scale 2, as in peft
        (["model.net.adapter.rank=4", "model.net.adapter.alpha=16"], 16 / 4),
        (["model.net.adapter.rank=16", "model.net.adapter.alpha=null"], 8 / 16),  # null = peft's 8
    ],
)
def test_config_alpha_sets_the_scale(overrides, scale, tmp_path):
    cfg, net = _build(tmp_path, *overrides)
    modules = _lora_modules(net)
    assert modules and all(m.scale == scale for m in modules)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.net.adapter.scale=2"], ["model.net.adapter.scale", "model.net.adapter.alpha=16"]),
        (
            ["model.net.adapter.rank=4", "model.net.adapter.scale=0.5"],
            ["model.net.adapter.scale", "model.net.adapter.alpha=2", "alpha / rank"],
        ),
        (["model.net.adapter.alpha=0"], ["model.net.adapter.alpha=0", "> 0"]),
        (
            ["method=met", "model.net.adapter.alpha=8"],
            ["model.net.adapter.alpha", "kind lora only"],
        ),
        (
            ["method=adapter", "model.net.adapter.alpha=8"],
            ["model.net.adapter.alpha", "kind lora only"],
        ),
    ],
)
def test_alpha_and_scale_config_errors(overrides, fragments, tmp_path):
    cfg = compose_config(["method=lora", *TINY_BACKBONE, *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert all(f in str(err.value) for f in fragments), str(err.value)


def _legacy_config(cfg, scale):
    """The config a run folder written before model.net.adapter.alpha records: no `alpha` key (and
    the `model` node of switches of that time)."""
    method, model = legacy_model_config(cfg)
    del model["adapter"]["alpha"]
    model["adapter"]["scale"] = scale
    return {
        "method": method, "model": model,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "num_classes": C,
        "input_spec": asdict(InputSpec.from_backbone_config(cfg.backbone)), "seed": 0,
    }  # fmt: skip


@pytest.mark.parametrize("scale", [1.0, None, 0.3])  # old lora.yaml, met.yaml + kind=lora, custom
def test_old_run_folders_keep_their_scale(scale, tmp_path):
    """Before `alpha`, LoRA multiplied B A x by model.net.adapter.scale (null: 1) whatever the rank:
    a trainable file without `alpha` rebuilds that network and predicts the same logits."""
    cfg, _ = _build(tmp_path, "model.net.adapter.rank=3", "model.net.exits=[-1]")
    config = _legacy_config(cfg, scale)
    old_scale = 1.0 if scale is None else scale
    torch.manual_seed(0)
    # what the old code built: B A x multiplied by the scale itself
    adapter = dict(kind="lora", rank=3, exit_specific=False, sites=["q", "v"])
    trained = MultiExitViT(tiny_backbone(), C, exits=[-1], adapter=adapter)
    for module in _lora_modules(trained):
        module.scale = old_scale
    _randomize_b(trained)
    trained.eval()
    save_trainable(trained, tmp_path / "trainable.safetensors", config)
    with torch.random.fork_rng():
        loaded, _ = load_trainable(tmp_path / "trainable.safetensors")
    assert all(m.scale == old_scale for m in _lora_modules(loaded))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, trained(images).logits)


def test_scale_and_alpha_together_are_rejected_in_python():
    with pytest.raises(ConfigError, match="model.net.adapter.alpha"):
        adapter = dict(kind="lora", rank=4, exit_specific=False, sites=["q"], alpha=8.0, scale=1.0)
        MultiExitViT(tiny_backbone(), C, exits=[-1], adapter=adapter)


# ---------------------------------------------------------------------- wrapping twice
def test_add_lora_twice_is_a_clear_error():
    backbone = tiny_backbone()
    add_lora(backbone.blocks, 4, ["q", "v"], 1.0)
    wrapped = [blk.attn.qkv for blk in backbone.blocks]
    with pytest.raises(ValueError, match="already wrapped in LoRAQKV"):
        add_lora(backbone.blocks, 4, ["q", "v"], 1.0)
    assert [blk.attn.qkv for blk in backbone.blocks] == wrapped  # left as it was


def test_second_lora_network_on_one_backbone_is_a_clear_error():
    backbone = tiny_backbone()
    kwargs = dict(exits=[-1], adapter=dict(kind="lora", rank=4, exit_specific=False, sites=["q"]))
    MultiExitViT(backbone, C, **kwargs)
    with pytest.raises(ValueError, match="fresh backbone"):
        MultiExitViT(backbone, C, **kwargs)


def test_lora_wraps_only_a_fused_linear():
    with pytest.raises(ValueError, match="fused qkv"):
        LoRAQKV(torch.nn.Linear(D, 2 * D), 4, ["q"], 1.0)
