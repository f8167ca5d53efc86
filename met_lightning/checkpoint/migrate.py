"""Old run folders through one door: what an earlier met_lightning recorded, in today's shape.

Both records of a run folder are read through `migrate`: the rebuild config of
trainable.safetensors (`trainable.read_trainable`) and config.yaml (`resume=`), so that the
network, its builders and the config checks know today's shape only. Earlier shapes:

- a top-level `method: {name}` and a `model` of switches only (before the node named its
  `_target_`s) become the node of conf/method/met.yaml. A LoRA adapter without `alpha` (older
  still) multiplied B A x by `scale` (null: 1) whatever the rank: MultiExitViT's `scale`, exactly;
- the budget callback's `_target_` from before it moved to `training/`.
"""

from __future__ import annotations

import copy
from typing import Any

from met_lightning.errors import CheckpointError

MODULE = "met_lightning.training.module.MultiExitClassifier"
NETWORK = "met_lightning.models.multi_exit_vit.MultiExitViT"
LOSS = "met_lightning.losses.multi_exit.MultiExitLoss"
# MultiExitViT's arguments that are adapter switches of the same name (conf/method/met.yaml `net`)
ADAPTER_ARGUMENTS = ("rank", "exit_specific", "separate_cls", "sites", "bits", "scale", "alpha")
# callback `_target_`s that moved: the recorded one -> today's
MOVED_TARGETS = {
    "met_lightning.inference.callback.BudgetAnalysis": (
        "met_lightning.training.budget_analysis.BudgetAnalysis"
    ),
}


def migrate(record: dict[str, Any], source: str) -> dict[str, Any]:
    """`record` (a rebuild config or a run's config.yaml, as plain data) in today's shape: a new
    dict, or `record` itself if it has today's shape already. CheckpointError naming `source` if
    an earlier shape lacks what its network needs."""
    if not isinstance(record, dict):
        return record  # not ours: the caller's checks name it
    migrated = copy.deepcopy(record)
    model = migrated.get("model")
    if "method" in migrated and isinstance(model, dict) and not {"net", "_target_"} & set(model):
        migrated["model"] = _model_node(model, migrated.pop("method"), source)
        if "optimizer" in migrated:  # a config.yaml: the groups the node reads (${optimizer})
            migrated["model"]["optimizer"] = migrated["optimizer"]
            migrated["model"]["scheduler"] = migrated.get("scheduler")
    for callback in (migrated.get("callbacks") or {}).values():
        if isinstance(callback, dict) and callback.get("_target_") in MOVED_TARGETS:
            callback["_target_"] = MOVED_TARGETS[callback["_target_"]]
    return record if migrated == record else migrated


def _model_node(model: dict[str, Any], method: Any, source: str) -> dict[str, Any]:
    """Today's `model` node of a `model` of switches written before the node named targets."""
    try:
        recorded = model["adapter"]
        adapter = {"kind": "e_adapter", "bits": 32, "scale": None, "alpha": None, **recorded}
        if adapter["kind"] == "lora" and "alpha" not in recorded and adapter["scale"] is None:
            adapter["scale"] = 1.0
        switches = {
            "exits": model["exits"],
            "finetune_backbone": model.get("finetune_backbone", False),
            "token_layout": model.get("token_layout", "auto"),
        }
        arguments = {"adapter_kind": adapter["kind"], **{k: adapter[k] for k in ADAPTER_ARGUMENTS}}
    except (KeyError, TypeError) as err:
        raise CheckpointError(
            f"{source}: its recorded config does not build a network ({type(err).__name__}: "
            f"{err}, in a `model` node written before the node named its targets)"
        ) from None
    return {
        "_target_": MODULE,
        "name": method.get("name") if isinstance(method, dict) else None,
        **switches,
        "adapter": adapter,
        "net": {"_target_": NETWORK, "_partial_": True, **switches, **arguments},
        "loss": {"_target_": LOSS, "_partial_": True, **(model.get("loss") or {})},
        "compile": model.get("compile", False),
        "compile_mode": model.get("compile_mode"),
    }
