"""Build the backbone, network and loss from config (shared by training, export and loading)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from met_lightning.losses.multi_exit import MultiExitLoss
from met_lightning.models.multi_exit_vit import MultiExitViT


def as_config(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def build_backbone(backbone_cfg: Any) -> nn.Module:
    """The frozen timm ViT described by the `backbone` group."""
    return instantiate(as_config(backbone_cfg))


def build_network(
    method_cfg: Any, model_cfg: Any, backbone: nn.Module, num_classes: int
) -> nn.Module:
    """The method's network around `backbone`: `method.build` if given (a partial taking
    backbone, num_classes, model), else a MultiExitViT from the `model` group (every built-in
    method is one, with different adapters and exits)."""
    build_cfg = as_config(method_cfg).get("build")
    build = MultiExitViT.from_config if build_cfg is None else instantiate(build_cfg)
    return build(backbone=backbone, num_classes=num_classes, model=as_config(model_cfg))


def build_loss(model_cfg: Any, num_exits: int) -> MultiExitLoss:
    """The training objective from `model.loss`."""
    loss = as_config(model_cfg).loss
    return MultiExitLoss(
        num_exits=num_exits,
        exit_weights=None if loss.exit_weights is None else list(loss.exit_weights),
        graph=loss.graph,
        graph_weight=loss.graph_weight,
        teacher_knn=loss.teacher_knn,
        label_smoothing=loss.label_smoothing,
    )
