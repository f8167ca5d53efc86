"""Shared behaviour of the command-line entry points: user errors are one line, exit code 2."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from met_lightning.errors import ConfigError, MetError
from met_lightning.paths import WRITABLE_HINT, check_writable, config_dir

T = TypeVar("T")


def user_task(run: Callable[[DictConfig], Any]) -> Callable[[DictConfig], None]:
    """The Hydra task of a console entry point: `run(cfg)`, a user error as one line, exit 2."""

    def task(cfg: DictConfig) -> None:
        exit_on_user_error(lambda: run(cfg))

    return task


def hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run `task` as the Hydra app of `conf/<config_name>.yaml` (command-line overrides apply)."""
    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(task)()


def user_error(err: BaseException | None) -> MetError | None:
    """The MetError behind `err`, also when Hydra's `instantiate` has wrapped it."""
    while err is not None:
        if isinstance(err, MetError):
            return err
        err = err.__cause__
    return None


def exit_on_user_error(fn: Callable[[], T], hint: str = "") -> T:
    """Run `fn`; a MetError prints `error: <message> (<hint>)`, exits 2 (traceback:
    HYDRA_FULL_ERROR=1)."""
    try:
        return fn()
    except Exception as err:
        cause = user_error(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # one write: the line of each DDP process stays whole on a shared stderr
        sys.stderr.write(f"error: {error_message(cause)}" + (f" ({hint})" if hint else "") + "\n")
        sys.exit(2)


def error_message(err: MetError) -> str:
    """The message of `err`; one raised in a DataLoader worker comes back wrapped by torch
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its own last line.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    for name in (f"{type(err).__module__}.{type(err).__qualname__}", type(err).__name__):
        if last.startswith(f"{name}: "):
            return last[len(name) + 2 :]
    return last


def _try_folder(folder: str, key: str) -> None:
    """Create `folder` (as Hydra is about to) and a file in it; a ConfigError if either fails."""
    path = check_writable(folder, key)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # removed as it closes
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f": {err.filename}" if err.filename and str(err.filename) != str(path) else ""
        message = f"{key}={folder} cannot be written ({reason}{where}); {WRITABLE_HINT}"
        raise ConfigError(message) from err


class RunFolderCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): the run (or sweep) folder must be writable before
    Hydra creates it and starts the job; otherwise `error: ...` and exit code 2."""

    HINT = (
        "runs are written to <paths.log_dir>/<task_name>/runs/<date_time>: set "
        "paths.log_dir=/a/writable/folder (or hydra.run.dir=...)"
    )

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            folder = OmegaConf.select(config, key)
        except Exception:  # noqa: BLE001 - an interpolation Hydra itself will report
            return
        if folder is not None:
            exit_on_user_error(lambda: _try_folder(str(folder), key), self.HINT)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
