"""Checkpoints: what a run saves, how it is loaded back, checked, and resumed.

- `save_trainable` / `load_trainable` / `verify`: trainable tensors + rebuild config in
  safetensors (`trainable.py`, on `tagged.py`, `packing.py`, `fingerprint.py`);
- `SafeCheckpointIO`, `load_lightning_checkpoint`, `checkpoint_progress`: Lightning's `.ckpt`
  written atomically, read weights-only (`lightning_io.py`);
- `resume_argv`, `resume_checkpoint`, `remove_stale_files`, `checkpoint_folders`: `resume=RUN_DIR`.
"""

from met_lightning.checkpoint.fingerprint import KEY as FINGERPRINT_KEY
from met_lightning.checkpoint.fingerprint import backbone_fingerprint
from met_lightning.checkpoint.lightning_io import (
    SafeCheckpointIO,
    checkpoint_progress,
    load_lightning_checkpoint,
)
from met_lightning.checkpoint.resume import (
    ResumePoint,
    checkpoint_folders,
    remove_stale_files,
    resume_argv,
    resume_checkpoint,
)
from met_lightning.checkpoint.trainable import (
    FILENAME,
    FORMAT,
    load_trainable,
    read_trainable,
    save_trainable,
    verify,
)

__all__ = [
    "FILENAME",
    "FINGERPRINT_KEY",
    "FORMAT",
    "ResumePoint",
    "SafeCheckpointIO",
    "backbone_fingerprint",
    "checkpoint_folders",
    "checkpoint_progress",
    "load_lightning_checkpoint",
    "load_trainable",
    "read_trainable",
    "remove_stale_files",
    "resume_argv",
    "resume_checkpoint",
    "save_trainable",
    "verify",
]
