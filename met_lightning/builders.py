"""Rebuild the network of a trainable checkpoint from the config it recorded (`load_trainable`).

Training instantiates the `_target_`s of the `model` node (conf/method/*.yaml). A checkpoint's
config is data, not code: only the networks of `NETWORKS` are built from it, from plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from met_lightning.errors import CheckpointError
from met_lightning.models.backbone import create_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT

# model.net._target_ -> the class a recorded `model.net` rebuilds
NETWORKS: dict[str, type[nn.Module]] = {
    "met_lightning.models.multi_exit_vit.MultiExitViT": MultiExitViT,
}
# backbone._target_ -> the function a recorded `backbone` config is built with
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "met_lightning.models.backbone.create_backbone": create_backbone,
}


def as_config(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def build_backbone(backbone_cfg: Any) -> nn.Module:
    """The frozen timm ViT described by a recorded `backbone` config (only the functions of
    `BACKBONES`: a checkpoint must not name code to run)."""
    config = OmegaConf.to_container(as_config(backbone_cfg), resolve=True)
    target = config.pop("_target_", None)
    if target not in BACKBONES:
        raise CheckpointError(
            f"the checkpoint's backbone._target_={target!r} is not one of {sorted(BACKBONES)}"
        )
    return BACKBONES[target](**{k: v for k, v in config.items() if not k.startswith("_")})


def rebuild_network(config: Mapping[str, Any], backbone: nn.Module) -> nn.Module:
    """The network a checkpoint's config describes, around `backbone`.

    `config["model"]` is the `model` node: with `net` (its `_target_` and arguments, written since
    the node names its targets), or the method's switches only (exits, adapter.*,
    finetune_backbone: earlier files, which also hold `method`), read by `MultiExitViT.from_config`.
    """
    model, num_classes = config["model"], int(config["num_classes"])
    net = model.get("net")
    if net is None:
        return MultiExitViT.from_config(backbone, num_classes, as_config(model))
    target = net.get("_target_")
    if target not in NETWORKS:
        raise CheckpointError(
            f"the checkpoint's network model.net._target_={target!r} is not one of "
            f"{sorted(NETWORKS)}"
        )
    kwargs = {k: v for k, v in net.items() if not k.startswith("_")}
    return NETWORKS[target](backbone=backbone, num_classes=num_classes, **kwargs)
