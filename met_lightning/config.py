"""Validation of a composed training config, before anything heavy (no weights, no data).

Unknown keys, wrong types and impossible values fail here with a message that names the key and
the fix. The `model` node is checked by its owners (`ModelConfig`, `AdapterConfig`, `check_exits`,
`check_loss`); the other `_target_` groups against their targets' signatures (`check_targets`).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from met_lightning.checkpoint.migrate import MOVED_KEYS, migrate_override, moved_key
from met_lightning.errors import ConfigError
from met_lightning.losses.multi_exit import check_loss
from met_lightning.models.adapters import AdapterConfig
from met_lightning.models.backbone import create_backbone, describe_backbone
from met_lightning.models.multi_exit_vit import check_exits, check_token_layout
from met_lightning.paths import check_writable
from met_lightning.structured import target_config, typed
from met_lightning.training.module import ModelConfig

TOP_LEVEL_KEYS = {
    "task_name", "seed", "ckpt_path", "test", "tags", "paths", "data", "backbone", "model",
    "optimizer", "scheduler", "trainer", "callbacks", "logger", "optimized_metric", "resume",
}  # fmt: skip
BackboneSchema = target_config(create_backbone, name="???")


def moved_key_error(key: str) -> ConfigError:
    """The error for a key under one that moved (`migrate.MOVED_KEYS`), naming its new spelling."""
    return ConfigError(f"{key} moved to {moved_key(key)}: write that instead")


def check_moved_overrides(overrides: list[str]) -> None:
    """ConfigError for a command-line override of a key that moved (`model.adapter.rank=4`)."""
    for override in overrides:
        if migrate_override(override) != override:  # migrate's own parsing of an override
            raise moved_key_error(override.partition("=")[0].lstrip("+~"))


def validate_config(cfg: DictConfig) -> None:
    """Check a composed training config before anything is built; raise ConfigError if wrong."""
    if unknown := sorted(set(cfg.keys()) - TOP_LEVEL_KEYS):
        raise ConfigError(f"unknown top-level config key(s) {unknown}; valid keys: "
                          f"{sorted(TOP_LEVEL_KEYS)}")  # fmt: skip
    for old in MOVED_KEYS:
        if OmegaConf.select(cfg, old, default=None) is not None:  # a config file's old spelling
            raise moved_key_error(old)
    model = typed(cfg, "model", ModelConfig)
    backbone = typed(cfg, "backbone", BackboneSchema)
    net = model.net
    AdapterConfig(**OmegaConf.to_container(net.adapter))  # its checks
    check_token_layout(net.token_layout)
    spec = describe_backbone(backbone.name, OmegaConf.to_container(backbone.model_kwargs))
    exits = check_exits(list(net.exits), spec.depth)
    loss = OmegaConf.to_container(model.loss)
    check_loss(len(exits), **{k: v for k, v in loss.items() if not k.startswith("_")})

    for key in ("batch_size", "eval_batch_size"):
        value = (cfg.get("data") or {}).get(key)
        if not (value is None or (type(value) is int and value > 0)):
            raise ConfigError(f"data.{key}={value} must be a positive integer")
    epochs = (cfg.get("trainer") or {}).get("max_epochs")
    if not (epochs is None or (isinstance(epochs, int) and (epochs >= 1 or epochs == -1))):
        raise ConfigError(
            f"trainer.max_epochs={epochs} must be >= 1 (or -1 with trainer.max_steps)"
        )
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} must be an integer")
    check_targets(cfg)  # data / trainer / optimizer / ... keys: unknown names, strings for numbers
    check_output_dir(cfg)


# Config groups instantiated with Hydra: one `_target_` node, or a dict of them.
TARGET_NODES = ("model", "model.net", "model.loss", "data", "trainer", "optimizer", "scheduler")
TARGET_DICTS = ("callbacks", "logger")
# How many valid keys an "unknown key" message lists.
SHOWN_KEYS = 16


def check_targets(cfg: DictConfig) -> None:
    """Check the `_target_` nodes of `TARGET_NODES` and `TARGET_DICTS` against their targets'
    signatures, before anything is instantiated (see `check_target_node`)."""
    nodes = {group: OmegaConf.select(cfg, group) for group in TARGET_NODES}
    for group in TARGET_DICTS:
        items = OmegaConf.select(cfg, group)
        if isinstance(items, DictConfig):
            nodes.update({f"{group}.{name}": item for name, item in items.items()})
    for key, node in nodes.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            check_target_node(node, key)


def check_target_node(node: DictConfig, key: str) -> None:
    """ConfigError for a key of `node` that its `_target_` does not take (unless it takes
    **kwargs), or a string given for an argument that takes only numbers / booleans."""
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
        if name.startswith("_") or (name not in params and open_kwargs):
            continue
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean {key}.{close[0]}? " if close else ""
            valid = sorted(params)
            listed = ", ".join(valid[:SHOWN_KEYS]) + (", ..." if len(valid) > SHOWN_KEYS else "")
            raise ConfigError(
                f"{key}.{name}: unknown key; {hint}({target.rsplit('.', 1)[-1]} takes: {listed})"
            )
        if isinstance(value, str) and (wanted := _non_string_kind(params[name].annotation)):
            raise ConfigError(f"{key}.{name}={value!r} must be {wanted}, not a string")
        if params[name].annotation in (bool, "bool") and not isinstance(value, bool):
            raise ConfigError(f"{key}.{name}={value!r} must be true or false")


def _target_parameters(obj: Any) -> tuple[dict[str, Any] | None, bool]:
    """(named parameters that `obj(...)` accepts, whether it also takes arbitrary keywords); for
    a class, its `__init__` and those it passes `**kwargs` on to (the MRO). None if a signature
    cannot be read."""
    functions = [obj]
    if inspect.isclass(obj):
        functions = [k.__init__ for k in obj.__mro__ if k is not object and "__init__" in vars(k)]
    params: dict[str, Any] = {}
    for fn in functions:
        sig = _signature(fn)
        if sig is None:
            return None, True
        for name, param in sig.parameters.items():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and name != "self":
                params.setdefault(name, param)
        if all(param.kind is not param.VAR_KEYWORD for param in sig.parameters.values()):
            return params, False
    return params, True  # every one passes **kwargs on


def _signature(fn: Any) -> inspect.Signature | None:
    for eval_str in (True, False):
        try:
            return inspect.signature(fn, eval_str=eval_str)
        except (NameError, TypeError, ValueError, AttributeError, SyntaxError):
            continue
    return None


# annotations that admit only such values, as an error message names them
KINDS = {bool: "true or false", int: "an integer", float: "a number", type(None): "null"}


def _non_string_kind(annotation: Any) -> str | None:
    """'an integer' / 'a number' / 'true or false' (+ ' or null') if `annotation` admits only
    such values; None if it admits a string or cannot be told."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set()
    for member in typing.get_args(annotation) if union else (annotation,):
        if typing.get_origin(member) is typing.Literal:
            if any(isinstance(v, str) for v in typing.get_args(member)):
                return None
            kinds.add("a number")
        elif isinstance(member, type) and issubclass(member, torch.Tensor):
            kinds.add("a number")
        elif member in KINDS:
            kinds.add(KINDS[member])
        else:
            return None
    if "a number" in kinds:
        kinds.discard("an integer")
    named = [k for k in ("an integer", "a number", "true or false") if k in kinds]
    return " or ".join(named + (["null"] if "null" in kinds else [])) if named else None


def check_output_dir(cfg: DictConfig) -> None:
    """paths.output_dir (the run folder) must be, or be creatable as, a writable folder."""
    try:
        output_dir = OmegaConf.select(cfg, "paths.output_dir")
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra run
        return
    if output_dir:
        check_writable(str(output_dir), "paths.output_dir")
