"""Checkpoints: trainable-only safetensors (`trainable.py`), Lightning's `.ckpt` written atomically
and read weights-only, and `resume=RUN_DIR` (`resume.py`)."""

from met_lightning.checkpoint.resume import (
    ResumePoint,
    SafeCheckpointIO,
    checkpoint_folders,
    checkpoint_progress,
    load_lightning_checkpoint,
    remove_stale_files,
    resume_argv,
    resume_checkpoint,
)
from met_lightning.checkpoint.trainable import (
    FILENAME,
    FINGERPRINT_KEY,
    FORMAT,
    backbone_fingerprint,
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
