"""Trainable-only checkpoints: the adapters and heads in safetensors, plus the config to rebuild.

Like HF peft's `save_pretrained`: the frozen backbone is not stored; `load_trainable` rebuilds it
from the recorded `backbone` config, checks it is the one trained on (`fingerprint`) and loads the
trainable tensors (`packing`) on top. `verify` runs the same checks without building the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from met_lightning.builders import build_backbone, rebuild_network
from met_lightning.checkpoint.fingerprint import verify_backbone
from met_lightning.checkpoint.packing import export_state, load_export
from met_lightning.checkpoint.tagged import read_tagged, write_tagged
from met_lightning.errors import CheckpointError

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
    """(tensors, config) of a trainable checkpoint; a clear error if missing or not ours."""
    tensors, metadata = read_tagged(path, FILENAME, FORMAT, "checkpoint")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no readable rebuild config in its metadata ({err!r})"
        ) from None
    return tensors, config


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
    _, config = read_trainable(path)
    _verified_backbone(config, path, weights_file)
    return config


def load_trainable(path: str | Path, weights_file: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the network of a trainable checkpoint (backbone from its recorded config).

    `weights_file` overrides the recorded backbone weights file (e.g. after moving it).
    """
    tensors, config = read_trainable(path)
    backbone = _verified_backbone(config, path, weights_file)
    net = rebuild_network(config, backbone)
    load_export(net, tensors, str(path))
    return net.eval(), config
