"""`checkpoint.migrate`: every earlier shape of a run folder's records in today's, and only there
(the end-to-end loads and resumes: test_lora_alpha, test_methods, security/test_run_folder,
reliability/test_resume_legacy)."""

from __future__ import annotations

import copy

import pytest

from met_lightning.checkpoint.migrate import MOVED_TARGETS, migrate
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


def test_the_legacy_node_becomes_todays_with_the_defaults_it_ran():
    record = legacy()
    before = copy.deepcopy(record)
    model = migrate(record, "x")["model"]
    assert record == before  # the record read is not changed
    assert model["name"] == "met" and model["token_layout"] == "auto"
    assert model["net"] == {
        "_target_": "met_lightning.models.multi_exit_vit.MultiExitViT", "_partial_": True,
        "exits": [1, 2], "finetune_backbone": False, "token_layout": "auto",
        "adapter_kind": "e_adapter", "rank": 4, "exit_specific": True, "separate_cls": True,
        "sites": ["attn", "mlp"], "bits": 32, "scale": None, "alpha": None,
    }  # fmt: skip
    assert model["loss"]["_target_"].endswith("MultiExitLoss") and model["loss"]["_partial_"]
    assert migrate(migrate(record, "x"), "x")["model"] == model  # today's shape: unchanged


@pytest.mark.parametrize(
    "adapter, scale, alpha",
    [
        ({"scale": None}, 1.0, None),  # before alpha: null was 1, whatever the rank
        ({"scale": 0.3}, 0.3, None),  # the multiplier itself, exactly
        ({"scale": None, "alpha": 16.0}, None, 16.0),  # written with alpha: alpha / rank
    ],
)
def test_lora_keeps_its_multiplier(adapter, scale, alpha):
    record = legacy(**{**adapter, "kind": "lora", "exit_specific": False, "sites": ["q"]})
    net = migrate(record, "x")["model"]["net"]
    assert (net["adapter_kind"], net["scale"], net["alpha"]) == ("lora", scale, alpha)


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
        ({"exits": [2], "adapter": {"kind": "none"}}, "KeyError: 'rank'"),
        ({"exits": [2], "adapter": ["lora"]}, "TypeError"),
    ],
)
def test_a_legacy_node_without_its_switches_is_one_error(model, named):
    with pytest.raises(CheckpointError, match="does not build a network") as err:
        migrate({"method": {"name": "met"}, "model": model}, "checkpoint 'f'")
    message = str(err.value)
    assert message.startswith("checkpoint 'f': ") and named in message and "\n" not in message
