"""Experiment loggers from the `logger` config group, with a wandb that can never stop a run.

wandb: with no API key it logs offline (sync later with `wandb sync`); with a key but no network
it logs offline too; if it still cannot start, the run goes on with its local logs. Each call is
one warning, never an exception.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)

WANDB_HOST = "https://api.wandb.ai"


def _is_wandb(item: DictConfig) -> bool:
    return str(item.get("_target_", "")).endswith("WandbLogger")


def wandb_api_key() -> str | None:
    """The key wandb would use: WANDB_API_KEY, else the one `wandb login` stored in ~/.netrc."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        return key
    try:
        import netrc

        host = urlparse(os.environ.get("WANDB_BASE_URL", WANDB_HOST)).hostname
        auth = netrc.netrc().authenticators(host)
        return auth[2] if auth else None
    except (OSError, netrc.NetrcParseError):
        return None


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", WANDB_HOST))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """online / offline / disabled: WANDB_MODE (default online), offline without key or network."""
    if os.environ.get("WANDB_MODE") == "":  # wandb itself rejects an empty WANDB_MODE
        del os.environ["WANDB_MODE"]
    mode = os.environ.get("WANDB_MODE") or "online"
    if mode != "online":
        return mode
    if not wandb_api_key():
        warn_once("wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline; "
                  "upload later with `wandb sync <run folder>/wandb/offline-run-*`")  # fmt: skip
        return "offline"
    if not wandb_reachable():
        warn_once("wandb: the server cannot be reached: logging offline; upload later with "
                  "`wandb sync <run folder>/wandb/offline-run-*`")  # fmt: skip
        return "offline"
    return "online"


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
        if rank_zero_only.rank == 0:
            _ = logger.experiment  # start the run now, so that a failure is caught here
        return logger
    except Exception as err:  # wandb must never stop a training run
        warn_once(f"wandb could not start ({type(err).__name__}: {err}); the run goes on with "
                  "its local logs (metrics.csv)")  # fmt: skip
        return None


def build_loggers(group: DictConfig | None) -> list[Logger]:
    """Instantiate every `_target_` entry of the `logger` group (wandb through `make_wandb`)."""
    loggers: list[Any] = []
    for item in (group or {}).values():
        if not item or "_target_" not in item:
            continue
        logger = make_wandb(item) if _is_wandb(item) else instantiate(item)
        if logger is not None:
            loggers.append(logger)
    return loggers


def finish_wandb(loggers: list[Logger]) -> None:
    """End the wandb run (a multirun job is its own wandb run); errors are only warned about."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    try:
        import wandb

        wandb.finish()
    except Exception as err:
        warn_once(f"wandb could not finish the run cleanly: {err}")
