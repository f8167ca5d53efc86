"""End to end through `python -m met_lightning` (a subprocess where the process matters; the
Hydra task in-process, `tests.helpers.run_task`, elsewhere), on the shipped demo backbone."""

import json
import time

import pytest
import torch

from tests.helpers import TINY_OVERRIDES, run_cli, run_folder, run_task

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "scheduler.warmup_epochs=0",
]


def test_short_demo_run_writes_folder_checkpoint_and_table(tmp_path):
    result = run_cli([*SHORT, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_folder(tmp_path)
    for name in (
        "config.yaml",
        "metrics.csv",
        "trainable.safetensors",
        "checkpoints/last.ckpt",
        ".hydra/overrides.yaml",
    ):
        assert (folder / name).is_file(), name
    assert "MET run summary" in result.stdout and "MMACs" in result.stdout
    assert "trainable parameters:" in result.stdout
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["exits"]) == 4 and summary["params_trainable"] < summary["params_total"]


def test_experiment_composition_and_overrides(tmp_path):
    result = run_task(
        [
            "+experiment=demo",
            "model.net.exits=[4,12]",
            "model.net.adapter.rank=4",
            "logger=none",
            *SHORT,
        ],
        tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_folder(tmp_path)
    config = (folder / "config.yaml").read_text()
    assert "rank: 4" in config and "- demo" in config
    assert [e["block"] for e in json.loads((folder / "summary.json").read_text())["exits"]] == [
        4,
        12,
    ]
    assert not (folder / "metrics.csv").exists()  # logger=none


@pytest.mark.demo
def test_full_demo_meets_accuracy(demo_run):
    """The README's demo: default config, no overrides but the output folder."""
    result, folder = demo_run
    summary = json.loads((folder / "summary.json").read_text())
    accuracies = [e["accuracy"] for e in summary["exits"]]
    assert summary["split"] == "test"
    assert accuracies[-1] >= 0.90
    assert accuracies[0] >= 0.80  # the first exit, at about a quarter of the cost, is useful
    # early exit pays off on the demo: the last exit's accuracy for well under its cost
    keep = {row["setting"]: row for row in summary["budget"]["points"]}
    keep100 = keep["keep 100 %"]
    assert keep100["accuracy"] >= accuracies[-1] and keep100["speedup"] > 1.5
    for name in ("logits.safetensors", "budget_curve.csv", "budget_curve.png", "budget.json"):
        assert (folder / name).is_file(), name
    assert "Early exit" in result.stdout and "speed-up" in result.stdout


def test_multirun_sweep_gives_one_folder_and_one_wandb_run_per_job(tmp_path):
    result = run_cli(
        [
            "-m",
            "model.net.adapter.rank=2,4",
            "model.loss.graph_weight=0,0.5",
            "logger=wandb",
            "debug=fast",
            *TINY_OVERRIDES,
            f"paths.log_dir={tmp_path}",
        ],
        cwd=tmp_path,
        WANDB_MODE="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    configs = [yaml.safe_load((p.parent / "config.yaml").read_text())["model"]
               for p in tmp_path.rglob("summary.json")]  # fmt: skip
    assert len(configs) == 4
    combos = {(c["net"]["adapter"]["rank"], c["loss"]["graph_weight"]) for c in configs}
    assert combos == {(2, 0), (2, 0.5), (4, 0), (4, 0.5)}
    runs = {p.parent.name for p in tmp_path.rglob("offline-run-*/*.wandb")}
    assert len(runs) == 4  # each job is its own wandb run


def test_wandb_logger_offline(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    wandb_env.setenv("WANDB_API_KEY", "")
    result = run_task(
        ["logger=wandb", "debug=fast", "logger.csv=null", *TINY_OVERRIDES], tmp_path / "run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("offline-run-*/*.wandb"))


@pytest.mark.parametrize(
    "env, expect",
    [
        ({"WANDB_MODE": "", "WANDB_API_KEY": ""}, "no API key"),
        (
            {
                "WANDB_MODE": "online",
                "WANDB_API_KEY": "0" * 40,
                "WANDB_BASE_URL": "http://127.0.0.1:9",
            },
            "cannot be reached",
        ),
        ({"WANDB_MODE": "no-such-mode"}, "wandb could not start"),
    ],
    ids=["no-key", "unreachable", "broken"],
)
def test_wandb_trouble_never_stops_a_run(tmp_path, wandb_env, env, expect):
    for name, value in env.items():
        wandb_env.setenv(name, value)
    result = run_task(["logger=wandb", "debug=fast", *TINY_OVERRIDES], tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout + result.stderr  # the log goes to stdout
    folder = run_folder(tmp_path)
    assert (folder / "metrics.csv").is_file() and (folder / "trainable.safetensors").is_file()
    if expect != "wandb could not start":
        assert list(tmp_path.rglob("offline-run-*/*.wandb"))


def test_ddp_on_two_cpu_processes(tmp_path, tiny_run):
    """trainer=ddp with gloo: trains, syncs, and the budget analysis sees every val image once."""
    from met_lightning.inference.logit_store import LogitStore

    result = run_cli(
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "debug=fast",
            *TINY_OVERRIDES,
            f"paths.log_dir={tmp_path}",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_folder(tmp_path)
    store = LogitStore.load(folder)
    single = LogitStore.load(tiny_run)  # the same config in one process
    assert torch.equal(store["val"].labels, single["val"].labels)  # same order, no duplicates
    assert (folder / "budget_curve.csv").is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exits"][-1]["accuracy"] is not None


def test_cifar100_experiment_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    """Offline, +experiment=cifar100 stops in seconds with one message: first for the dataset
    (checked before the backbone is built), then, with the files in place, for the backbone."""
    import huggingface_hub.constants

    from tests.data_fixtures import write_cifar100

    # no network even on a connected machine: every request goes to a dead proxy; no hub cache
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ["+experiment=cifar100", f"data.root={tmp_path / 'data'}"]
    start = time.monotonic()
    result = run_task(args, tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cifar-100-python" in result.stderr and "data.root" in result.stderr

    write_cifar100(tmp_path / "data", n_train=10, n_test=10)
    result = run_task(args, tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "backbone.weights_file=" in result.stderr
    assert time.monotonic() - start < 60
