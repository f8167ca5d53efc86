"""Many short CLI runs, cheaply: `python -m MODULE ARGS` without paying the imports each time.

A CLI process spends about 5 CPU seconds importing torch, timm and lightning (on the 2-core
development machine) before its first line of our code; an error path then takes well under one
second. `WarmCLI` starts one process that makes those imports once and then forks a child per
command. The child runs the entry module exactly as `python -m MODULE ARGS` does (`runpy`, as
`__main__`, with its own argv, working folder, environment, stdin, stdout and stderr) and exits
with its exit code; only the interpreter start-up and the imports are shared. Environment
variables read at import time (e.g. huggingface_hub's HF_HOME) are the warm process's: run such
commands with `tests.helpers.run_cli`. MET_FAULTS_COLD=1 makes `WarmCLI.run` a plain `run_cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import REPO, run_cli

COLD = os.environ.get("MET_FAULTS_COLD") == "1"

SERVER = r"""
import json, os, runpy, sys, traceback

import met_lightning.predict, met_lightning.train  # the heavy imports, once

def child(job):
    code = 1
    try:
        os.chdir(job["cwd"])
        for key in job["unset"]:
            os.environ.pop(key, None)
        os.environ.update(job["env"])
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(job["stdout"], flags), 1)
        os.dup2(os.open(job["stderr"], flags), 2)
        sys.argv = [job["module"], *job["args"]]
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:  # what the interpreter does with it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class WarmCLI:
    """`run(args, cwd, module, **env)` like `tests.helpers.run_cli`, from a warm process."""

    def __init__(self, **env: str) -> None:
        self.env = env
        self.proc = None
        if COLD:
            return
        full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env}
        full_env.pop("HYDRA_FULL_ERROR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, args: list[str], cwd: Path, module: str = "met_lightning", **env: str
    ) -> subprocess.CompletedProcess:
        if self.proc is None:
            return run_cli(args, cwd=cwd, module=module, **{**self.env, **env})
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            job = dict(module=module, args=list(args), cwd=str(cwd), env={**self.env, **env},
                       unset=["HYDRA_FULL_ERROR"], stdout=str(out), stderr=str(err))  # fmt: skip
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"the warm CLI process died (exit code {self.proc.poll()})")
            code = json.loads(reply)["rc"]
            return subprocess.CompletedProcess(
                [sys.executable, "-m", module, *args], code, out.read_text(), err.read_text()
            )

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None
