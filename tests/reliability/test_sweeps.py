"""A failing multirun job fails alone: the sweep goes on and the sweeper decides."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import met_lightning.train as train_module
from tests.helpers import TINY_OVERRIDES, run_cli

MESSAGE = "optimized_metric='nope' is not among this run's metrics"


def test_missing_optimized_metric_fails_the_job_not_the_sweep(tmp_path):
    args = ["-m", "model.net.adapter.rank=2,4", "+optimized_metric=nope", "debug=fast",
            *TINY_OVERRIDES, "callbacks.budget_analysis=null",
            f"paths.log_dir={tmp_path}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, OMP_NUM_THREADS="1")
    # each job raises (Hydra's basic sweeper reports it after the batch, the Optuna sweeper
    # counts a failed trial); both jobs ran to the end
    assert result.returncode != 0 and MESSAGE in result.stderr
    assert len(list(tmp_path.rglob("summary.json"))) == 2


def test_missing_optimized_metric_of_a_single_run_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(train_module, "train", lambda cfg: {"val/acc": 0.5})
    monkeypatch.setattr(train_module, "is_multirun", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        train_module._task(OmegaConf.create({"optimized_metric": "nope"}))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {MESSAGE}")


def test_a_user_error_in_a_sweep_job_is_raised_not_exited(monkeypatch, caplog):
    from met_lightning.errors import TrainingDivergedError

    def diverge(cfg):
        raise TrainingDivergedError("training diverged: the loss is nan at step 1")

    monkeypatch.setattr(train_module, "train", diverge)
    monkeypatch.setattr(train_module, "is_multirun", lambda: True)
    with pytest.raises(TrainingDivergedError):  # not SystemExit: the sweep goes on
        train_module._task(OmegaConf.create({}))
    assert "error: training diverged" in caplog.text
