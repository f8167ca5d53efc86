"""Write one ONNX graph per exit stage plus a manifest, so a runtime can exit early between them.

    stage_0.onnx ... stage_{K-1}.onnx   stage k: tokens in -> tokens out + exit k's logits
                                        (stage 0 takes images; the last gives logits only)
    manifest.json                       exits, MACs per exit, the run's budgets' thresholds,
                                        class names, input spec, confidence kind, stage I/O

Shapes are static but for the batch axis. TorchScript export (`dynamo=False`): a stage has no
data-dependent control flow, so tracing is exact. Files are written atomically (a planted
symlink is replaced, never written through).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from met_lightning.atomic import atomic_path, write_text
from met_lightning.errors import CheckpointError
from met_lightning.export.stages import ExitStage, stage_inputs
from met_lightning.inference.analysis import REPORT_FILE
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, check_confidence
from met_lightning.macs import model_exit_costs

FORMAT = "met_lightning.onnx_stages"
MANIFEST = "manifest.json"
OPSET = 17


def run_budgets(run_folder: Path | None) -> tuple[list[dict[str, Any]], str | None]:
    """(budgets with their selected thresholds, confidence kind) from a run's budget.json."""
    path = run_folder / REPORT_FILE if run_folder else None
    if path is None or not path.is_file():
        return [], None
    try:
        report = json.loads(path.read_text())
        budgets = [
            {
                "budget": b["budget"],
                "budget_macs": b["budget_macs"],
                "thresholds": b["selected"]["thresholds"],  # infinities as "inf" strings
                "label": b["selected"]["label"],
                "val_accuracy": b["selected"]["accuracy"],
                "val_mean_macs": b["selected"]["mean_macs"],
            }
            for b in report.get("budgets", [])
        ]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise CheckpointError(
            f"{path} is not a budget report ({type(err).__name__}: {err}); delete it to export "
            "without budgets, or run the budget analysis again"
        ) from None
    kind = report.get("confidence")
    return budgets, None if kind is None else check_confidence(kind, f"{path}: confidence")


def export_onnx(
    net: torch.nn.Module,
    config: dict,
    out: Path,
    run_folder: Path | None = None,
    confidence: str | None = None,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Write the stage graphs and manifest.json of `net` into `out`; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    spec = config["input_spec"]
    input_size = tuple(spec["input_size"])
    inputs = stage_inputs(net, input_size)
    stages = []
    for stage, example in enumerate(inputs):
        in_name = "images" if stage == 0 else "tokens"
        outputs = {"logits": [None, net.num_classes]}  # after the next stage's tokens, if any
        if stage < net.num_exits - 1:
            outputs = {"tokens_out": [None, *inputs[stage + 1].shape[1:]], **outputs}
        file = f"stage_{stage}.onnx"
        with torch.no_grad(), warnings.catch_warnings(), atomic_path(out / file) as tmp:
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                ExitStage(net, stage),
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[in_name],
                output_names=list(outputs),
                dynamic_axes={name: {0: "batch"} for name in [in_name, *outputs]},
                opset_version=opset,
            )
        blocks = net.stage_blocks(stage)
        stages.append(
            {
                "file": file,
                "exit": stage + 1,
                "blocks": [blocks[0] + 1, blocks[-1] + 1],
                "inputs": {in_name: [None, *example.shape[1:]]},
                "outputs": outputs,
            }
        )
    budgets, run_confidence = run_budgets(run_folder)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "backbone": config.get("backbone", {}).get("name"),
        "num_classes": net.num_classes,
        "class_names": config.get("class_names"),
        "exits": list(net.exits),
        "macs_per_exit": list(model_exit_costs(net).to_exit),
        "macs": "multiply-accumulates per image to reach each exit",
        "confidence": confidence or run_confidence or DEFAULT_CONFIDENCE,
        "budgets": budgets,
        "input": {
            "name": "images",
            "shape": [None, *input_size],
            "dtype": "float32",
            "input_spec": spec,
            "normalize": config.get("normalize", "backbone"),
        },
        "stages": stages,
        "opset": opset,
        "torch": torch.__version__,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
