"""Structured configs made from a target's signature, so that each default is written once.

`target_config(fn)` is what hydra-zen's `builds(fn, populate_full_signature=True)` does: a
dataclass with `_target_` and one typed field per keyword argument of `fn`, whose default is the
signature's. Registered in Hydra's ConfigStore, it is the node the YAML files select and override;
Hydra then rejects unknown keys and wrong types when it composes the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from met_lightning.errors import ConfigError


def _field_type(annotation: Any) -> Any:
    """`annotation` as a type OmegaConf checks (Sequence[X] -> list[X], X | None -> Optional[X]),
    Any where it checks none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = _field_type(members[0]) if len(members) == 1 else Any
        return Any if inner is Any else typing.Optional[inner]  # noqa: UP045 - OmegaConf reads Optional
    if origin in (list, Sequence) and args:
        return list[_field_type(args[0])]
    if annotation in (int, float, bool, str) or dataclasses.is_dataclass(annotation):
        return annotation
    return Any


def target_config(
    target: Callable[..., Any],
    *,
    partial: bool = False,
    skip: Sequence[str] = (),
    **fields: Any,
) -> type:
    """A dataclass for `target`: `_target_` (and `_partial_`), then one field per keyword argument
    of its signature (but `skip`: what the caller passes) with its default and type. `fields`
    replaces a field's default: a dataclass type becomes a nested node, anything else a value."""
    path = f"{target.__module__}.{target.__qualname__}"
    spec: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=path))]
    if partial:
        spec.append(("_partial_", bool, dataclasses.field(default=True)))
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    for name, param in inspect.signature(target).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in fields:
            value = fields[name]
            if dataclasses.is_dataclass(value):
                spec.append((name, value, dataclasses.field(default_factory=value)))
            else:
                spec.append((name, Any, dataclasses.field(default=value)))
            continue
        if param.default is param.empty:
            raise TypeError(f"{path}: argument {name!r} has no default; give it in `fields`")
        default, kind = param.default, _field_type(hints.get(name, Any))
        if isinstance(default, (list, tuple)):
            spec.append((name, kind, dataclasses.field(default_factory=lambda d=default: list(d))))
        else:
            spec.append((name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{target.__name__}Config", spec)


def typed(cfg: DictConfig, key: str, schema: type) -> DictConfig:
    """`cfg[key]` resolved and merged into the structured config `schema`: an unknown key or a
    wrong type is a ConfigError naming the key (and the keys valid there)."""
    try:
        plain = OmegaConf.to_container(cfg[key], resolve=True)
        return OmegaConf.merge(OmegaConf.structured(schema), plain)
    except ConfigKeyError as err:
        parent, _, name = str(err.full_key).rpartition(".")
        node = OmegaConf.select(OmegaConf.structured(schema), parent) if parent else None
        if not isinstance(node, DictConfig):
            node = OmegaConf.structured(schema)
        valid = [str(k) for k in node.keys() if not str(k).startswith("_")]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {key}.{parent + '.' if parent else ''}{close[0]}?" if close else ""
        raise ConfigError(
            f"{key}.{err.full_key}: unknown key{hint} (valid keys there: {', '.join(valid)})"
        ) from None
    except OmegaConfBaseException as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        raise ConfigError(f"{full_key}: {getattr(err, 'msg', str(err)).splitlines()[0]}") from None
