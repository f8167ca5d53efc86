"""Early exit in ONNX Runtime over the stage graphs written by `export_onnx`.

    runner = OrtEarlyExit("exported/", budget=0.5)   # or thresholds=[...], or neither (no exit)
    result = runner(images)                          # images: float32 [B, C, H, W], transformed
    result.predictions, result.exit_index            # as the PyTorch EarlyExitEngine gives

The stages run in the engine's loop (`engine.early_exit`); `runner.transform` is the model's eval
transform (PIL image -> [C, H, W]). The export folder is data: the manifest is checked before
anything is loaded (each stage graph a plain file in the folder, no symlink leading out), and no
graph may read weights from outside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from met_lightning.data.transforms import NORMALIZATIONS
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.export.onnx_export import FORMAT, MANIFEST
from met_lightning.inference.confidence import CONFIDENCE_KINDS, check_confidence
from met_lightning.inference.engine import EarlyExitResult, answer, check_thresholds, early_exit
from met_lightning.inference.session import checkpoint_transform

MAX_MANIFEST_BYTES = 8 << 20  # a manifest is kilobytes (class names included)
EXPORT_HINT = "export again with python -m met_lightning.export checkpoint=RUN out=FOLDER"


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest.json of an export folder, checked (`check_manifest`)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: export with python -m met_lightning.export")
    with open(path, "rb") as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise CheckpointError(
            f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest of "
            f"met_lightning.export; {EXPORT_HINT}"
        )
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid JSON ({err}); {EXPORT_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a met_lightning ONNX export ({FORMAT})")
    check_manifest(manifest, path)
    return manifest


def _bad(path: Path, key: str, value: Any, what: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointError(f"{path}: {key}={shown} {what}; {EXPORT_HINT}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_threshold(value: Any) -> bool:
    """A number or a string float() reads ("inf", "-inf": how JSON holds infinities), not NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isnan(float(value))
    except ValueError:
        return False


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """CheckpointError naming `path`, the key and the fix unless every field the runner uses is as
    `export_onnx` writes it."""
    exits = manifest.get("exits")
    if not (
        isinstance(exits, list)
        and exits
        and all(_is_int(e) and e > 0 for e in exits)
        and exits == sorted(set(exits))
    ):
        raise _bad(path, "exits", exits, "must be a non-empty list of increasing block numbers")
    k = len(exits)
    stages = manifest.get("stages")
    if not isinstance(stages, list):
        raise _bad(path, "stages", stages, "must be a list of stage graphs")
    if len(stages) != k:
        raise CheckpointError(
            f"{path}: stages lists {len(stages)} graphs but exits lists {k} exits: every exit "
            f"needs its stage graph; {EXPORT_HINT}"
        )
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise _bad(path, f"stages[{i}]", stage, "must be an object with a 'file'")
        stage_file(path.parent, path, i, stage.get("file"))
    kind = manifest.get("confidence")
    if kind not in CONFIDENCE_KINDS:
        raise _bad(path, "confidence", kind, f"must be one of {list(CONFIDENCE_KINDS)}")
    budgets = manifest.get("budgets")
    if not isinstance(budgets, list):
        raise _bad(path, "budgets", budgets, "must be a list")
    for i, entry in enumerate(budgets):
        if not isinstance(entry, dict) or not _is_number(entry.get("budget")):
            raise _bad(path, f"budgets[{i}]", entry, "must be an object with a number 'budget'")
        values = entry.get("thresholds")
        if not (
            isinstance(values, list)
            and len(values) in (k - 1, k)
            and all(_is_threshold(t) for t in values)
        ):
            what = f"must list {k - 1} or {k} thresholds (numbers, 'inf' or '-inf'), one per exit"
            raise _bad(path, f"budgets[{i}].thresholds", values, what)
    given = manifest.get("input")
    if not isinstance(given, dict):
        raise _bad(path, "input", given, "must be an object with 'input_spec' and 'normalize'")
    spec = given.get("input_spec")
    size = spec.get("input_size") if isinstance(spec, dict) else None
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v) and v > 0 for v in size)):
        raise _bad(path, "input.input_spec.input_size", size, "must be [C, H, W], positive")
    for name in ("mean", "std"):
        values = spec.get(name)
        if not (isinstance(values, list) and values and all(_is_number(v) for v in values)):
            raise _bad(path, f"input.input_spec.{name}", values, "must be a list of numbers")
    if not all(spec["std"]):
        raise _bad(path, "input.input_spec.std", spec["std"], "must not be 0")
    if not isinstance(spec.get("interpolation", "bicubic"), str):
        raise _bad(path, "input.input_spec.interpolation", spec["interpolation"], "must be a name")
    normalize = given.get("normalize")
    if not isinstance(normalize, bool) and normalize not in NORMALIZATIONS:
        raise _bad(path, "input.normalize", normalize, f"must be one of {list(NORMALIZATIONS)}")


def stage_file(folder: Path, path: Path, index: int, name: Any) -> Path:
    """The graph file `name` of stage `index`: a plain file name, a regular file in `folder`."""
    key = f"stages[{index}].file"
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or os.path.isabs(name)
        or os.path.splitdrive(name)[0]
    ):
        raise _bad(path, key, name, f"must be the plain name of a graph file in {folder}")
    file = folder / name
    root, real = os.path.realpath(folder), os.path.realpath(file)
    if os.path.commonpath([root, real]) != root or real == root:
        raise _bad(path, key, name, f"is a symlink to {real}, outside {folder}")
    if not os.path.isfile(real):
        raise _bad(path, key, name, f"is not a file in {folder} (missing?)")
    return file


def _check_external_data(file: Path, folder: Path, where: str) -> None:
    """Refuse a graph whose weights name a file outside `folder` (ORT < 1.24 reads any path)."""
    try:  # the [onnx] extra
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    except ImportError:
        raise ConfigError("the ONNX runner needs onnx: pip install 'met_lightning[onnx]'") from None

    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf decoding fails in many ways
        raise CheckpointError(
            f"{file} ({where}) is not an ONNX graph ({_first_line(err)}); {EXPORT_HINT}"
        ) from None
    root = os.path.realpath(folder)
    for tensor in filter(uses_external_data, _get_all_tensors(model)):
        location = ExternalDataInfo(tensor).location
        real = os.path.realpath(os.path.join(root, location))
        if os.path.isabs(location) or os.path.commonpath([root, real]) != root:
            raise CheckpointError(
                f"{file} ({where}): tensor {tensor.name!r} reads its data from {location!r}, "
                f"outside {folder}: refused; {EXPORT_HINT}"
            )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        import onnxruntime as ort  # the [onnx] extra

        folder = Path(folder)
        self.manifest = manifest = load_manifest(folder)
        k = len(manifest["exits"])
        if thresholds is not None and budget is not None:
            raise ConfigError("give either budget= or thresholds=, not both")
        if budget is not None:  # the thresholds the manifest lists for one of the run's budgets
            listed = {b["budget"]: b["thresholds"] for b in manifest["budgets"]}
            match = [t for b, t in listed.items() if math.isclose(b, float(budget))]
            if not match:
                message = f"budget={budget} is not one of the exported run's budgets {list(listed)}"
                raise ConfigError(message)
            thresholds = [float(t) for t in match[0]]
        if thresholds is None:
            thresholds = [math.inf] * k  # no early exit
        self.thresholds = check_thresholds(thresholds, k)
        self.kind = check_confidence(confidence_kind or manifest["confidence"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        path = folder / MANIFEST
        files = [stage_file(folder, path, i, s["file"]) for i, s in enumerate(manifest["stages"])]
        for i, file in enumerate(files):  # every graph checked before any is loaded
            _check_external_data(file, folder, f"stages[{i}] of {path}")
        self.sessions = []
        for i, file in enumerate(files):
            where = f"stages[{i}] of {path}"
            try:
                session = ort.InferenceSession(str(file), options, providers=list(providers))
            except Exception as err:  # noqa: BLE001 - ONNX Runtime's error classes vary
                raise CheckpointError(
                    f"{file} ({where}) cannot be loaded by ONNX Runtime ({_first_line(err)}); "
                    f"{EXPORT_HINT}"
                ) from None
            self.sessions.append(session)
        self.input_names = [s.get_inputs()[0].name for s in self.sessions]
        self.transform = checkpoint_transform(manifest["input"])  # its input_spec and normalize

    def __call__(self, images: np.ndarray | torch.Tensor) -> EarlyExitResult:
        """images [B, C, H, W] -> the answer of each image's exit, by the engine's loop."""
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, dtype=np.float32)))
        limits = torch.tensor(self.thresholds, dtype=torch.float64)
        exit_index, (predictions, scores, logits) = early_exit(self._stage, x, limits)
        return EarlyExitResult(*(t.numpy() for t in (predictions, scores, exit_index, logits)))

    def _stage(self, k: int, x: torch.Tensor):
        """Stage graph k on the rows x: a stage of `engine.early_exit`, scored as the engine's."""
        outputs = self.sessions[k].run(None, {self.input_names[k]: x.numpy()})
        after = torch.from_numpy(outputs[0]) if len(outputs) > 1 else None
        return after, *answer(torch.from_numpy(outputs[-1]), self.kind)
