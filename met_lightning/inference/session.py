"""A trained model ready for early-exit inference: what `predict` and `serve` share.

`open_session(cfg)` loads a trainable checkpoint, picks the thresholds (`thresholds=`, `budget=`
via the run's logit store, or none) and the eval transform recorded with the checkpoint, and
builds the `EarlyExitEngine`. `Session.rows(result)` turns an engine result into one dict per
image (class, class name, confidence, exit, block, MACs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from met_lightning.checkpoint import load_trainable, read_trainable
from met_lightning.data.base import InputSpec
from met_lightning.data.transforms import eval_transform
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.inference.budget import SplitScores, resolve_budget, select_for_budget
from met_lightning.inference.engine import (
    PRECISIONS,
    EarlyExitEngine,
    EarlyExitResult,
    check_mode,
    check_precision,
    check_thresholds,
    warn_precision_mismatch,
)
from met_lightning.inference.logit_store import FILENAME as STORE_FILE
from met_lightning.inference.logit_store import LogitStore, recorded_precision
from met_lightning.macs import ExitCosts, format_macs, model_exit_costs

log = logging.getLogger(__name__)


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of `checkpoint=` (a run folder, or a file in one)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def store_path(checkpoint: str, store: str | None) -> Path:
    """The logit store to calibrate on: `store`, else the checkpoint's run folder's."""
    return Path(store) if store else run_folder(checkpoint) / STORE_FILE


def choose_thresholds(cfg: Any, net: torch.nn.Module) -> tuple[list[float], str]:
    """Thresholds from `thresholds=`, from `budget=` (via the logit store), or none (+inf).

    `cfg` has the keys of conf/predict.yaml: thresholds, budget, checkpoint, store, confidence.
    Returns (K thresholds, a sentence saying how they were chosen).
    """
    k = net.num_exits
    if cfg.thresholds is not None and cfg.budget is not None:
        raise ConfigError("give either budget= or thresholds=, not both")
    if cfg.thresholds is not None:
        return check_thresholds(list(cfg.thresholds), k), "thresholds given"
    if cfg.budget is None:
        return [math.inf] * k, "no early exit (give budget= or thresholds= to exit early)"
    costs = model_exit_costs(net)
    budget_macs = resolve_budget(cfg.budget, costs.full)
    store = LogitStore.load(store_path(cfg.checkpoint, cfg.store))
    if tuple(store.exits) != tuple(net.exits) or tuple(store.exit_macs) != costs.to_exit:
        raise CheckpointError(
            f"the logit store (exits {list(store.exits)}) was not written for this checkpoint's "
            f"model (exits {list(net.exits)}); pass store= for the right run"
        )
    calib = store["val"]
    scores = SplitScores.from_logits(calib.logits, calib.labels, cfg.confidence)
    point = select_for_budget(scores, costs.to_exit, budget_macs, key=f"budget={cfg.budget}")
    how = (
        f"budget {format_macs(budget_macs)} per image: thresholds with the best val accuracy "
        f"({100 * point.accuracy:.2f} % at {format_macs(point.mean_macs)} on val, {point.label})"
    )
    return list(point.thresholds), how


def choose_precision(cfg: Any) -> str:
    """`precision=`, else the precision the logit store was made in, else 32-true; a warning when
    the chosen one differs from the store's (calibration and prediction would see other numbers).
    """
    path = store_path(cfg.checkpoint, cfg.store)
    recorded = None
    if path.is_file() or (path.is_dir() and (path / STORE_FILE).is_file()):
        recorded = recorded_precision(path)  # the header only
    if cfg.get("precision") is not None:
        precision = check_precision(cfg.precision)
        warn_precision_mismatch(recorded, precision)
        return precision
    if recorded is None:
        return "32-true"
    try:
        return check_precision(recorded)
    except ConfigError:
        log.warning("logit store precision %r unknown to the engine: using 32-true", recorded)
        return "32-true"


def pick_device(name: str) -> torch.device:
    """`auto` (cuda if available, else cpu) or a torch device name; ConfigError if invalid."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device: {err}") from None


def check_session_options(cfg: Any) -> torch.device:
    """Check what `open_session` would fail on, before any network is built; return the device.

    A missing / corrupt checkpoint, thresholds of the wrong length, an unknown precision, device or
    engine mode (graphs without CUDA) raise here.
    """
    _, recorded = read_trainable(cfg.checkpoint)
    if cfg.thresholds is not None and cfg.budget is None:
        check_thresholds(list(cfg.thresholds), len(recorded["model"]["exits"]))
    if cfg.get("precision") is not None:
        check_precision(cfg.precision)
    device = pick_device(cfg.device)
    check_mode(cfg.get("engine_mode", "eager"), device)
    return device


def checkpoint_input(config: dict) -> tuple[InputSpec, Any]:
    """(input spec, eval transform PIL image -> [C, H, W]) recorded with a checkpoint."""
    spec = InputSpec.of(config["input_spec"])
    return spec, eval_transform(spec, config.get("normalize", "backbone"))


@dataclass
class Session:
    """A loaded network with its early-exit engine, input transform and exit costs."""

    net: torch.nn.Module
    config: dict
    engine: EarlyExitEngine
    spec: InputSpec
    transform: Any
    costs: ExitCosts
    thresholds: list[float]  # as chosen (the engine's copy has the last set to -inf)
    how: str
    device: torch.device

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def class_names(self) -> list[str] | None:
        return self.config.get("class_names")

    def rows(self, result: EarlyExitResult) -> list[dict[str, Any]]:
        """One dict per image: class, class_name, confidence, exit (1-based), block, macs."""
        names = self.class_names
        rows = []
        for cls, conf, k in zip(
            result.predictions.tolist(),
            result.confidence.tolist(),
            result.exit_index.tolist(),
            strict=True,
        ):
            rows.append(
                {
                    "class": cls,
                    "class_name": names[cls] if names else str(cls),
                    "confidence": conf,
                    "exit": k + 1,
                    "block": self.net.exits[k],
                    "macs": self.costs.to_exit[k],
                }
            )
        return rows


def open_session(
    cfg: Any, device: torch.device, thresholds: Sequence[float] | None = None
) -> Session:
    """Load `cfg.checkpoint` on `device` with thresholds `thresholds` (else `choose_thresholds`).

    `cfg` has the keys of conf/predict.yaml (checkpoint, weights_file, budget, thresholds, store,
    confidence, precision, engine_mode). The network runs in `choose_precision(cfg)`.
    """
    precision = choose_precision(cfg)
    net, config = load_trainable(cfg.checkpoint, cfg.weights_file)
    net.to(device=device, dtype=PRECISIONS[precision][1])
    if thresholds is None:
        thresholds, how = choose_thresholds(cfg, net)
    else:
        thresholds, how = list(thresholds), "thresholds given"
    engine = EarlyExitEngine(
        net, thresholds, cfg.confidence, precision, cfg.get("engine_mode", "eager")
    )
    spec, transform = checkpoint_input(config)
    costs = model_exit_costs(net)
    return Session(net, config, engine, spec, transform, costs, list(thresholds), how, device)
