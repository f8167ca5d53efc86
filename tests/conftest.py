"""Every test runs offline, without wandb, from a fixed seed. Shared CLI runs are made once
(with pytest-xdist, see SAME_WORKER)."""

import os

import pytest
import torch

from tests.helpers import TINY_OVERRIDES, run_cli, run_folder

# Under pytest-xdist (`-n`, on by default: pyproject.toml's addopts): the worker's name (gw0, ...)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker computes on one thread, and so do the CLI runs it starts: as many
    workers as cores, each with torch's default pool (one thread per core), oversubscribe the
    cores several times over and make every worker slower."""
    if XDIST_WORKER:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# Tests that share an expensive session fixture, run on one worker so that it is made once
# (nodeid prefixes; pytest_collection_modifyitems checks that the list is complete). The demo
# group is the longest: it goes first.
SAME_WORKER = {
    "demo_run": (
        "tests/test_cli.py::test_full_demo_meets_accuracy",
        "tests/test_export.py::test_onnx_runner_equals_the_engine_on_the_demo_test_split",
        "tests/test_predict.py::test_predict_on_the_demo_checkpoint",
        "tests/test_serve.py::test_served_answers_equal_predict_on_the_demo_test_images",
    ),
    "reference_run": (
        "tests/reliability/test_export_best.py::test_the_best_epoch_is_exported_and_named[True]",
        "tests/reliability/test_resume_moved.py::",
        "tests/reliability/test_resume_orphans.py::test_kill_between_best_and_last_checkpoint",
    ),
}


def _group(nodeid: str) -> str | None:
    return next((g for g, ids in SAME_WORKER.items() if nodeid.startswith(ids)), None)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (addopts), with the SAME_WORKER groups as units of their own: each
    test file runs on one worker (its module-scoped fixtures are made once), and so does each
    group. (xdist's own `--dist loadgroup` ignores xdist_group marks under pytest 9.2:
    pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or super()._split_scope(nodeid)

    return Scheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: every user of a SAME_WORKER fixture is in its group, and the demo
    group runs first (with --no-loadscope-reorder the files and groups go to the workers in
    this order)."""
    if not XDIST_WORKER:
        return
    for item in items:
        for fixture in SAME_WORKER:
            if fixture in item.fixturenames and _group(item.nodeid) != fixture:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add it to SAME_WORKER")
    items.sort(key=lambda item: _group(item.nodeid) != "demo_run")  # stable: else unchanged


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
