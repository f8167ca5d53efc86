"""A run folder written before the `model` node named its `_target_`s (issue 15) and before the
budget callback moved to `training/` resumes: its config.yaml (a top-level `method: {name}`, a
`model` of switches only, `met_lightning.inference.callback.BudgetAnalysis`) is compared in
today's shape (`checkpoint.migrate`), and a switch given differently is still named."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from met_lightning.checkpoint.migrate import migrate
from met_lightning.errors import ConfigError
from met_lightning.train import train
from tests.helpers import compose_config, legacy_model_config
from tests.reliability.inprocess import ARGS, resume, run

# the budget callback's `_target_` before it moved to training/budget_analysis.py
OLD_CALLBACK = "met_lightning.inference.callback.BudgetAnalysis"


def legacy_yaml(folder) -> None:
    """Rewrite the run's config.yaml in the shape of a folder written before the change."""
    config = OmegaConf.load(folder / "config.yaml")
    plain = OmegaConf.to_container(config)
    plain["method"], plain["model"] = legacy_model_config(config)
    plain["callbacks"]["budget_analysis"]["_target_"] = OLD_CALLBACK
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy") / "run"
    metrics = run(folder)
    legacy_yaml(folder)
    return folder, metrics


def test_the_legacy_shape_compares_equal_in_todays(legacy_run, tmp_path):
    folder, _ = legacy_run
    saved = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    now = OmegaConf.to_container(compose_config(ARGS, folder), resolve=True)
    assert "method" in saved and "_target_" not in saved["model"]
    assert saved["callbacks"]["budget_analysis"]["_target_"] == OLD_CALLBACK
    upgraded = migrate(saved, "config.yaml")
    assert upgraded["model"] == now["model"] and "method" not in upgraded
    assert upgraded["callbacks"] == now["callbacks"]
    assert migrate(now, "config.yaml") is now  # today's shape is left as it is


def test_a_legacy_run_folder_resumes(legacy_run):
    folder, metrics = legacy_run
    again = resume(folder)  # finished: fit has nothing left, then test and export again
    assert again["test/acc"] == metrics["test/acc"]
    assert json.loads((folder / "summary.json").read_text())["method"] == "met"


def test_a_changed_switch_is_still_named(legacy_run):
    folder, _ = legacy_run
    cfg = compose_config([*ARGS, f"resume={folder}", "model.net.adapter.rank=4"], folder)
    with pytest.raises(ConfigError, match=r"model.net.adapter.rank: 8 -> 4"):
        train(cfg)
