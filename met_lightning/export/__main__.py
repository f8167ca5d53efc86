"""`python -m met_lightning.export checkpoint=RUN format=onnx out=DIR` (conf/export.yaml)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from met_lightning.checkpoint import load_trainable
from met_lightning.cli import check_writable, hydra_app, user_task
from met_lightning.errors import ConfigError
from met_lightning.export.onnx_export import export_onnx
from met_lightning.inference.confidence import check_confidence
from met_lightning.inference.session import CheckpointOptions, run_folder, typed_options

FORMATS = ("onnx",)


@dataclass
class ExportOptions(CheckpointOptions):
    """`python -m met_lightning.export` (conf/export.yaml selects these defaults)."""

    # onnx: stage_0.onnx ... stage_{K-1}.onnx (one graph per exit stage) and manifest.json
    format: str = "onnx"
    # the folder to write
    out: str = MISSING
    # confidence recorded in the manifest (default: the run's budget.json's, else max_softmax)
    confidence: str | None = None
    opset: int = 17


ConfigStore.instance().store(name="export_options", node=ExportOptions)


def export(cfg: DictConfig) -> dict:
    """Check the config, load the checkpoint, write the export; return the manifest."""
    cfg = typed_options(cfg, ExportOptions, "export")
    if OmegaConf.is_missing(cfg, "checkpoint") or OmegaConf.is_missing(cfg, "out"):
        raise ConfigError("give checkpoint=RUN_FOLDER_OR_FILE and out=FOLDER")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} must be one of {list(FORMATS)}")
    if cfg.confidence is not None:
        check_confidence(cfg.confidence)
    check_writable(cfg.out, "out")
    if importlib.util.find_spec("onnxruntime") is None:  # the [onnx] extra: the runner needs it
        raise ConfigError("ONNX export needs onnx: pip install 'met_lightning[onnx]'")
    net, config = load_trainable(cfg.checkpoint, cfg.weights_file)
    folder = run_folder(cfg.checkpoint)
    manifest = export_onnx(net, config, Path(cfg.out), folder, cfg.confidence, cfg.opset)
    print(
        f"wrote {len(manifest['stages'])} stage graphs and manifest.json to {cfg.out} "
        f"(exits {manifest['exits']}, {len(manifest['budgets'])} budgets)"
    )
    return manifest


_task = user_task(export)
main = partial(hydra_app, "export", _task)  # the console entry point `met-export`


if __name__ == "__main__":
    main()
