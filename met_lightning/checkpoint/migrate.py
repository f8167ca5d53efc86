"""Old run folders through one door: what an earlier met_lightning recorded, in today's shape.

Both records of a run folder are read through `migrate`: the rebuild config of
trainable.safetensors (`trainable.read_trainable`) and config.yaml (`resume=`); the overrides a
run recorded through `migrate_override`. The network, its builders and the config checks know
today's shape only. Earlier shapes of the `model` node:

- a top-level `method: {name}` and a `model` of switches only (exits, finetune_backbone,
  token_layout, adapter, loss, compile): before the node named its `_target_`s;
- those switches at the top of the `model` node and mirrored, flat, into `model.net` (`rank`,
  `adapter_kind`, ...): before they moved into `model.net` and `model.net.adapter`.

A LoRA adapter recorded with `scale` multiplied B A x by it (null: 1, when there was no `alpha`
yet) whatever the rank: it becomes `alpha = scale x rank`, the same multiplier alpha / rank.
Also the budget callback's `_target_` from before it moved to `training/`.
"""

from __future__ import annotations

import copy
from typing import Any

from met_lightning.errors import CheckpointError

MODULE = "met_lightning.training.module.MultiExitClassifier"
NETWORK = "met_lightning.models.multi_exit_vit.MultiExitViT"
LOSS = "met_lightning.losses.multi_exit.MultiExitLoss"
# keys of the `model` node that moved into `model.net` (the old spelling -> today's)
MOVED_KEYS = {
    f"model.{key}": f"model.net.{key}"
    for key in ("exits", "adapter", "finetune_backbone", "token_layout")
}
SWITCHES = tuple(key.split(".", 1)[1] for key in MOVED_KEYS)  # exits, adapter, ...
# callback `_target_`s that moved: the recorded one -> today's
MOVED_TARGETS = {
    "met_lightning.inference.callback.BudgetAnalysis": (
        "met_lightning.training.budget_analysis.BudgetAnalysis"
    ),
}


def moved_key(key: str) -> str | None:
    """Today's spelling of `key` if it lies under a key that moved (`MOVED_KEYS`), else None."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(f"{old}."):
            return new + key[len(old) :]
    return None


def migrate_override(override: str) -> str:
    """A recorded command-line override (`model.adapter.rank=4`) in today's spelling."""
    key, sep, value = override.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    new = moved_key(key.lstrip("+~")) if sep else None
    return f"{prefix}{new}={value}" if new else override


def migrate(record: dict[str, Any], source: str) -> dict[str, Any]:
    """`record` (a rebuild config or a run's config.yaml, as plain data) in today's shape: a new
    dict, or `record` itself if it has today's shape already. CheckpointError naming `source` if
    an earlier shape lacks what its network needs."""
    if not isinstance(record, dict):
        return record  # not ours: the caller's checks name it
    migrated = copy.deepcopy(record)
    model = migrated.get("model")
    targetless = "method" in migrated and not {"net", "_target_"} & set(model or {})
    if isinstance(model, dict) and ("adapter" in model or targetless):  # switches on top
        method = migrated.pop("method", None)
        migrated["model"] = _model_node(model, method, source)
        if not {"net", "_target_"} & set(model) and "optimizer" in migrated:  # a config.yaml
            migrated["model"]["optimizer"] = migrated["optimizer"]
            migrated["model"]["scheduler"] = migrated.get("scheduler")
    for callback in (migrated.get("callbacks") or {}).values():
        if isinstance(callback, dict) and callback.get("_target_") in MOVED_TARGETS:
            callback["_target_"] = MOVED_TARGETS[callback["_target_"]]
    return record if migrated == record else migrated


def _model_node(model: dict[str, Any], method: Any, source: str) -> dict[str, Any]:
    """Today's `model` node of one whose switches (exits, adapter, ...) sit at its top."""
    try:
        recorded = model["adapter"]
        adapter = {"kind": "e_adapter", "bits": 32, "scale": None, "alpha": None, **recorded}
        if adapter["kind"] == "lora" and (adapter["scale"] is not None or "alpha" not in recorded):
            multiplier = 1.0 if adapter["scale"] is None else float(adapter["scale"])
            adapter.update(alpha=multiplier * int(adapter["rank"]), scale=None)
        net = {
            "_target_": NETWORK,
            "_partial_": True,
            "exits": model["exits"],
            "adapter": adapter,
            "finetune_backbone": model.get("finetune_backbone", False),
            "token_layout": model.get("token_layout", "auto"),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{source}: its recorded config does not build a network ({type(err).__name__}: "
            f"{err}, in a `model` node written before model.net held the adapter)"
        ) from None
    name = method.get("name") if isinstance(method, dict) else model.get("name")
    node = {k: v for k, v in model.items() if k not in ("net", "name", *SWITCHES)}
    node.setdefault("_target_", MODULE)
    loss = {k: v for k, v in (model.get("loss") or {}).items() if not k.startswith("_")}
    return {
        **node,
        "name": name,
        "net": net,
        "loss": {"_target_": LOSS, "_partial_": True, **loss},
        "compile": model.get("compile", False),
        "compile_mode": model.get("compile_mode"),
    }
