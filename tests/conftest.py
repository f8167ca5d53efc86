"""Every test runs offline, without wandb, from a fixed seed. Shared CLI runs are made once."""

import pytest
import torch

from tests.helpers import TINY_OVERRIDES, run_cli, run_folder


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The full offline demo (`python -m met_lightning`, ~1.5 min): (result, run folder)."""
    root = tmp_path_factory.mktemp("demo")
    result = run_cli([f"paths.log_dir={root}"], cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_folder(root)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A seconds-long CLI run of a tiny random ViT (exits [2, 4]): its run folder."""
    root = tmp_path_factory.mktemp("tiny")
    result = run_cli(["debug=fast", *TINY_OVERRIDES, f"paths.log_dir={root}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_folder(root)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """For an in-process wandb run: a HOME without ~/.netrc key; afterwards wandb's process-wide
    state (its run, settings and service) is torn down, so that no test sees another's."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield monkeypatch
    import wandb

    wandb.finish()
    wandb.teardown()
