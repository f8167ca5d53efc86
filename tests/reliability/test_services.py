"""wandb unreachable: training goes on with its local logs and one warning."""

from __future__ import annotations

import socket

from tests.helpers import HYDRA_LOG_FORMAT, TINY_OVERRIDES, run_folder, run_task


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_wandb_unreachable_leaves_one_warning_and_every_local_log(tmp_path, wandb_env):
    """In-process (wandb_env: a HOME without ~/.netrc key), the log written as the CLI writes it."""
    wandb_env.setenv("WANDB_MODE", "online")
    wandb_env.setenv("WANDB_API_KEY", "0" * 40)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    result = run_task(
        ["logger=wandb", "debug=fast", *TINY_OVERRIDES],
        tmp_path / "run",
        log_format=HYDRA_LOG_FORMAT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "WARNING" in line and "wandb" in line]
    assert len(warnings) == 1, warnings
    assert "wandb: the server cannot be reached: logging offline" in warnings[0]
    folder = run_folder(tmp_path)
    csv = (folder / "metrics.csv").read_text()
    assert "test/acc" in csv and "val/acc" in csv and "train/loss" in csv
    for artifact in ("trainable.safetensors", "summary.json", "logits.safetensors"):
        assert (folder / artifact).is_file(), artifact
    # wandb logs offline next to the run, for `wandb sync` later
    assert list(tmp_path.rglob("offline-run-*/*.wandb"))
    # misconfigured wandb (WANDB_MODE=no-such-mode: "wandb could not start") is
    # tests/test_cli.py::test_wandb_trouble_never_stops_a_run[broken]
