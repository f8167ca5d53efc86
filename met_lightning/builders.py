"""Rebuild the network of a trainable checkpoint from the config it recorded (`load_trainable`).

A checkpoint's config is data, not code: only the networks of `NETWORKS` and the backbones of
`BACKBONES` are built from it, from plain values; the backbone's timm name is a plain model name
(no `hf-hub:` / `local-dir:` source) and its `model_kwargs` only VisionTransformer's architecture
arguments (`ARCHITECTURE_KEYS`): nothing recorded reaches timm's download or file options.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from met_lightning.errors import CheckpointError
from met_lightning.models.backbone import create_backbone, freeze, meta_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT

# model.net._target_ -> the class a recorded `model.net` rebuilds
NETWORKS: dict[str, type[nn.Module]] = {
    "met_lightning.models.multi_exit_vit.MultiExitViT": MultiExitViT,
}
# backbone._target_ -> the function a recorded `backbone` config is built with
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "met_lightning.models.backbone.create_backbone": create_backbone,
}


# VisionTransformer arguments a recorded backbone may set: plain architecture values (its
# layer-class arguments take code, and timm.create_model's own options, e.g.
# pretrained_cfg_overlay or checkpoint_path, name files and URLs)
ARCHITECTURE_KEYS = frozenset(
    name
    for name, param in inspect.signature(VisionTransformer.__init__).parameters.items()
    if name not in ("self", "device", "dtype") and not name.endswith(("_layer", "_fn"))
)
# a timm model name with an optional pretrained tag (vit_base_patch16_224.orig_in21k)
MODEL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
BACKBONE_KEYS = ("_target_", "name", "pretrained", "weights_file", "model_kwargs")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def build_backbone(backbone_cfg: Mapping[str, Any], meta: bool = False) -> nn.Module:
    """The frozen timm ViT a recorded `backbone` config describes (CheckpointError for anything a
    checkpoint may not set); `meta`: its architecture on the meta device (no weights read,
    nothing allocated)."""
    config = dict(backbone_cfg)
    target = config.pop("_target_", None)
    if target not in BACKBONES:
        raise CheckpointError(
            f"the checkpoint's backbone._target_={target!r} is not one of {sorted(BACKBONES)}"
        )
    if unknown := sorted(set(config) - set(BACKBONE_KEYS)):
        raise CheckpointError(f"the checkpoint's backbone has unknown keys {unknown[:5]}")
    name = config.get("name")
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise CheckpointError(
            f"the checkpoint's backbone.name={str(name)[:80]!r} is not a timm model name"
        )
    if not isinstance(config.get("pretrained", False), bool) or not isinstance(
        config.get("weights_file"), (str, type(None))
    ):
        raise CheckpointError(
            "the checkpoint's backbone.pretrained / weights_file have wrong types"
        )
    kwargs = config.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise CheckpointError("the checkpoint's backbone.model_kwargs is not a mapping")
    refused = sorted(k for k, v in kwargs.items() if k not in ARCHITECTURE_KEYS or not _plain(v))
    if refused:
        raise CheckpointError(
            f"the checkpoint's backbone.model_kwargs sets {refused[:5]}, which a checkpoint may "
            "not set (only architecture values of timm's VisionTransformer)"
        )
    kwargs = config["model_kwargs"] = dict(kwargs)
    if meta:
        return freeze(meta_backbone(name, kwargs))
    return BACKBONES[target](**config)


def rebuild_network(config: Mapping[str, Any], backbone: nn.Module) -> nn.Module:
    """The network a checkpoint's config (today's shape: `checkpoint.migrate`) describes, around
    `backbone`: `config["model"]["net"]`, its `_target_` (one of `NETWORKS`) and arguments."""
    net, num_classes = config["model"]["net"], int(config["num_classes"])
    target = net.get("_target_")
    if target not in NETWORKS:
        raise CheckpointError(
            f"the checkpoint's network model.net._target_={target!r} is not one of "
            f"{sorted(NETWORKS)}"
        )
    kwargs = {k: v for k, v in net.items() if not k.startswith("_")}
    return NETWORKS[target](backbone=backbone, num_classes=num_classes, **kwargs)


def meta_network(config: Mapping[str, Any]) -> nn.Module:
    """The network `config` describes, on the meta device: its shapes at no memory cost."""
    with torch.device("meta"):
        return rebuild_network(config, build_backbone(config["backbone"], meta=True))
