"""Training entry: `python -m met_lightning [overrides]` (a Hydra app; the demo by default)."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from met_lightning import checkpoint as ckpt
from met_lightning.atomic import write_text
from met_lightning.cli import exit_on_user_error, hydra_app, user_error
from met_lightning.cluster import check_world_size, resume_requeued
from met_lightning.config import check_moved_overrides, validate_config
from met_lightning.data.base import InputSpec, build_datamodule
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.training.budget_analysis import BudgetAnalysis
from met_lightning.training.loggers import build_loggers, finish_wandb, rewind_csv
from met_lightning.training.summary import report_summary

log = logging.getLogger(__name__)

# The frozen backbone is in eval mode on purpose; the run folder holds config.yaml before metrics.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# epoch values are logged after torchmetrics has synced them across processes
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


def instantiate_model(
    model: DictConfig, backbone: nn.Module, num_classes: int
) -> L.LightningModule:
    """The LightningModule of `model._target_` around `backbone`, completing the partials
    `model.net` (backbone, number of classes) and `model.loss` (number of exits)."""
    net = instantiate(model.net)(backbone=backbone, num_classes=num_classes)
    loss = instantiate(model.loss)(num_exits=net.num_exits)
    plain = OmegaConf.to_container(model, resolve=True)  # untyped: `net` becomes a module
    return instantiate(plain, net=net, loss=loss)


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path!r} does not exist; give a Lightning .ckpt file"
        )
    ckpt.load_lightning_checkpoint(ckpt_path)  # corrupt or unsafe: fails now, before the build
    return str(ckpt_path)


def rebuild_config(
    cfg: DictConfig,
    num_classes: int,
    input_spec: InputSpec,
    datamodule: Any = None,
    fingerprint: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a trainable checkpoint records to rebuild its network without the training config:
    `model` is the resolved `model` node without the training-only optimizer / scheduler."""
    container = OmegaConf.to_container(cfg, resolve=True)
    class_names = getattr(datamodule, "class_names", None)
    model = {k: v for k, v in container["model"].items() if k not in ("optimizer", "scheduler")}
    return {
        "model": model,
        "backbone": container["backbone"],
        "num_classes": num_classes,
        "input_spec": asdict(input_spec),
        "class_names": list(class_names) if class_names is not None else None,
        # the eval-time input normalization (data.normalize), for predict
        "normalize": getattr(datamodule, "normalize", "backbone"),
        # a backbone with random weights is rebuilt from this seed (train() builds it first)
        "seed": cfg.seed,
        # timm name and weights hash of the backbone as built, checked by load_trainable
        ckpt.FINGERPRINT_KEY: fingerprint,
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, build, fit, test, export the trainable weights and print the summary."""
    if ENV_FILE is not None:
        log.info("environment variables loaded from %s (set ones win)", ENV_FILE)
    validate_config(cfg)
    check_world_size(cfg)
    resume_requeued(cfg)  # a requeued Slurm job goes on from its last.ckpt
    output_dir = Path(cfg.paths.output_dir)
    resumed_step, relocate = None, None
    if cfg.get("resume"):  # before config.yaml is written: it is compared with the run's own
        point = ckpt.resume_checkpoint(cfg)
        ckpt_path, resumed_step, relocate = point.checkpoint, point.global_step, point.relocate
        log.info("resuming %s from %s (step %d)", output_dir, ckpt_path, resumed_step)
        if rank_zero_only.rank == 0:  # what the kill left behind after last.ckpt
            ckpt.remove_stale_files(point)
    else:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    # the backbone's input size and normalization, from its config (meta device, no weights)
    input_spec = InputSpec.from_backbone_config(cfg.backbone)
    datamodule = build_datamodule(cfg.data, input_spec)  # bad data fails here, before the backbone
    if rank_zero_only.rank == 0:
        write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    backbone = instantiate(cfg.backbone)  # first, right after seeding: see load_trainable
    # hashed as built, before the method wraps or trains any of it
    fingerprint = ckpt.backbone_fingerprint(backbone, cfg.backbone.name)
    module = instantiate_model(cfg.model, backbone, datamodule.num_classes)
    log.info("trainable parameters: %d of %d", module.num_trainable, module.num_total)

    loggers = build_loggers(cfg.get("logger"))
    try:
        group = cfg.get("callbacks") or {}
        callbacks = [instantiate(c) for c in group.values() if c and "_target_" in c]
        if not loggers:  # nothing to report learning rates to
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        safe_io = ckpt.SafeCheckpointIO(relocate=relocate, confine=ckpt.checkpoint_folders(cfg))
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[safe_io],
        )
        if resumed_step is not None:  # rows logged after the checkpoint are logged again
            rewind_csv(loggers, resumed_step)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        analysis = next((c for c in callbacks if isinstance(c, BudgetAnalysis)), None)
        metrics, best = fit_and_test(trainer, module, datamodule, ckpt_path, cfg.get("test", True),
                                     validate_first=analysis is not None)  # fmt: skip
        weights = exported_weights(trainer, best, output_dir)
        if analysis is not None:  # budget/* values can be a sweep's optimized_metric
            metrics.update(analysis.metrics)
        if trainer.is_global_zero:
            ckpt.save_trainable(
                module.net,
                output_dir / ckpt.FILENAME,
                rebuild_config(cfg, datamodule.num_classes, input_spec, datamodule, fingerprint),
                weights=weights,
            )
            report_summary(module.net, metrics, output_dir, analysis.report if analysis else None,
                           method=cfg.model.name, weights=weights)  # fmt: skip
            log.info("run folder: %s", output_dir)
    finally:
        finish_wandb(loggers)
    return {k: float(v) for k, v in metrics.items()}


def fit_and_test(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
    test: bool,
    validate_first: bool,
) -> tuple[dict[str, Any], str | None]:
    """Fit, then load the best checkpoint (the exported weights) into `module`: by
    `trainer.test` if `test` (after `trainer.validate` if `validate_first`, for the budget
    analysis), else by `trainer.validate` (val metrics of the exported epoch). Returns (metrics,
    the best checkpoint or None: the last epoch's weights)."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = dict(trainer.callback_metrics)
    checkpoint = trainer.checkpoint_callback
    best = (checkpoint.best_model_path if checkpoint is not None else "") or None
    if best is not None and not Path(best).is_file():
        log.warning("the best checkpoint %s does not exist: testing and exporting the last "
                    "epoch's weights instead", best)  # fmt: skip
        best = None
    if (test and validate_first) or (not test and best is not None):
        # test: held-out logits of the tested weights, for calibration; else: the best weights
        trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update(trainer.callback_metrics)
    if test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best)
        metrics.update(trainer.callback_metrics)
    return metrics, best


def exported_weights(trainer: L.Trainer, best: str | None, run_dir: Path) -> dict[str, Any]:
    """Which weights the run exports: the best checkpoint's (named relative to the run folder if
    inside it; "latest checkpoint" if its callback monitors nothing) or the last epoch's."""
    if best is None:
        return {
            "source": "last epoch",
            "checkpoint": None,
            "epoch": trainer.current_epoch - 1,  # fit ends with the epoch counter past the last
            "global_step": trainer.global_step,
        }
    # Lightning has just loaded it (validate / test): only its progress fields are read here
    epoch, global_step = ckpt.checkpoint_progress(best) or (-1, -1)
    score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    monitor = getattr(trainer.checkpoint_callback, "monitor", None)
    resolved, root = Path(best).resolve(), Path(run_dir).resolve()
    name = resolved.relative_to(root) if resolved.is_relative_to(root) else Path(best)
    return {
        "source": "best checkpoint" if monitor is not None else "latest checkpoint",
        "checkpoint": name.as_posix(),
        "epoch": epoch,
        "global_step": global_step,
        "monitor": monitor,
        "score": None if score is None else float(score),
    }


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _task(cfg: DictConfig) -> float | None:
    """`train`, returning `optimized_metric`. In a multirun job a user error is logged as one line
    and raised, never `sys.exit`, so the sweeper's failure handling applies (Optuna: a failed
    trial, within max_failure_rate)."""
    multirun = is_multirun()
    if not multirun:
        metrics = exit_on_user_error(lambda: train(cfg))
    elif cfg.get("resume"):
        raise ConfigError("resume= continues a single run, not a multirun job (drop -m)")
    else:
        try:
            metrics = train(cfg)
        except Exception as err:
            if (cause := user_error(err)) is not None:
                log.error("error: %s", cause)
            raise
    metric = cfg.get("optimized_metric")
    if metric and metric not in metrics:
        message = f"optimized_metric={metric!r} is not among this run's metrics: {sorted(metrics)}"
        if multirun:  # a failed job, not the end of the whole sweep
            raise ConfigError(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return metrics.get(metric) if metric else None


ENV_FILE: Path | None = None  # the `.env` file `main` loaded, logged by `train`


def env_file() -> Path | None:
    """The `.env` to load: the working directory's own, else the source checkout's (next to its
    pyproject.toml); never one found in a parent folder, which may belong to someone else."""
    checkout = Path(__file__).resolve().parents[1]
    candidates = [Path.cwd() / ".env"]
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / ".env")
    return next((path for path in candidates if path.is_file()), None)


def main() -> None:
    """Console entry point: load `.env`, then run the Hydra app (`resume=RUN_DIR` brings in the
    run's own overrides and folder, met_lightning.checkpoint.resume)."""
    global ENV_FILE
    ENV_FILE = env_file()
    if ENV_FILE is not None:
        load_dotenv(ENV_FILE, override=False)
    exit_on_user_error(lambda: check_moved_overrides(sys.argv[1:]))
    sys.argv = exit_on_user_error(lambda: ckpt.resume_argv(sys.argv))
    hydra_app("train", _task)


if __name__ == "__main__":
    main()
