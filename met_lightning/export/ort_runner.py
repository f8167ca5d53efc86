"""Early exit in ONNX Runtime over the stage graphs written by `export_onnx`.

    runner = OrtEarlyExit("exported/", budget=0.5)   # or thresholds=[...], or neither (no exit)
    result = runner(images)                          # images: float32 [B, C, H, W], transformed
    result.predictions, result.exit_index            # as the PyTorch EarlyExitEngine gives

After each stage the rows whose confidence reaches the stage's threshold leave; only the others
go on to the next graph. `runner.transform` is the eval transform (PIL image -> [C, H, W]) the
model was trained with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.export.onnx_export import FORMAT, MANIFEST
from met_lightning.inference.confidence import check_confidence, confidence
from met_lightning.inference.engine import check_thresholds
from met_lightning.inference.session import checkpoint_input


class OrtResult(NamedTuple):
    predictions: np.ndarray  # [B] class index
    confidence: np.ndarray  # [B] confidence of the exit that answered
    exit_index: np.ndarray  # [B] 0-based exit that answered
    logits: np.ndarray  # [B, C] logits of that exit


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: export with python -m met_lightning.export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a met_lightning ONNX export ({FORMAT})")
    return manifest


def manifest_thresholds(manifest: dict, budget: float) -> list[float]:
    """The thresholds the manifest lists for `budget` (one of the run's budgets)."""
    for entry in manifest["budgets"]:
        if math.isclose(entry["budget"], float(budget)):
            return [float(t) for t in entry["thresholds"]]
    listed = [b["budget"] for b in manifest["budgets"]]
    raise ConfigError(f"budget={budget} is not one of the exported run's budgets {listed}")


class OrtEarlyExit:
    """ONNX Runtime early-exit inference over exported stage graphs (see module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        thresholds: Sequence[float] | None = None,
        budget: float | None = None,
        confidence_kind: str | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = manifest = load_manifest(folder)
        k = len(manifest["exits"])
        if thresholds is not None and budget is not None:
            raise ConfigError("give either budget= or thresholds=, not both")
        if budget is not None:
            thresholds = manifest_thresholds(manifest, budget)
        if thresholds is None:
            thresholds = [math.inf] * k  # no early exit
        self.thresholds = check_thresholds(thresholds, k)
        self.kind = check_confidence(confidence_kind or manifest["confidence"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = [
            ort.InferenceSession(str(folder / s["file"]), options, providers=list(providers))
            for s in manifest["stages"]
        ]
        self.input_names = [s.get_inputs()[0].name for s in self.sessions]
        given = manifest["input"]
        _, self.transform = checkpoint_input(
            {"input_spec": given["input_spec"], "normalize": given["normalize"]}
        )

    def __call__(self, images: np.ndarray | torch.Tensor) -> OrtResult:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        batch, last = x.shape[0], len(self.sessions) - 1
        predictions = np.empty(batch, dtype=np.int64)
        scores = np.empty(batch, dtype=np.float32)
        exit_index = np.empty(batch, dtype=np.int64)
        logits_out: np.ndarray | None = None
        alive = np.arange(batch)
        for stage, (session, name) in enumerate(zip(self.sessions, self.input_names, strict=True)):
            outputs = session.run(None, {name: x})
            logits = outputs[-1]
            if logits_out is None:
                logits_out = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
            conf = confidence(torch.from_numpy(logits), self.kind)  # as the engine scores
            if stage == last:
                leaving = np.ones(len(alive), dtype=bool)
            else:
                leaving = conf.double().numpy() >= self.thresholds[stage]
            rows = alive[leaving]
            predictions[rows] = logits[leaving].argmax(axis=-1)
            scores[rows] = conf.numpy()[leaving]
            exit_index[rows] = stage
            logits_out[rows] = logits[leaving]
            alive = alive[~leaving]
            if alive.size == 0:
                break
            x = np.ascontiguousarray(outputs[0][~leaving])
        return OrtResult(predictions, scores, exit_index, logits_out)
