"""Trainable-only checkpoints: the adapters and heads in safetensors, plus the config to rebuild.

Like HF peft's `save_pretrained`: the frozen backbone is not stored; `load_trainable` rebuilds it
from the recorded `backbone` config, checks it is the one trained on (`fingerprint`) and loads the
trainable tensors (`packing`) on top. `verify` runs the same checks without building the network.

The file may come from someone else: its metadata is plain JSON, never resolved (an interpolation
is refused), checked field by field (`check_recorded`), and the network it describes is first
built on the meta device and compared with the stored tensors' shapes, so that a config that
does not fit its tensors fails before any weight is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from met_lightning.builders import build_backbone, meta_network, rebuild_network
from met_lightning.checkpoint.fingerprint import verify_backbone
from met_lightning.checkpoint.migrate import migrate
from met_lightning.checkpoint.packing import check_shapes, export_state, load_export
from met_lightning.checkpoint.tagged import read_tagged, write_tagged
from met_lightning.errors import CheckpointError, MetError
from met_lightning.spec import InputSpec

FORMAT = "met_lightning.trainable/1"
FILENAME = "trainable.safetensors"


def save_trainable(
    net: nn.Module,
    path: str | Path,
    config: dict[str, Any],
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write the trainable tensors (`packing.export_state`) and `config` (JSON in the metadata)
    atomically; `weights` (which epoch / checkpoint they are, see `train.exported_weights`) goes
    to the metadata key `weights` as JSON."""
    metadata = {"config": json.dumps(config, sort_keys=True)}
    if weights is not None:
        metadata["weights"] = json.dumps(weights, sort_keys=True)
    # 1-bit adapter weights packed 8 signs per byte
    return write_tagged(path, export_state(net), FORMAT, metadata)


def read_trainable(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of a trainable checkpoint, its config in today's shape (`migrate`: one
    written by an earlier version too); a clear error if missing, not ours, or its recorded
    config is malformed (`check_recorded`)."""
    tensors, metadata = read_tagged(path, FILENAME, FORMAT, "checkpoint")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError, RecursionError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no readable rebuild config in its metadata "
            f"({type(err).__name__})"
        ) from None
    check_recorded(config, str(path))
    return tensors, migrate(config, f"checkpoint {str(path)!r}")


def _interpolations(value: Any, key: str = "") -> list[str]:
    """Keys of `value` (nested dicts / lists) whose key or string holds an OmegaConf
    interpolation."""
    if isinstance(value, str):
        return [key or "(top)"] if "${" in value else []
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _interpolations(v, f"{key}[{i}]")]
    if isinstance(value, dict):
        found = []
        for name, item in value.items():
            path = f"{key}.{name}" if key else str(name)
            found += [path] if "${" in str(name) else _interpolations(item, path)
        return found
    return []


def check_recorded(config: Any, source: str) -> None:
    """CheckpointError naming `source` and the key unless the recorded rebuild config has the
    shape met_lightning writes: mappings where expected, `num_classes` a positive integer,
    `class_names` null or one string per class, an input spec, no interpolation anywhere (the
    values are data and never resolved; only the key is named, never its value)."""

    def fail(problem: str) -> None:
        raise CheckpointError(
            f"checkpoint {source!r}: its recorded config {problem}; it was not written by "
            "met_lightning as it is (use the run's own file, or train again)"
        )

    if not isinstance(config, dict):
        fail("is not a mapping")
    interpolated = _interpolations(config)
    if interpolated:
        fail(f"holds an interpolation (${{...}}) in {interpolated[0]}, which is never resolved")
    for key in ("model", "backbone", "input_spec"):
        if not isinstance(config.get(key), dict):
            fail(f"has no mapping {key!r}")
    num_classes = config.get("num_classes")
    if type(num_classes) is not int or num_classes < 1:
        fail(f"has num_classes={str(num_classes)[:40]!r}, not a positive integer")
    names = config.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != num_classes
        or not all(isinstance(n, str) for n in names)
    ):
        count = len(names) if isinstance(names, list) else type(names).__name__
        fail(f"has class_names ({count}) that are not {num_classes} strings, one per class")
    try:
        InputSpec.of(config["input_spec"])
    except (KeyError, TypeError, ValueError) as err:
        fail(f"has an unreadable input_spec ({type(err).__name__}: {err})")
    if type(config.get("seed", 0)) is not int:
        fail("has a seed that is not an integer")


def network_plan(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Build the recorded network on the meta device (no memory) and check that it is the
    network of the stored tensors and of the recorded input size; CheckpointError naming
    `source` otherwise. Runs before anything is allocated (`load_trainable`, `verify`)."""
    try:
        net = meta_network(config)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {source!r}: {err}") from None
    except (MetError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        reason = str(err).splitlines()[0][:300] if str(err) else ""
        raise CheckpointError(
            f"checkpoint {source!r}: its recorded config does not build a network "
            f"({type(err).__name__}: {reason})"
        ) from None
    check_shapes(net, {name: tuple(t.shape) for name, t in tensors.items()}, source)
    built = tuple(InputSpec.from_timm(net.backbone).input_size)
    recorded = tuple(InputSpec.of(config["input_spec"]).input_size)
    if built != recorded:
        raise CheckpointError(
            f"checkpoint {source!r}: its input_spec.input_size {list(recorded)} is not the "
            f"input size {list(built)} of the backbone it records"
        )


def _verified_backbone(
    config: dict[str, Any], path: str | Path, weights_file: str | None
) -> nn.Module:
    """The frozen backbone `config` records, checked against its recorded fingerprint."""
    backbone_cfg = dict(config["backbone"])
    if weights_file is not None:
        backbone_cfg["weights_file"] = weights_file
    with torch.random.fork_rng():
        # random (not pretrained) frozen weights come out as in training: same seed, built first
        torch.manual_seed(int(config.get("seed", 0)))
        backbone = build_backbone(backbone_cfg)
    verify_backbone(backbone, config, path, weights_file)  # the backbone it was trained on
    return backbone


def verify(path: str | Path, weights_file: str | None = None) -> dict[str, Any]:
    """Check a trainable checkpoint as `load_trainable` does, without building the network.

    The file exists, is safetensors of our format with a rebuild config, and the backbone that
    config builds now (with `weights_file` if given) has the recorded weights hash. Returns the
    config; CheckpointError naming the file and the fix otherwise.
    """
    tensors, config = read_trainable(path)
    network_plan(config, tensors, str(path))
    _verified_backbone(config, path, weights_file)
    return config


def load_trainable(path: str | Path, weights_file: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the network of a trainable checkpoint (backbone from its recorded config).

    `weights_file` overrides the recorded backbone weights file (e.g. after moving it).
    """
    tensors, config = read_trainable(path)
    network_plan(config, tensors, str(path))  # before any weight is allocated
    backbone = _verified_backbone(config, path, weights_file)
    net = rebuild_network(config, backbone)
    load_export(net, tensors, str(path))
    return net.eval(), config
