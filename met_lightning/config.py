"""Validation of a composed config (the config files and their resolver: `paths`).

`validate_config` runs before anything heavy (no weights, no data): unknown keys, wrong types and
impossible values fail here with a message that names the key and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from met_lightning.errors import ConfigError
from met_lightning.losses.graph import GRAPH_KINDS
from met_lightning.models.backbone import describe_backbone
from met_lightning.models.multi_exit_vit import (
    check_adapter,
    check_exits,
    check_token_layout,
    lora_scale_message,
)
from met_lightning.paths import check_writable

TOP_LEVEL_KEYS = {
    "task_name", "seed", "ckpt_path", "test", "tags", "paths", "data", "backbone", "model",
    "optimizer", "scheduler", "trainer", "callbacks", "logger", "optimized_metric", "resume",
}  # fmt: skip
# Keys of the `model` node (conf/method/*.yaml) that are the method's switches, not arguments of
# its LightningModule (`model._target_`): `model.net` reads them through ${..key} and `name` labels
# the run; `train.instantiate_model` leaves them out of the module's instantiation.
METHOD_KEYS = ("name", "exits", "finetune_backbone", "adapter", "token_layout")


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
    alpha: float | None = None


@dataclass
class LossSchema:
    _target_: str = "met_lightning.losses.multi_exit.MultiExitLoss"
    _partial_: bool = True
    exit_weights: list[float] | None = None
    graph: str = "label"
    graph_weight: float = 0.1
    teacher_knn: int = 4
    label_smoothing: float = 0.0


@dataclass
class ModelSchema:
    _target_: str = "met_lightning.training.module.MultiExitClassifier"
    name: str = "met"
    exits: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    finetune_backbone: bool = False
    adapter: AdapterSchema = field(default_factory=AdapterSchema)
    token_layout: str = "auto"
    # `_target_` nodes, checked against their targets' signatures (`check_targets`)
    net: Any = None
    loss: LossSchema = field(default_factory=LossSchema)
    optimizer: Any = None
    scheduler: Any = None
    compile: bool = False
    compile_mode: str | None = None


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
    check_adapter(**OmegaConf.to_container(adapter))  # AdapterSchema: check_adapter's arguments
    check_token_layout(model.token_layout)
    if adapter.kind == "lora" and adapter.scale is not None:  # LoRA's is alpha / rank
        raise ConfigError(lora_scale_message(adapter.scale, adapter.rank))
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
            value is None or (type(value) is int and value > 0),
            f"data.{key}={value} must be a positive integer",
        )
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    _require(
        max_epochs is None
        or (isinstance(max_epochs, int) and (max_epochs >= 1 or max_epochs == -1)),
        f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 with trainer.max_steps)",
    )
    _require(isinstance(cfg.get("seed"), int), f"seed={cfg.get('seed')!r} must be an integer")
    check_targets(cfg)  # data / trainer / optimizer / ... keys: unknown names, strings for numbers
    check_output_dir(cfg)

    spec = describe_backbone(backbone.name, OmegaConf.to_container(backbone.model_kwargs))
    check_exits(list(model.exits), spec.depth)


# ---------------------------------------------------------------------- instantiated groups
# Config groups instantiated with Hydra: one `_target_` node (False) or a dict of them (True).
TARGET_GROUPS = {
    "model.net": False,
    "model.loss": False,
    "data": False,
    "trainer": False,
    "optimizer": False,
    "scheduler": False,
    "callbacks": True,
    "logger": True,
}
# How many valid keys an "unknown key" message lists.
SHOWN_KEYS = 16


def check_targets(cfg: DictConfig) -> None:
    """Check the `_target_` nodes of the groups in `TARGET_GROUPS` against their targets'
    signatures, before anything is instantiated (see `check_target_node`)."""
    for group, is_dict in TARGET_GROUPS.items():
        node = OmegaConf.select(cfg, group)
        if not isinstance(node, DictConfig):
            continue
        items = node.items() if is_dict else [(None, node)]
        for name, item in items:
            if isinstance(item, DictConfig) and "_target_" in item:
                check_target_node(item, group if name is None else f"{group}.{name}")
    model = cfg.get("model")
    if isinstance(model, DictConfig) and "_target_" in model:  # the LightningModule's own keys
        check_target_node(model, "model", skip=METHOD_KEYS)


def check_target_node(node: DictConfig, key: str, skip: tuple[str, ...] = ()) -> None:
    """ConfigError for a key of `node` that its `_target_` does not take (unless it takes
    **kwargs), or a string given for an argument that takes only numbers / booleans. Keys in
    `skip` are not the target's (METHOD_KEYS of the `model` node)."""
    target = str(node["_target_"])
    try:
        obj = get_object(target)
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError, ...
        raise ConfigError(
            f"{key}._target_={target!r} cannot be imported ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    params, open_kwargs = _target_parameters(obj)
    if params is None:  # no signature to check against
        return
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:  # an interpolation Hydra reports when it instantiates
        return
    for name, value in values.items():
        if name.startswith("_") or name in skip:
            continue
        if name not in params:
            if open_kwargs:
                continue
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean {key}.{close[0]}? " if close else ""
            valid = sorted(params)
            listed = ", ".join(valid[:SHOWN_KEYS]) + (", ..." if len(valid) > SHOWN_KEYS else "")
            raise ConfigError(
                f"{key}.{name}: unknown key; {hint}({target.rsplit('.', 1)[-1]} takes: {listed})"
            )
        if isinstance(value, str):
            wanted = _non_string_kind(params[name].annotation)
            if wanted:
                raise ConfigError(f"{key}.{name}={value!r} must be {wanted}, not a string")
        if params[name].annotation in (bool, "bool") and not isinstance(value, bool):
            raise ConfigError(f"{key}.{name}={value!r} must be true or false")


def _target_parameters(obj: Any) -> tuple[dict[str, Any] | None, bool]:
    """(named parameters that `obj(...)` accepts, whether it also takes arbitrary keywords).

    A class: its `__init__` and the `__init__`s that it passes `**kwargs` on to (the MRO); None
    if a signature cannot be read.
    """

    def signature(fn: Any) -> inspect.Signature | None:
        for eval_str in (True, False):
            try:
                return inspect.signature(fn, eval_str=eval_str)
            except (NameError, TypeError, ValueError, AttributeError, SyntaxError):
                continue
        return None

    functions = (
        [
            k.__dict__["__init__"]
            for k in obj.__mro__
            if k is not object and "__init__" in k.__dict__
        ]
        if inspect.isclass(obj)
        else [obj]
    )
    if not functions:
        return None, True
    params: dict[str, Any] = {}
    for fn in functions:
        sig = signature(fn)
        if sig is None:
            return None, True
        takes_kwargs = False
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                takes_kwargs = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
                params.setdefault(name, param)
        if not takes_kwargs:
            return params, False
    return params, True  # every one passes **kwargs on


def _non_string_kind(annotation: Any) -> str | None:
    """'an integer' / 'a number' / 'true or false' (+ ' or null') if `annotation` admits only
    such values; None if it admits a string or cannot be told."""
    origin = typing.get_origin(annotation)
    members = (
        typing.get_args(annotation)
        if origin is typing.Union or origin is types.UnionType
        else (annotation,)
    )
    kinds = set()
    for member in members:
        if member is type(None):
            kinds.add("null")
        elif typing.get_origin(member) is typing.Literal:
            if any(isinstance(v, str) for v in typing.get_args(member)):
                return None
            kinds.add("a number")
        elif member is bool:
            kinds.add("true or false")
        elif member is int:
            kinds.add("an integer")
        elif member is float or _is_tensor_type(member):
            kinds.add("a number")
        else:
            return None
    named = [k for k in ("an integer", "a number", "true or false") if k in kinds]
    if not named:
        return None
    if "an integer" in named and "a number" in named:
        named.remove("an integer")
    return " or ".join(named + (["null"] if "null" in kinds else []))


def _is_tensor_type(member: Any) -> bool:
    return isinstance(member, type) and issubclass(member, torch.Tensor)


def check_output_dir(cfg: DictConfig) -> None:
    """paths.output_dir (the run folder) must be, or be creatable as, a writable folder."""
    try:
        output_dir = OmegaConf.select(cfg, "paths.output_dir")
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra run
        return
    if output_dir:
        check_writable(str(output_dir), "paths.output_dir")
