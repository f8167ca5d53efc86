"""Test helpers: small random ViTs, composed (real) Hydra configs, CLI runs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import met_lightning.train  # noqa: F401 - the training app: registers its ConfigStore nodes
from met_lightning.checkpoint.resume import resume_argv
from met_lightning.cli import exit_on_user_error
from met_lightning.models.backbone import create_backbone
from met_lightning.paths import config_dir
from met_lightning.predict import _task as predict_task
from met_lightning.train import _task as train_task

REPO = Path(__file__).resolve().parents[1]
TINY_NAME = "vit_tiny_patch16_224"
TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2)
# CLI overrides that turn the demo backbone into the tiny random one above (fast tests) ...
TINY_BACKBONE = [
    "backbone.weights_file=null",
    *(f"backbone.model_kwargs.{k}={TINY_KWARGS[k]}" for k in ("embed_dim", "depth", "num_heads")),
]
# ... and with two exits
TINY_OVERRIDES = [*TINY_BACKBONE, "model.net.exits=[2,4]"]
# the six methods of conf/method/
METHODS = ["met", "linear_probe", "full_finetune", "adapter", "lora", "multi_exit_linear"]


def tiny_backbone(**overrides):
    """A frozen random 4-block ViT (width 48) on 32 px inputs."""
    return create_backbone(TINY_NAME, model_kwargs={**TINY_KWARGS, **overrides})


def counted_macs(fn, *args) -> float:
    """Multiply-accumulates torch counts while `fn(*args)` runs (no grad), for all images.

    Attention runs on the math SDPA backend: FlopCounterMode counts its matmuls on every torch,
    while the fused CPU kernel counts 0 FLOPs on some releases (2.14).
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() / 2


def run_split(run: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] as the run's model takes them, labels [N]) of a run folder's split,
    loaded by the run's own DataModule with the input spec its checkpoint records."""
    from hydra.utils import instantiate

    from met_lightning.checkpoint import read_trainable
    from met_lightning.data.base import InputSpec

    _, recorded = read_trainable(run)
    config = OmegaConf.load(run / "config.yaml")
    datamodule = instantiate(config.data, input_spec=InputSpec.of(recorded["input_spec"]))
    datamodule.setup()
    images, labels = getattr(datamodule, f"{split}_set").tensors
    return datamodule.prepare_batch(images), labels


# the module of each entry point, which registers its options (NAME_options) in the ConfigStore
ENTRY_MODULES = {
    "predict": "met_lightning.predict",
    "serve": "met_lightning.serve",
    "export": "met_lightning.export.__main__",
}


def entry_config(name: str, **values) -> DictConfig:
    """The options of an entry point (predict, serve, export) with `values` set, as the CLI
    composes them from conf/NAME.yaml (no Hydra run)."""
    import_module(ENTRY_MODULES[name])
    return OmegaConf.merge(ConfigStore.instance().load(f"{name}_options.yaml").node, values)


def predict_config(**values) -> DictConfig:
    """conf/predict.yaml with `values` set."""
    return entry_config("predict", **values)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real training config composed as `python -m met_lightning OVERRIDES` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


def legacy_model_config(cfg: DictConfig) -> dict:
    """(method, model) as a trainable checkpoint written before the `model` node named its
    `_target_`s records them: {"name"} and the method's switches without targets."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    loss = {k: v for k, v in model["loss"].items() if not k.startswith("_")}
    net = {k: model["net"][k] for k in ("exits", "finetune_backbone", "adapter")}
    compiled = {k: model[k] for k in ("compile", "compile_mode")}
    return {"name": model["name"]}, {**net, **compiled, "loss": loss}


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, module: str = "met_lightning", **env: str
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess (no wandb, no hub); MODULE: the training entry."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_folder(root: Path) -> Path:
    """The single run folder (the one with summary.json) under `root`."""
    folders = [p.parent for p in root.rglob("summary.json")]
    assert len(folders) == 1, folders
    return folders[0]


def compose_predict(args: list[str]):
    """The predict config composed as `python -m met_lightning.predict ARGS` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("predict", overrides=args)


# the console format of Hydra's job logging (a `python -m met_lightning` run logs so to stdout)
HYDRA_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@contextlib.contextmanager
def _captured(log_format: str = "%(message)s"):
    """stdout, stderr (+ the log as `log_format`) captured, the environment restored after
    (seed_everything sets PL_GLOBAL_SEED, ...); yields the two buffers and a list that the body
    fills with the exit code (0 unless it raises SystemExit)."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), [0]
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter(log_format))
    logging.getLogger().addHandler(handler)
    try:
        with (
            mock.patch.dict(os.environ),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            try:
                yield stdout, stderr, code
            except SystemExit as exit:
                code[0] = exit.code
    finally:
        logging.getLogger().removeHandler(handler)


def run_task(
    args: list[str],
    output_dir: Path,
    module: str = "met_lightning",
    log_format: str = "%(message)s",
) -> subprocess.CompletedProcess:
    """In-process `python -m MODULE ARGS`: the entry's Hydra task (`_task`: a user error prints
    `error: ...` and exits 2) on the config composed from ARGS; (exit code, stdout, stderr + log).
    The run folder is `output_dir` (or the paths.output_dir= / hydra.run.dir= in ARGS, or the
    folder of resume=). The log records are written as `log_format` (HYDRA_LOG_FORMAT: as the
    CLI writes them)."""
    with _captured(log_format) as (stdout, stderr, code):
        if module == "met_lightning":  # resume=RUN_DIR brings in the run's overrides, as main()
            args = exit_on_user_error(lambda: resume_argv([module, *args]))[1:]
            folder = ("paths.output_dir=", "hydra.run.dir=")
            given = [a.split("=", 1)[1].strip("'") for a in args if a.startswith(folder)]
            cfg = compose_config(args, Path(given[-1]) if given else output_dir)
            train_task(cfg)
        else:
            predict_task(compose_predict(args))
    return subprocess.CompletedProcess(
        [module, *args], code[0], stdout.getvalue(), stderr.getvalue()
    )


def run_main(args: list[str], module: str = "met_lightning") -> subprocess.CompletedProcess:
    """In-process `python -m MODULE ARGS` through the entry's `main()` itself: Hydra's own
    command-line parsing, composition and error report (exit code 1). For runs that stop before
    the task (a whole run in-process is `run_task`); the log handlers are restored after."""
    entry = import_module("met_lightning.train" if module == "met_lightning" else module)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    try:
        with mock.patch.object(sys, "argv", [module, *args]), _captured() as (stdout, stderr, code):
            os.environ.pop("HYDRA_FULL_ERROR", None)  # as run_cli: Hydra's short report
            entry.main()
    finally:
        root.handlers[:], root.level = handlers, level
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(
        [module, *args], code[0], stdout.getvalue(), stderr.getvalue()
    )
