"""Issue 23: the launcher's processes are the trainer's (in-process checks, no cluster needed)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from met_lightning.cluster import (
    LaunchCheck,
    check_launcher,
    check_world_size,
    resume_requeued,
)
from met_lightning.errors import ConfigError
from met_lightning.paths import config_dir

TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "RANK": "1"}
SRUN = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NNODES": "2",
        "SLURM_PROCID": "3", "SLURM_JOB_NAME": "train"}  # fmt: skip


def trainer(devices, num_nodes=1):
    return OmegaConf.create({"trainer": {"devices": devices, "num_nodes": num_nodes}})


def test_world_size_matches_or_says_which_to_change():
    check_world_size(trainer(1, 2), TORCHRUN)
    check_world_size(trainer(2, 2), SRUN)
    check_world_size(trainer(8, 3), {})  # not started by a launcher: Lightning starts its own
    with pytest.raises(ConfigError) as err:
        check_world_size(trainer(2, 1), TORCHRUN)
    assert str(err.value) == (
        "torchrun started 1 process(es) per node on 2 node(s) (world size 2), but "
        "trainer.devices=2 x trainer.num_nodes=1 = 2: set trainer.devices=1 trainer.num_nodes=2, "
        "or start torchrun with --nproc-per-node=2 --nnodes=1"
    )
    with pytest.raises(ConfigError, match=r"srun\) started 2 process\(es\) per node on 2 node.*"
                       r"set trainer.devices=2 trainer.num_nodes=2, or start Slurm \(srun\) with "
                       r"--ntasks-per-node=4 --nodes=1"):  # fmt: skip
        check_world_size(trainer(4, 1), SRUN)
    with pytest.raises(ConfigError, match=r"trainer.devices=-1: .* set trainer.devices=1"):
        check_world_size(trainer(-1, 2), TORCHRUN)


def compose_multirun(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], None),
        (["trainer.devices=2"], None),
        (["trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=1"],
         "hydra.launcher.tasks_per_node=1 differs from trainer.devices=2"),
        (["trainer=ddp", "trainer.devices=2", "hydra.launcher.nodes=2"],
         "hydra.launcher.nodes=2 differs from trainer.num_nodes=1"),
        (["trainer=ddp"], "trainer.devices=-1: with hydra/launcher=slurm set trainer.devices=N"),
    ],
)  # fmt: skip
def test_slurm_launcher_follows_the_trainer_and_a_mismatch_stops_before_submission(
    overrides, message, capsys
):
    cfg = compose_multirun(["hydra/launcher=slurm", *overrides])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    if message is None:
        assert launcher.tasks_per_node == cfg.trainer.devices
        assert launcher.nodes == cfg.trainer.get("num_nodes", 1)
        check_launcher(launcher, cfg.trainer)
        LaunchCheck().on_multirun_start(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        check_launcher(launcher, cfg.trainer)
    with pytest.raises(SystemExit) as exit_:  # the sweep's callback, before the launcher submits
        LaunchCheck().on_multirun_start(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_local_procs_runs_one_process_per_job():
    cfg = compose_multirun(["hydra/launcher=local_procs"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    check_launcher(cfg.hydra.launcher, cfg.trainer)
    cfg = compose_multirun(["hydra/launcher=local_procs", "hydra.launcher.tasks_per_node=2"])
    with pytest.raises(ConfigError, match="hydra.launcher.tasks_per_node=2: set it to 1"):
        check_launcher(cfg.hydra.launcher, cfg.trainer)


def test_a_requeued_slurm_job_resumes_its_run_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"lightning's mid-epoch save")
    cfg = OmegaConf.create({"resume": None, "paths": {"output_dir": str(tmp_path)}})
    resume_requeued(cfg, {"SLURM_RESTART_COUNT": "1"})  # no last.ckpt yet: starts over
    assert cfg.resume is None and not (tmp_path / "hpc_ckpt_1.ckpt").exists()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    resume_requeued(cfg, {"SLURM_RESTART_COUNT": "0"})  # the first start
    resume_requeued(cfg, {})
    assert cfg.resume is None
    resume_requeued(cfg, {"SLURM_RESTART_COUNT": "2"})
    assert cfg.resume == str(tmp_path)


def test_a_run_of_several_processes_names_its_folder_and_rank_0_writes_hydra_files(
    monkeypatch, capsys
):
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    cfg = compose_multirun([])
    with pytest.raises(SystemExit):  # the default folder is named by each node's clock
        LaunchCheck().on_run_start(cfg)
    assert "set hydra.run.dir=FOLDER (the same on every node)" in capsys.readouterr().err
    cfg = compose_multirun(["hydra.run.dir=/tmp/run"])
    LaunchCheck().on_run_start(cfg)  # rank 1
    assert cfg.hydra.output_subdir is None
    monkeypatch.setenv("RANK", "0")
    cfg = compose_multirun(["hydra.run.dir=/tmp/run"])
    LaunchCheck().on_run_start(cfg)
    assert cfg.hydra.output_subdir == ".hydra"
