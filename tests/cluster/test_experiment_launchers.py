"""Issue 23: the experiment launchers with `--launcher local_procs`: a stage's runs as one Hydra
multirun through submitit, each job in the run folder the launcher expects, then the report.
`pytest -m cluster`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.cluster.helpers import env
from tests.helpers import REPO, TINY_BACKBONE

pytestmark = pytest.mark.cluster


def test_run_ablation_through_local_procs_writes_the_run_folders_the_report_reads(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, str(REPO / "experiments" / "run_ablation.py"), "--launcher",
               "local_procs", "--launcher-arg", "timeout_min=10", "--settings", "linear_probe",
               "--seeds", "0", "1", "--out", str(out), "--results", str(results), "--extra",
               *TINY_BACKBONE, "debug=fast"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "### 2 run(s) as 1 multirun(s), hydra/launcher=local_procs:" in done.stdout
    assert "2 of 2 run(s) finished" in done.stdout
    pids = set()
    for seed in (0, 1):
        run = out / "linear_probe" / f"seed{seed}"
        assert json.loads((run / "summary.json").read_text())["exits"]
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
        assert f"seed={seed}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    # submitit ran each job in a process of its own, logs beside the run folders
    for folder in (out / "linear_probe" / ".submitit").iterdir():
        if folder.name.isdigit():  # a job's folder, named by its pid
            assert list(folder.glob("*_result.pkl")), folder
            pids.add(folder.name)
    assert len(pids) == 2
    # experiments/report.py (run by the launcher) found both run folders beside submitit's
    table = (results / "ablation_demo.md").read_text()
    assert f"2 run folder(s) under `{out}`; 1 dataset(s), 1 setting(s)" in table
    assert "| test | linear_probe | 2 |" in table
    # started again: both runs are finished, nothing is submitted
    again = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("# skip, finished:") == 2 and "multirun" not in again.stdout
