"""Our safetensors files (`trainable.safetensors`, `logits.safetensors`): tensors plus string
metadata whose `format` key names what the file is."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from met_lightning.atomic import atomic_path
from met_lightning.errors import CheckpointError


def write_tagged(
    path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]
) -> Path:
    """Write `tensors` with `metadata` and `format: fmt` to `path` atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": fmt, **metadata})
    return Path(path)


def read_tagged(
    path: str | Path,
    filename: str,
    fmt: str,
    what: str,
    missing_hint: str = "",
    tensors: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one of our files (`path` or `path/filename`), only the header with
    `tensors=False` (tensors: {}); CheckpointError if missing, corrupt, or not of format `fmt`."""
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        loaded = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt or not safetensors: {err}"
        ) from None
    if metadata.get("format") != fmt:
        raise CheckpointError(
            f"{str(path)!r} is not a met_lightning {what} "
            f"(format {metadata.get('format')!r}, expected {fmt!r})"
        )
    return loaded, metadata
