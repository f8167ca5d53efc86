"""Checkpoints: what a run saves, how it is loaded back, checked, and resumed.

- save: `save_trainable` (trainable tensors + rebuild config in safetensors, `trainable.py`;
  the config records `backbone_fingerprint` under `FINGERPRINT_KEY`);
  Lightning's `.ckpt` files are written by `SafeCheckpointIO` (atomic, `lightning_io.py`).
- load: `load_trainable(run_folder)` (network on its frozen backbone), `load_lightning_checkpoint`
  (weights-only `.ckpt`), `checkpoint_progress` (its epoch and step, tensors not read).
- verify: `verify(path)`: the checks `load_trainable` runs (file, format, backbone fingerprint)
  without building the network.
- resume: `resume_argv`, `resume_checkpoint`, `remove_stale_files` for `resume=RUN_DIR`
  (`resume.py`); `checkpoint_folders`: where a loaded checkpoint's state may name files.

Inside: `tagged.py` (our safetensors files), `packing.py` (1-bit weights packed for storage),
`fingerprint.py` (backbone name + weights hash).
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
