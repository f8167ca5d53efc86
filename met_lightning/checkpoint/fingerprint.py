"""The identity of a frozen backbone: its timm name and a SHA-256 over its weights.

Training records the fingerprint of the freshly built backbone; `verify_backbone` recomputes it
when a trainable-only checkpoint is loaded and refuses another backbone.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from met_lightning.errors import CheckpointError

log = logging.getLogger(__name__)

KEY = "backbone_fingerprint"  # where the fingerprint lives in a checkpoint's rebuild config


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over `module.state_dict()`: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def backbone_fingerprint(backbone: nn.Module, name: str) -> dict[str, str]:
    """{"name": timm name, "sha256": weights hash} of a freshly built backbone."""
    return {"name": str(name), "sha256": weights_sha256(backbone)}


def verify_backbone(
    backbone: nn.Module, config: dict[str, Any], path: str | Path, weights_file: str | None = None
) -> None:
    """CheckpointError naming both identities and the fix unless `backbone` (just built from a
    checkpoint's config) is the one it was trained on; a warning if none is recorded (older)."""
    recorded = config.get(KEY) or {}
    backbone_cfg = config.get("backbone") or {}
    name = str(backbone_cfg.get("name", "?"))
    if not recorded.get("sha256"):
        log.warning(
            "checkpoint %s records no backbone weights hash (made by an older met_lightning): "
            "the backbone %s it is loaded on cannot be verified",
            path,
            name,
        )
        return
    now = backbone_fingerprint(backbone, name)
    if now == {"name": str(recorded.get("name")), "sha256": recorded["sha256"]}:
        return
    source = weights_file or backbone_cfg.get("weights_file")
    built = f"weights file {source}" if source else "hub weights"
    if not source and not backbone_cfg.get("pretrained"):
        built = f"random weights, seed {config.get('seed')}"
    raise CheckpointError(
        f"checkpoint {str(path)!r} is for another backbone: it was trained on "
        f"{recorded.get('name')!r} with weights sha256 {recorded['sha256'][:16]}…, but the "
        f"backbone built now is {name!r} ({built}) with sha256 {now['sha256'][:16]}…. Load it "
        "with the weights it was trained on: weights_file=/path/to/weights (predict, "
        "load_trainable) or backbone.weights_file=... (training)"
    )
