"""`InputSpec`: the backbone's input, known before it is built; read by data, checkpoints, apps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from timm.data import resolve_data_config

from met_lightning.models.backbone import meta_backbone


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects: (C, H, W), normalization and resize interpolation."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def from_timm(cls, model) -> InputSpec:  # noqa: ANN001 - a timm model
        """Normalization from a timm model's pretrained config; size from its patch embedding
        (the pretrained config keeps 224 when `img_size` is overridden)."""
        cfg = resolve_data_config({}, model=model)
        size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        return cls(tuple(size), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])

    @classmethod
    def from_backbone_config(cls, backbone_cfg: Mapping[str, Any]) -> InputSpec:
        """The spec of the backbone a `backbone` config (name, model_kwargs) builds, before it is
        built: a meta-device probe, no weights, no download (the weights do not change it)."""
        kwargs = backbone_cfg.get("model_kwargs") or {}
        return cls.from_timm(meta_backbone(str(backbone_cfg["name"]), dict(kwargs)))

    @classmethod
    def of(cls, value: InputSpec | Mapping[str, Any]) -> InputSpec:
        """`value` as an InputSpec: itself, or one from its fields (a checkpoint's, Hydra's)."""
        if isinstance(value, InputSpec):
            return value
        return cls(
            tuple(int(v) for v in value["input_size"]),
            tuple(float(v) for v in value["mean"]),
            tuple(float(v) for v in value["std"]),
            str(value.get("interpolation", "bicubic")),
        )
