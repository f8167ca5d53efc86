"""Where the Hydra configs live, custom resolvers, and validation of a composed config.

`validate_config` runs before anything heavy (no weights, no data): unknown keys, wrong types and
impossible values fail here with a message that names the key and the fix.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from met_lightning.errors import ConfigError
from met_lightning.losses.graph import GRAPH_KINDS
from met_lightning.models.backbone import describe_backbone
from met_lightning.models.multi_exit_vit import check_adapter, check_exits

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"

TOP_LEVEL_KEYS = {
    "task_name", "seed", "ckpt_path", "test", "tags", "paths", "data", "backbone", "method",
    "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "optimized_metric",
}  # fmt: skip


def config_dir() -> str:
    """The `conf/` folder: the repository's in a source checkout, the wheel's copy otherwise."""
    repo_conf = PACKAGE_DIR.parent / "conf"
    if (repo_conf / "train.yaml").is_file():
        return str(repo_conf)
    return str(importlib.resources.files("met_lightning") / "conf")


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in met_lightning/assets (resolver `${met_asset:NAME}`)."""
    return str(ASSETS_DIR / name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("met_asset"):
        OmegaConf.register_new_resolver("met_asset", asset_path)


register_resolvers()


# ---------------------------------------------------------------------- schemas
@dataclass
class AdapterSchema:
    kind: str = "e_adapter"
    rank: int = 8
    exit_specific: bool = True
    separate_cls: bool = True
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    bits: int = 32
    scale: float | None = None


@dataclass
class LossSchema:
    exit_weights: list[float] | None = None
    graph: str = "label"
    graph_weight: float = 0.1
    teacher_knn: int = 4
    label_smoothing: float = 0.0


@dataclass
class ModelSchema:
    exits: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    finetune_backbone: bool = False
    adapter: AdapterSchema = field(default_factory=AdapterSchema)
    loss: LossSchema = field(default_factory=LossSchema)


@dataclass
class BackboneSchema:
    _target_: str = "met_lightning.models.backbone.create_backbone"
    name: str = "vit_base_patch16_224.orig_in21k"
    pretrained: bool = False
    weights_file: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _schema_fields(schema: type, path: list[str]) -> list[str]:
    """Field names of the (nested) dataclass that `path` points into."""
    for part in path:
        field_type = schema.__dataclass_fields__[part].type
        schema = field_type if isinstance(field_type, type) else globals()[field_type]
    return list(schema.__dataclass_fields__)


def _typed(cfg: DictConfig, key: str, schema: type) -> DictConfig:
    """cfg[key] resolved and merged into `schema`; unknown keys / wrong types raise ConfigError."""
    try:
        plain = OmegaConf.to_container(cfg[key], resolve=True)
        return OmegaConf.merge(OmegaConf.structured(schema), plain)
    except ConfigKeyError as err:
        parts = str(err.full_key).split(".")
        try:
            valid = ", ".join(_schema_fields(schema, parts[:-1]))
        except (KeyError, TypeError):
            valid = ", ".join(_schema_fields(schema, []))
        raise ConfigError(
            f"{key}.{err.full_key}: unknown key (valid keys there: {valid})"
        ) from None
    except OmegaConfBaseException as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        msg = getattr(err, "msg", str(err)).splitlines()[0]
        raise ConfigError(f"{full_key}: {msg}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    """Check a composed training config before anything is built; raise ConfigError if wrong."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL_KEYS)
    _require(
        not unknown,
        f"unknown top-level config key(s) {unknown}; valid keys: {sorted(TOP_LEVEL_KEYS)}",
    )
    model = _typed(cfg, "model", ModelSchema)
    backbone = _typed(cfg, "backbone", BackboneSchema)

    adapter, loss = model.adapter, model.loss
    check_adapter(
        adapter.kind,
        adapter.rank,
        adapter.exit_specific,
        adapter.separate_cls,
        list(adapter.sites),
        adapter.bits,
        adapter.scale,
    )
    _require(
        loss.graph in GRAPH_KINDS,
        f"model.loss.graph={loss.graph!r} must be one of {list(GRAPH_KINDS)}",
    )
    _require(
        loss.graph_weight >= 0,
        f"model.loss.graph_weight={loss.graph_weight} must be >= 0 (0 turns it off)",
    )
    _require(loss.teacher_knn >= 1, f"model.loss.teacher_knn={loss.teacher_knn} must be >= 1")
    _require(
        0.0 <= loss.label_smoothing < 1.0,
        f"model.loss.label_smoothing={loss.label_smoothing} must be in [0, 1)",
    )
    if loss.exit_weights is not None:
        weights = list(loss.exit_weights)
        _require(
            len(weights) == len(model.exits),
            f"model.loss.exit_weights has {len(weights)} values for {len(model.exits)} exits "
            f"(model.exits={list(model.exits)}); give one weight per exit or null",
        )
        _require(
            all(w >= 0 for w in weights) and sum(weights) > 0,
            f"model.loss.exit_weights={weights} must be >= 0 and not all 0",
        )

    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        value = data.get(key)
        _require(
            value is None or (isinstance(value, int) and value > 0),
            f"data.{key}={value} must be a positive integer",
        )
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    _require(
        max_epochs is None
        or (isinstance(max_epochs, int) and (max_epochs >= 1 or max_epochs == -1)),
        f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 with trainer.max_steps)",
    )
    _require(isinstance(cfg.get("seed"), int), f"seed={cfg.get('seed')!r} must be an integer")

    spec = describe_backbone(backbone.name, OmegaConf.to_container(backbone.model_kwargs))
    check_exits(list(model.exits), spec.depth)
