"""Experiment loggers from the `logger` config group, with a wandb that can never stop a run.

wandb logs offline without an API key or network; if it still cannot start, the run goes on with
its local logs: one warning each, never an exception. `CSVLogger` writes metrics.csv atomically
and continues an existing one (resume) instead of deleting it.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import time
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from met_lightning.atomic import atomic_path, write_text
from met_lightning.paths import host_reachable

log = logging.getLogger(__name__)

WANDB_HOST = "https://api.wandb.ai"


def wandb_api_key() -> str | None:
    """The key wandb would use: WANDB_API_KEY, else the one `wandb login` stored in ~/.netrc."""
    if key := os.environ.get("WANDB_API_KEY"):
        return key
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", WANDB_HOST)).hostname
        auth = netrc.netrc().authenticators(host)
        return auth[2] if auth else None
    except (OSError, netrc.NetrcParseError):
        return None


def wandb_mode() -> str:
    """online / offline / disabled: WANDB_MODE (default online), offline without key or network."""
    if os.environ.get("WANDB_MODE") == "":  # wandb itself rejects an empty WANDB_MODE
        del os.environ["WANDB_MODE"]
    mode = os.environ.get("WANDB_MODE") or "online"
    if mode != "online":
        return mode
    key = wandb_api_key()
    if key and host_reachable(os.environ.get("WANDB_BASE_URL", WANDB_HOST)):
        return "online"
    cause = "the server cannot be reached" if key else "no API key (WANDB_API_KEY or `wandb login`)"
    warn_once(f"wandb: {cause}: logging offline; upload later with "
              "`wandb sync <run folder>/wandb/offline-run-*`")  # fmt: skip
    return "offline"


@rank_zero_only
def warn_once(message: str) -> None:
    log.warning(message)


def make_wandb(item: DictConfig) -> WandbLogger | None:
    """The configured WandbLogger, started now; None (one warning) if wandb cannot start."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    try:
        logger = instantiate(item, mode=mode)
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            # Lightning passes anonymous=None, which wandb >= 0.19 warns about on every run
            init.pop("anonymous", None)
        if rank_zero_only.rank == 0:
            _ = logger.experiment  # start the run now, so that a failure is caught here
        return logger
    except Exception as err:  # wandb must never stop a training run
        warn_once(f"wandb could not start ({type(err).__name__}: {err}); the run goes on with "
                  "its local logs (metrics.csv)")  # fmt: skip
        return None


def build_loggers(group: DictConfig | None) -> list[Logger]:
    """Instantiate every `_target_` entry of the `logger` group (wandb through `make_wandb`)."""
    loggers = [
        make_wandb(i) if str(i["_target_"]).endswith("WandbLogger") else instantiate(i)
        for i in (group or {}).values()
        if i and "_target_" in i
    ]
    return [logger for logger in loggers if logger is not None]


def finish_wandb(loggers: list[Logger]) -> None:
    """End the wandb run (a multirun job is its own wandb run); errors are only warned about."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    try:
        import wandb

        wandb.finish()
    except Exception as err:
        warn_once(f"wandb could not finish the run cleanly: {err}")


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but metrics.csv is rewritten whole, atomically, and the rows of an
    existing one are kept (Lightning's appends in place and deletes an existing file). It is
    flushed before every checkpoint, at every epoch start and at the end."""

    MIN_INTERVAL = 2.0

    def _check_log_dir_exists(self) -> None:  # called by the base __init__: load, do not delete
        self.rows: list[dict[str, Any]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.DictReader(file)
                self.rows = list(reader)
                self.metrics_keys = sorted(set(self.metrics_keys) | set(reader.fieldnames or []))
        # rows that were already there (a resumed run logs e.g. its parameter counts again)
        self._loaded = {_row_key(row) for row in self.rows}
        self._pending = False
        self._written_at = 0.0

    def drop_after(self, step: int) -> int:
        """Forget the rows logged after `step` (a resumed run logs them again); how many."""
        before = len(self.rows)
        self.rows = [row for row in self.rows if not _after(row.get("step"), step)]
        self._loaded = {_row_key(row) for row in self.rows}
        if len(self.rows) != before:
            self._write()
        return before - len(self.rows)

    def save(self, now: bool = False) -> None:
        """Keep the rows logged; write metrics.csv if `now` or MIN_INTERVAL s after the last."""
        if self.metrics:
            self._record_new_keys()
            self.rows.extend(row for row in self.metrics if _row_key(row) not in self._loaded)
            self.metrics = []
            self._pending = True
        if self._pending and (now or time.monotonic() - self._written_at >= self.MIN_INTERVAL):
            self._write()

    def flush(self) -> None:
        self.save(now=True)

    def _write(self) -> None:
        self._pending = False
        self._written_at = time.monotonic()
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.metrics_file_path, buffer.getvalue())

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)


def _row_key(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in row.items() if v is not None and v != ""))


def _after(value: Any, step: int) -> bool:
    try:
        return int(float(value)) > step
    except (TypeError, ValueError):
        return False


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` with an atomic metrics.csv that survives a resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def flush(self) -> None:
        """Write metrics.csv now (the writer otherwise waits a little between rewrites)."""
        if self._experiment is not None:
            self._experiment.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.flush()


def flush_csv(loggers: list[Logger]) -> None:
    """Write the metrics.csv of every CSVLogger in `loggers` now."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.flush()


def rewind_csv(loggers: list[Logger], step: int) -> None:
    """Resuming from a checkpoint at `step`: drop metrics.csv rows of the lost part of the run."""
    for logger in loggers:
        if isinstance(logger, CSVLogger) and rank_zero_only.rank == 0:
            if dropped := logger.experiment.drop_after(step):
                log.info("metrics.csv: %d row(s) after step %d dropped", dropped, step)
