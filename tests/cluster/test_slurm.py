"""Issue 23 against a real Slurm: a one-node cluster on localhost (experiments/slurm/
start_local_slurm.sh: Debian's slurm-wlm and munge, installed and started by the fixture; the
tests skip with the reason if it cannot start). `pytest -m cluster`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.cluster.helpers import SHORT, env, start_local_slurm

pytestmark = pytest.mark.cluster
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]


@pytest.fixture(scope="module")
def slurm():
    reason = start_local_slurm()
    if reason is not None:
        print(f"SKIPPED the Slurm tests: {reason}")
        pytest.skip(reason)


def sweep(args: list[str], tmp_path: Path, **popen):
    command = [sys.executable, "-m", "met_lightning", "-m", *SLURM, *args,
               f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    if popen:
        return subprocess.Popen(command, cwd=tmp_path, env=env(), text=True, **popen)
    return subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_a_sweep_of_two_jobs_and_a_ddp_job_of_two_tasks(slurm, tmp_path):
    """Two sweeps side by side (the node has 2 CPUs: Slurm queues what does not fit): a sweep of
    2 one-task jobs (a job array) and one DDP job of 2 tasks, whose processes srun starts."""
    two = tmp_path / "two"
    ddp = tmp_path / "ddp"
    two.mkdir(), ddp.mkdir()
    jobs = sweep(["seed=1,2", *SHORT], two, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    one = sweep([*SHORT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.precision=32-true"], ddp, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in (jobs, one)]
    assert jobs.returncode == 0 and one.returncode == 0, "\n".join(o[-3000:] for o in outs)
    for num, seed in ((0, 1), (1, 2)):
        job = two / "sweep" / str(num)
        assert json.loads((job / "summary.json").read_text())["exits"]
        assert yaml.safe_load((job / "config.yaml").read_text())["seed"] == seed
    script = next((two / "sweep" / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --ntasks-per-node=1" in script
    # the DDP job: one Slurm task per process, each a rank of Lightning's SLURMEnvironment
    job = ddp / "sweep" / "0"
    assert json.loads((job / "summary.json").read_text())["exits"]
    logs = "".join(p.read_text() for p in (ddp / "sweep" / ".submitit").glob("*/*_log.*"))
    assert "#SBATCH --ntasks-per-node=2" in next((ddp / "sweep" / ".submitit").glob(
        "*/*_submission.sh")).read_text()  # fmt: skip
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs
        assert f"global_rank={rank}(2)" in logs


def test_a_requeued_job_resumes_from_last_ckpt(slurm, tmp_path):
    """`scancel --signal=USR1` (what a cluster sends before preemption or the time limit):
    Lightning's SLURMEnvironment(auto_requeue=True) requeues the job, which starts again and goes
    on from its checkpoints/last.ckpt (resume=) to the end."""
    epochs = 6
    proc = sweep([*SHORT, f"trainer.max_epochs={epochs}", "scheduler.warmup_epochs=0",
                  "+callbacks.slow._target_=tests.cluster.helpers.SlowEpochs"],
                 tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    job = tmp_path / "sweep" / "0"
    last = job / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.is_file() and proc.poll() is None, "the job ended before its first last.ckpt"
    folders = (tmp_path / "sweep" / ".submitit").iterdir()
    job_id = next(p.name for p in folders if p.name[0].isdigit())
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=60)
    assert proc.wait(timeout=600) == 0
    log = (job / "train.log").read_text()
    assert "Slurm restart 1 of this job: resume=" in log, log[-3000:]
    assert "resuming" in log and "from " + str(last) in log
    assert not list(job.glob("hpc_ckpt_*.ckpt"))  # Lightning's mid-epoch save, not used
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == epochs - 1  # trained to the end
    assert json.loads((job / "summary.json").read_text())["exits"]
