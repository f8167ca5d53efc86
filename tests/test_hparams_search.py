"""conf/hparams_search/met_optuna.yaml: composes with the Optuna sweeper; a 2-trial sweep runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from met_lightning.paths import config_dir
from tests.helpers import TINY_OVERRIDES, run_cli

pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper",
    reason="the Optuna sweeper plugin is not installed: pip install -e '.[optuna]'",
)


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_config_composes_with_the_optuna_sweeper():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    cfg = compose_with_hydra(["hparams_search=met_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == 1234
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.optimized_metric == "val/acc_best"
    assert cfg.hydra.mode == RunMode.MULTIRUN
    # the search space, as the plugin reads it
    params = [f"{k}={v}" for k, v in sweeper.params.items()]
    space, fixed = create_params_from_overrides(params)
    assert not fixed
    rank = space["model.net.adapter.rank"]
    assert isinstance(rank, CategoricalDistribution) and list(rank.choices) == [2, 4, 8, 16]
    graph = space["model.loss.graph_weight"]
    assert isinstance(graph, LogUniformDistribution) and (graph.low, graph.high) == (0.01, 1.0)
    lr = space["optimizer.lr"]
    assert isinstance(lr, LogUniformDistribution) and (lr.low, lr.high) == (1e-4, 1e-2)
    # every searched key exists in the training config
    for key in sweeper.params:
        node = cfg
        for part in key.split("."):
            node = node[part]


def test_two_trial_sweep_on_a_budget_metric(tmp_path: Path):
    """`python -m met_lightning hparams_search=met_optuna hydra.sweeper.n_trials=2 ...` (~20 s),
    optimizing the accuracy at 75 % of the MACs (the tiny model cannot reach the 50 % budget)."""
    args = ["hparams_search=met_optuna", "hydra.sweeper.n_trials=2",
            "optimized_metric=budget/at_0.75_acc", "debug=fast", *TINY_OVERRIDES,
            f"paths.log_dir={tmp_path}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = tmp_path.glob("train/multiruns/*/optimization_results.yaml")
    results = yaml.safe_load(results_file.read_text())
    assert results["name"] == "optuna"
    assert set(results["best_params"]) == {
        "model.net.adapter.rank", "model.loss.graph_weight", "optimizer.lr"
    }  # fmt: skip
    # one run folder per trial, with the trial's values in its config; the best value is the best
    # trial's accuracy at the 75 % budget, as its budget.json has it
    trials = sorted(results_file.parent.glob("*/summary.json"))
    assert len(trials) == 2
    values = []
    for trial in trials:
        config = yaml.safe_load((trial.parent / "config.yaml").read_text())
        assert config["model"]["net"]["adapter"]["rank"] in {2, 4, 8, 16}
        budgets = json.loads((trial.parent / "budget.json").read_text())["budgets"]
        values += [b["evaluated"]["accuracy"] for b in budgets if b["budget"] == 0.75]
    assert results["best_value"] == pytest.approx(max(values))
