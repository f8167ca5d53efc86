"""A trained model ready for early-exit inference: what `predict` and `serve` share.

`resolve(options)` checks the `SessionOptions` and settles thresholds, precision and device before
any weight is built, into a picklable `Plan` (serve hands it to its worker); `open_session(plan)`
builds the network, its `EarlyExitEngine` and the checkpoint's eval transform.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf

from met_lightning.builders import meta_network
from met_lightning.checkpoint import load_trainable, read_trainable
from met_lightning.data.base import InputSpec
from met_lightning.data.transforms import eval_transform
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.inference.budget import SplitScores, resolve_budget, select_for_budget
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, check_confidence
from met_lightning.inference.engine import (
    PRECISIONS,
    EarlyExitEngine,
    check_mode,
    check_precision,
    check_thresholds,
)
from met_lightning.inference.logit_store import FILENAME as STORE_FILE
from met_lightning.inference.logit_store import LogitStore, recorded_precision
from met_lightning.macs import ExitCosts, format_macs, model_exit_costs
from met_lightning.structured import typed

log = logging.getLogger(__name__)


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of `checkpoint=` (a run folder, or a file in one)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def store_path(checkpoint: str, store: str | None) -> Path:
    """The logit store to calibrate on: `store`, else the checkpoint's run folder's."""
    return Path(store) if store else run_folder(checkpoint) / STORE_FILE


@dataclass
class CheckpointOptions:
    """The trained model to load (the keys predict, serve and export share)."""

    # a run folder (its trainable.safetensors) or a trainable.safetensors file
    checkpoint: str = MISSING
    # backbone weights file, if it moved since training (default: the one recorded)
    weights_file: str | None = None


@dataclass
class SessionOptions(CheckpointOptions):
    """Options of a trained model's early-exit inference (the keys predict and serve share)."""

    # early exit: a budget, a fraction of the full cost in (0, 1] or MACs per image (thresholds
    # with the best val accuracy within it, from the run's logits.safetensors) ...
    budget: float | None = None
    # ... or explicit thresholds, one per early exit (K-1 values, or K with the last ignored);
    # neither = no early exit
    thresholds: list[float] | None = None
    # the confidence the thresholds apply to: max_softmax | margin | neg_entropy
    confidence: str = DEFAULT_CONFIDENCE
    # logit store for budget= (default: logits.safetensors next to the checkpoint)
    store: str | None = None
    # auto (cuda if available) | cpu | cuda | cuda:1 ...
    device: str = "auto"
    # null = the precision the run's logit store was made in (else 32-true), so that calibration
    # and inference see the same numbers; 32-true | bf16-mixed | 16-mixed | bf16-true | 16-true
    # (aliases 32, bf16, 16)
    precision: str | None = None
    # eager | graphs (replay each stage from CUDA graphs over power-of-two batch buckets; CUDA)
    engine_mode: str = "eager"


def typed_options(cfg: Any, schema: type, name: str) -> Any:
    """`cfg` merged into the dataclass `schema`; an unknown key or wrong type is a ConfigError."""
    return typed(OmegaConf.create({name: cfg}), name, schema)


def calibration_scores(
    options: Any, exit_macs: tuple[int, ...], exits: tuple[int, ...]
) -> SplitScores:
    """The val split of the run's logit store (`store=`), scored by `options.confidence`."""
    store = LogitStore.load(store_path(options.checkpoint, options.store))
    if tuple(store.exits) != tuple(exits) or tuple(store.exit_macs) != tuple(exit_macs):
        raise CheckpointError(
            f"the logit store (exits {list(store.exits)}) was not written for this checkpoint's "
            f"model (exits {list(exits)}); pass store= for the right run"
        )
    return SplitScores.from_logits(*store["val"], options.confidence)


def choose_thresholds(
    options: Any, costs: ExitCosts, exits: tuple[int, ...]
) -> tuple[list[float], str]:
    """(K thresholds, how): `thresholds=`, `budget=` (via the logit store), or none (+inf)."""
    k = len(exits)
    if options.thresholds is not None and options.budget is not None:
        raise ConfigError("give either budget= or thresholds=, not both")
    if options.thresholds is not None:
        return check_thresholds(list(options.thresholds), k), "thresholds given"
    if options.budget is None:
        return [math.inf] * k, "no early exit (give budget= or thresholds= to exit early)"
    budget_macs = resolve_budget(options.budget, costs.full)
    scores = calibration_scores(options, costs.to_exit, exits)
    point = select_for_budget(scores, costs.to_exit, budget_macs, key=f"budget={options.budget}")
    how = (
        f"budget {format_macs(budget_macs)} per image: thresholds with the best val accuracy "
        f"({100 * point.accuracy:.2f} % at {format_macs(point.mean_macs)} on val, {point.label})"
    )
    return list(point.thresholds), how


def choose_precision(options: Any) -> str:
    """`precision=`, else the logit store's, else 32-true; a warning when it differs from the
    store's (calibration and prediction would see other numbers)."""
    path = store_path(options.checkpoint, options.store)
    found = path.is_file() or (path / STORE_FILE).is_file()
    recorded = recorded_precision(path) if found else None  # the header only
    if options.precision is not None:
        precision = check_precision(options.precision)
        if recorded is not None and check_precision(recorded) != precision:
            warnings.warn(
                f"the thresholds were calibrated on logits made in precision {recorded}, but "
                f"prediction runs in {precision}: confidences may differ slightly, so exits may "
                f"too (pass precision={recorded} for parity)",
                stacklevel=2,
            )
        return precision
    try:
        return check_precision(recorded)  # None: 32-true
    except ConfigError:
        log.warning("logit store precision %r unknown to the engine: using 32-true", recorded)
        return "32-true"


@dataclass(frozen=True)
class Plan:
    """What `resolve` made of a session's options: plain values, nothing built (picklable)."""

    checkpoint: str
    weights_file: str | None
    config: dict  # the checkpoint's recorded rebuild config
    exits: tuple[int, ...]
    macs_per_exit: tuple[int, ...]
    thresholds: tuple[float, ...]  # K, as chosen
    how: str  # how they were chosen
    confidence: str
    precision: str
    device: str
    engine_mode: str

    @property
    def class_names(self) -> list[str] | None:
        return self.config.get("class_names")

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.of(self.config["input_spec"])


def resolve(options: Any) -> Plan:
    """Check every option (ConfigError / CheckpointError) and resolve thresholds, precision and
    device, before any weight is built (the network is built on the meta device only)."""
    if OmegaConf.is_config(options) and OmegaConf.is_missing(options, "checkpoint"):
        raise ConfigError("give checkpoint=RUN_FOLDER_OR_FILE")
    confidence = check_confidence(options.confidence)
    _, config = read_trainable(options.checkpoint)
    net = meta_network(config)
    costs = model_exit_costs(net)
    thresholds, how = choose_thresholds(options, costs, tuple(net.exits))
    precision = choose_precision(options)
    name = options.device  # auto: cuda if available, else cpu
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device: {err}") from None
    mode = check_mode(options.engine_mode, device)
    return Plan(
        checkpoint=str(options.checkpoint),
        weights_file=options.weights_file,
        config=config,
        exits=tuple(net.exits),
        macs_per_exit=tuple(costs.to_exit),
        thresholds=tuple(thresholds),
        how=how,
        confidence=confidence,
        precision=precision,
        device=str(device),
        engine_mode=mode,
    )


@dataclass
class Session:
    """A loaded network with its early-exit engine and input transform (from a `Plan`)."""

    plan: Plan
    net: torch.nn.Module
    engine: EarlyExitEngine
    transform: Any = field(repr=False)

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def spec(self) -> InputSpec:
        return self.plan.input_spec

    def classify(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """[C, H, W] inputs run as one batch (the engine applies the precision) -> one dict per
        image: class, class_name, confidence, exit (1-based), block, macs."""
        result = self.engine(torch.stack(images).to(self.device))
        names, exits, macs = self.plan.class_names, self.plan.exits, self.plan.macs_per_exit
        columns = (result.predictions, result.confidence, result.exit_index)
        return [
            {
                "class": c,
                "class_name": names[c] if names else str(c),
                "confidence": conf,
                "exit": k + 1,
                "block": exits[k],
                "macs": macs[k],
            }
            for c, conf, k in zip(*(t.tolist() for t in columns), strict=True)
        ]


def checkpoint_transform(config: dict) -> Any:
    """The eval transform (PIL image -> [C, H, W]) recorded with a checkpoint (or an export)."""
    return eval_transform(InputSpec.of(config["input_spec"]), config.get("normalize", "backbone"))


def open_session(plan: Plan) -> Session:
    """Build `plan`'s network on its device and precision, with its engine and transform."""
    net, _ = load_trainable(plan.checkpoint, plan.weights_file)
    net.to(device=torch.device(plan.device), dtype=PRECISIONS[plan.precision][1])
    engine = EarlyExitEngine(
        net, plan.thresholds, plan.confidence, plan.precision, plan.engine_mode
    )
    return Session(plan, net, engine, checkpoint_transform(plan.config))
