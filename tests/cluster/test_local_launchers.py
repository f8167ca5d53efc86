"""Issue 23 end to end, on this machine: a sweep's jobs as parallel local processes
(hydra/launcher=local_procs) and a two-"node" torchrun on loopback. `pytest -m cluster`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.cluster.helpers import SHORT, env, read_weights

pytestmark = pytest.mark.cluster


def test_local_procs_sweep_runs_each_job_in_its_own_process(tmp_path):
    args = [sys.executable, "-m", "met_lightning", "-m", "hydra/launcher=local_procs",
            "seed=1,2", *SHORT, f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    done = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    pids = set()
    for num, seed in ((0, 1), (1, 2)):
        job = sweep / str(num)
        assert json.loads((job / "summary.json").read_text())["exits"]
        assert yaml.safe_load((job / "config.yaml").read_text())["seed"] == seed
        assert f"seed={seed}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    # submitit's local jobs: one folder per process, named by its pid, each ran one job
    for folder in (sweep / ".submitit").iterdir():
        if folder.name.isdigit():
            assert list(folder.glob("*_result.pkl")), folder
            pids.add(int(folder.name))
    assert len(pids) == 2 and sys.modules["os"].getpid() not in pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_loopback_equal_one_process_on_the_global_batch(tmp_path):
    """`torchrun --nnodes=2 --nproc-per-node=1` twice (c10d rendezvous on 127.0.0.1, gloo on
    CPU): both ranks end with the weights of a single-process run on the same global batch (the
    whole 898-image training split in one batch, 2 steps), and one run folder is written."""
    batch = ["method=linear_probe", "data.val_fraction=0.3", "data.batch_size=898",
             "trainer.max_epochs=2", "trainer.limit_train_batches=1", "test=false",
             "trainer.limit_val_batches=1"]  # fmt: skip
    common = [*SHORT, *batch, "+callbacks.weights._target_=tests.cluster.helpers.SaveWeights"]
    torchrun = Path(sys.executable).parent / "torchrun"
    port = free_port()
    ddp = [str(torchrun), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=met-test", "-m", "met_lightning",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
           "trainer.precision=32-true", *common, f"+callbacks.weights.out={tmp_path}/ddp",
           f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    single = [
        sys.executable,
        "-m",
        "met_lightning",
        *common,
        f"+callbacks.weights.out={tmp_path}/single",
        f"hydra.run.dir={tmp_path}/single_run",
    ]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in (ddp, ddp, single)]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    ranks = [read_weights(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    reference = read_weights(tmp_path / "single" / "rank0.safetensors")
    assert ranks[0].keys() == reference.keys() and reference
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps ranks identical
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # one run folder, written once: rank 0's files only, no folder from rank 1's clock
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "run", "single", "single_run"]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]  # fmt: skip
    assert json.loads((run / "summary.json").read_text())["exits"]
    assert (run / "trainable.safetensors").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 2 and config["trainer"]["devices"] == 1
