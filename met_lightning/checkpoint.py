"""Trainable-only checkpoints: the adapters and heads in safetensors, plus the config to rebuild.

Like HF peft's `save_pretrained`: the frozen backbone is not stored; `load_trainable` rebuilds it
from the recorded `backbone` config and loads the trainable tensors on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from met_lightning.atomic import atomic_path
from met_lightning.builders import build_backbone, rebuild_network
from met_lightning.errors import CheckpointError
from met_lightning.models.binary import export_state, load_export
from met_lightning.models.fingerprint import verify_backbone

FORMAT = "met_lightning.trainable/1"
FILENAME = "trainable.safetensors"


def save_trainable(
    net: torch.nn.Module,
    path: str | Path,
    config: dict[str, Any],
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write the trainable tensors (`models.binary.export_state`) and `config` (JSON in the
    metadata) atomically; `weights` (which epoch / checkpoint they are, see
    `train.exported_weights`) goes to the metadata key `weights` as JSON."""
    path = Path(path)
    tensors = export_state(net)  # 1-bit adapter weights packed 8 signs per byte
    metadata = {"format": FORMAT, "config": json.dumps(config, sort_keys=True)}
    if weights is not None:
        metadata["weights"] = json.dumps(weights, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_tagged(
    path: str | Path, filename: str, fmt: str, what: str, missing_hint: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one of our safetensors files (`path` or `path/filename`).

    CheckpointError naming the file if it is missing, corrupt, or not of format `fmt`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt or not safetensors: {err}"
        ) from None
    if metadata.get("format") != fmt:
        raise CheckpointError(
            f"{str(path)!r} is not a met_lightning {what} "
            f"(format {metadata.get('format')!r}, expected {fmt!r})"
        )
    return tensors, metadata


def read_trainable(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of a trainable checkpoint; a clear error if missing or not ours."""
    tensors, metadata = read_tagged(path, FILENAME, FORMAT, "checkpoint")
    return tensors, json.loads(metadata["config"])


def load_trainable(
    path: str | Path, weights_file: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of a trainable checkpoint (backbone from its recorded config).

    `weights_file` overrides the recorded backbone weights file (e.g. after moving it).
    """
    tensors, config = read_trainable(path)
    backbone_cfg = dict(config["backbone"])
    if weights_file is not None:
        backbone_cfg["weights_file"] = weights_file
    with torch.random.fork_rng():
        # random (not pretrained) frozen weights come out as in training: same seed, built first
        torch.manual_seed(int(config.get("seed", 0)))
        backbone = build_backbone(backbone_cfg)
    verify_backbone(backbone, config, path, weights_file)  # the backbone it was trained on
    net = rebuild_network(config, backbone)
    load_export(net, tensors, str(path))
    return net.eval(), config
