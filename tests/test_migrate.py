"""`checkpoint.migrate`: every earlier shape of a run folder's records in today's, and only there
(the end-to-end loads and resumes: test_lora_alpha, test_methods, security/test_run_folder,
reliability/test_resume_legacy)."""

from __future__ import annotations

import copy

import pytest

from met_lightning.checkpoint.migrate import MOVED_TARGETS, migrate, migrate_override
from met_lightning.errors import CheckpointError

ADAPTER = {"kind": "e_adapter", "rank": 4, "exit_specific": True, "separate_cls": True,
           "sites": ["attn", "mlp"]}  # fmt: skip


def legacy(**adapter) -> dict:
    """A rebuild config written before the `model` node named its targets (no bits / alpha /
    token_layout yet): the defaults are what the network did then."""
    return {
        "method": {"name": "met"},
        "model": {"exits": [1, 2], "finetune_backbone": False, "adapter": {**ADAPTER, **adapter},
                  "loss": {"graph_weight": 0.1}},
        "num_classes": 3,
    }  # fmt: skip


NET = {
    "_target_": "met_lightning.models.multi_exit_vit.MultiExitViT", "_partial_": True,
    "exits": [1, 2], "finetune_backbone": False, "token_layout": "auto",
    "adapter": {**ADAPTER, "bits": 32, "scale": None, "alpha": None},
}  # fmt: skip


def mirrored(**adapter) -> dict:
    """A config written while the method's switches sat at the top of the `model` node and were
    mirrored, flat, into `model.net` (before they moved into model.net and model.net.adapter)."""
    adapter = {**ADAPTER, "bits": 32, "scale": None, "alpha": None, **adapter}
    switches = {"exits": [1, 2], "finetune_backbone": False, "token_layout": "auto"}
    flat = {k: v for k, v in adapter.items() if k != "kind"}
    return {
        "model": {
            "_target_": "met_lightning.training.module.MultiExitClassifier", "name": "met",
            **switches, "adapter": adapter,
            "net": {"_target_": NET["_target_"], "_partial_": True, **switches,
                    "adapter_kind": adapter["kind"], **flat},
            "loss": {"_target_": "met_lightning.losses.multi_exit.MultiExitLoss",
                     "_partial_": True, "graph_weight": 0.1},
            "compile": False, "compile_mode": None,
        },
        "num_classes": 3,
    }  # fmt: skip


@pytest.mark.parametrize("shape", [legacy, mirrored])
def test_earlier_nodes_become_todays_with_the_defaults_they_ran(shape):
    record = shape()
    before = copy.deepcopy(record)
    model = migrate(record, "x")["model"]
    assert record == before  # the record read is not changed
    assert set(model) == {"_target_", "name", "net", "loss", "compile", "compile_mode"}
    assert model["name"] == "met" and model["net"] == NET
    assert model["loss"]["_target_"].endswith("MultiExitLoss") and model["loss"]["_partial_"]
    assert model["loss"]["graph_weight"] == 0.1
    today = migrate(record, "x")
    assert migrate(today, "x") is today  # today's shape: returned as it is


@pytest.mark.parametrize("shape", [legacy, mirrored])
@pytest.mark.parametrize(
    "adapter, alpha",
    [
        ({"scale": None}, 1.0 * 4),  # before alpha: null was 1, whatever the rank
        ({"scale": 0.5}, 0.5 * 4),  # the multiplier itself: alpha / rank = 0.5
        ({"scale": None, "alpha": 16.0}, 16.0),  # written with alpha: alpha / rank
    ],
)
def test_lora_keeps_its_multiplier(shape, adapter, alpha):
    if shape is mirrored and "alpha" not in adapter:
        adapter = {**adapter, "scale": adapter["scale"] or 1.0}  # what migrate gave it then
    record = shape(**{**adapter, "kind": "lora", "exit_specific": False, "sites": ["q"]})
    migrated = migrate(record, "x")["model"]["net"]["adapter"]
    assert (migrated["kind"], migrated["scale"], migrated["alpha"]) == ("lora", None, alpha)


@pytest.mark.parametrize(
    "override, today",
    [
        ("model.adapter.rank=4", "model.net.adapter.rank=4"),
        ("model.exits=[6,12]", "model.net.exits=[6,12]"),
        ("++model.finetune_backbone=true", "++model.net.finetune_backbone=true"),
        ("model.token_layout=joint", "model.net.token_layout=joint"),
        ("model.adapters=x", "model.adapters=x"),  # not a moved key: unchanged
        ("model.loss.graph_weight=0", "model.loss.graph_weight=0"),
        ("method=lora", "method=lora"),
    ],
)
def test_recorded_overrides_get_todays_spelling(override, today):
    assert migrate_override(override) == today


def test_moved_callbacks_name_todays_module_and_todays_shape_is_returned_as_is():
    ((old, new),) = MOVED_TARGETS.items()
    record = {"model": migrate(legacy(), "x")["model"], "callbacks": {
        "budget_analysis": {"_target_": old, "budgets": [0.5]}, "off": None}}  # fmt: skip
    migrated = migrate(record, "x")
    assert migrated["callbacks"] == {"budget_analysis": {"_target_": new, "budgets": [0.5]},
                                     "off": None}  # fmt: skip
    assert migrate(migrated, "x") is migrated


@pytest.mark.parametrize(
    "model, named",
    [
        ({"exits": [2]}, "KeyError: 'adapter'"),
        ({"adapter": ADAPTER}, "KeyError: 'exits'"),
        ({"exits": [2], "adapter": {"kind": "lora"}}, "KeyError: 'rank'"),
        ({"exits": [2], "adapter": ["lora"]}, "TypeError"),
    ],
)
def test_a_legacy_node_without_its_switches_is_one_error(model, named):
    with pytest.raises(CheckpointError, match="does not build a network") as err:
        migrate({"method": {"name": "met"}, "model": model}, "checkpoint 'f'")
    message = str(err.value)
    assert message.startswith("checkpoint 'f': ") and named in message and "\n" not in message
