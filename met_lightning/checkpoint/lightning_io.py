"""Lightning checkpoints written atomically and read without unpickling arbitrary objects.

Written next to the target and renamed (Lightning's move from the temp folder is a copy across
file systems, which a crash can leave truncated); loaded `weights_only=True`: never code from the
file. A checkpoint may come from someone else and Lightning deletes the files its state names:
`confine` keeps those paths inside the run's checkpoint folders.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from met_lightning.atomic import atomic_path
from met_lightning.errors import CheckpointError

log = logging.getLogger(__name__)

# ModelCheckpoint's state entries that name files it may later delete (besides `best_k_models`'s
# keys); its `dirpath` is only compared with the callback's own, never used as a path
DELETABLE_PATHS = ("best_model_path", "last_model_path", "kth_best_model_path")
# what torch.load raises on a file that is not a whole checkpoint
CORRUPT = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile)


def load_lightning_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`; CheckpointError naming the file if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, *CORRUPT) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        if isinstance(err, pickle.UnpicklingError):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain values; it "
                f"is not loaded, since that would run code from the file ({reason}). Use a "
                "checkpoint written by met_lightning, or start a fresh run"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({reason}); use another "
            "checkpoint (ckpt_path=...) or start a fresh run"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint (no state_dict)"
        )
    return checkpoint


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """(epoch, global step) of a Lightning checkpoint, tensors memory-mapped, not read; None if
    it is not a readable checkpoint (-1 for a missing field)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1))
    except Exception:  # noqa: BLE001 - not a readable checkpoint of ours
        return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def reroot(value: Any, old: str, new: str) -> Any:
    """`value` (dict keys and values, lists, tuples, recursively) with every string that is the
    absolute folder `old` or a path inside it moved into `new`."""
    old, new = old.rstrip(os.sep) or os.sep, new.rstrip(os.sep) or os.sep
    if isinstance(value, str):
        rest = value[len(old) :].lstrip(os.sep)
        return (os.path.join(new, rest) if rest else new) if _within(value, old) else value
    if isinstance(value, dict):
        return {reroot(k, old, new): reroot(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(reroot(v, old, new) for v in value)
    return value


def inside(path: str | Path, folders: Sequence[str]) -> bool:
    """Whether `path`, resolved (symlinks, `..`), is one of `folders` (resolved) or in one."""
    return any(_within(os.path.realpath(path), os.path.realpath(f)) for f in folders)


def outside_paths(callbacks: Any, folders: Sequence[str]) -> list[str]:
    """The files the ModelCheckpoint states in a checkpoint's `callbacks` name outside every one
    of `folders`: Lightning would delete them."""
    found: list[str] = []
    for state in callbacks.values() if isinstance(callbacks, dict) else ():
        if isinstance(state, dict):
            best_k = state.get("best_k_models")
            named = [state.get(key) for key in DELETABLE_PATHS]
            named += list(best_k) if isinstance(best_k, dict) else []
            found += [p for p in named if isinstance(p, str) and p and not inside(p, folders)]
    return found


def confined(callbacks: Any, folders: Sequence[str]) -> Any:
    """`callbacks` with every path of `outside_paths` emptied / left out of `best_k_models`."""
    bad = set(outside_paths(callbacks, folders))
    if not bad:
        return callbacks
    log.warning("checkpoint names files outside the run's checkpoint folders %s; they are "
                "ignored: %s", list(folders), sorted(bad)[:5])  # fmt: skip
    result = {}
    for name, state in callbacks.items():
        if isinstance(state, dict):
            state = {k: "" if k in DELETABLE_PATHS and v in bad else v for k, v in state.items()}
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {
                    k: v for k, v in state["best_k_models"].items() if k not in bad
                }
        result[name] = state
    return result


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic `.ckpt` writes and weights-only loading; `relocate=(old, new)` re-roots loaded
    callback paths (a moved run folder), `confine` keeps them in the run's checkpoint folders."""

    def __init__(
        self, relocate: tuple[str, str] | None = None, confine: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.relocate = relocate
        self.confine = list(confine) if confine is not None else None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialize fully before touching the file system
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError("met_lightning loads checkpoints with weights_only=True only")
        checkpoint = load_lightning_checkpoint(path, map_location=map_location or "cpu")
        if self.relocate is not None and "callbacks" in checkpoint:
            checkpoint["callbacks"] = reroot(checkpoint["callbacks"], *self.relocate)
        if self.confine is not None and "callbacks" in checkpoint:
            checkpoint["callbacks"] = confined(checkpoint["callbacks"], self.confine)
        return checkpoint

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete the checkpoint file `path` (never a folder, never outside `confine`)."""
        path = Path(path)
        if self.confine is not None and not inside(path, self.confine):
            log.warning("not removing %s: outside the run's checkpoint folders", path)
        elif path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            log.warning("not removing %s: not a checkpoint file", path)
