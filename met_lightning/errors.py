"""Errors a user can cause. The CLI prints their message without a traceback."""


class MetError(Exception):
    """Base class: a problem with the user's input, reported as one clear message."""


class ConfigError(MetError):
    """An invalid configuration value. The message names the key and the fix."""


class BackboneError(MetError):
    """The backbone cannot be built or its weights cannot be loaded."""


class CheckpointError(MetError):
    """A checkpoint is missing, corrupt or does not match the model it is loaded into."""


class DataError(MetError):
    """A dataset is missing or malformed."""


class TrainingDivergedError(MetError, FloatingPointError):
    """The training loss or the trainable parameters became NaN / infinite."""
