"""Runs beyond one process: the processes a launcher (torchrun, srun, `hydra/launcher=slurm`)
starts must be the ones the trainer expects (`check_world_size`, `check_launcher`, `LaunchCheck`),
and a requeued Slurm job goes on from last.ckpt (`resume_requeued`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from met_lightning.checkpoint.resume import LAST_CHECKPOINT
from met_lightning.cli import exit_on_user_error
from met_lightning.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """The processes a launcher started: `per_node` on each of `nodes`; this one is `rank`."""

    launcher: str
    per_node: int
    nodes: int
    rank: int
    flags: str  # the launcher's options that set per_node and nodes, with {per_node} / {nodes}


def launcher_world(environ: Mapping[str, str] = os.environ) -> World | None:
    """The world of torchrun (TORCHELASTIC_RUN_ID) or srun (SLURM_NTASKS, as Lightning detects
    it); None for a process started by hand or by Lightning itself."""
    if "TORCHELASTIC_RUN_ID" in environ:
        per_node = int(environ["LOCAL_WORLD_SIZE"])
        nodes = int(environ["WORLD_SIZE"]) // per_node
        flags = "--nproc-per-node={per_node} --nnodes={nodes}"
        return World("torchrun", per_node, nodes, int(environ["RANK"]), flags)
    if "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        ntasks = int(environ["SLURM_NTASKS"])
        nodes = int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = re.match(r"\d+", environ.get("SLURM_NTASKS_PER_NODE", ""))
        return World("Slurm (srun)", int(per_node.group()) if per_node else ntasks // nodes, nodes,
                     int(environ.get("SLURM_PROCID", 0)), "--ntasks-per-node={per_node} "
                     "--nodes={nodes}")  # fmt: skip
    return None


def _devices_nodes(trainer: DictConfig) -> tuple[int | None, int]:
    """(trainer.devices as processes per node, None for -1 / "auto"; trainer.num_nodes)."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1))
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return (devices if devices > 0 else None), nodes
    return (len(devices) if not isinstance(devices, str) else None), nodes


def check_world_size(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> None:
    """ConfigError unless the launcher's world is trainer.devices x trainer.num_nodes."""
    world = launcher_world(environ)
    if world is None:
        return
    devices, nodes = _devices_nodes(cfg.trainer)
    if devices == world.per_node and nodes == world.nodes:
        return
    started = (f"{world.launcher} started {world.per_node} process(es) per node on {world.nodes} "
               f"node(s) (world size {world.per_node * world.nodes})")  # fmt: skip
    if devices is None:
        raise ConfigError(f"trainer.devices={cfg.trainer.devices!r}: {started}; set "
                          f"trainer.devices={world.per_node}, the processes per node")  # fmt: skip
    launcher_flags = world.flags.format(per_node=devices, nodes=nodes)
    raise ConfigError(
        f"{started}, but trainer.devices={devices} x trainer.num_nodes={nodes} = "
        f"{devices * nodes}: set trainer.devices={world.per_node} "
        f"trainer.num_nodes={world.nodes}, or start {world.launcher} with {launcher_flags}"
    )


def check_launcher(launcher: DictConfig, trainer: DictConfig) -> None:
    """ConfigError, before submission, if the Slurm launcher's tasks / nodes are not the trainer's
    (Lightning requires --ntasks-per-node = devices and --nodes = num_nodes), or a local_procs
    job would start several processes that Lightning does not know of."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("LocalLauncher") and launcher.get("tasks_per_node") != 1:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={launcher.tasks_per_node}: set it to 1 with "
            "hydra/launcher=local_procs; each job's DDP processes are started by Lightning "
            "(trainer.devices)"
        )
    if not target.endswith("SlurmLauncher"):
        return
    devices, nodes = _devices_nodes(trainer)
    if devices is None:
        raise ConfigError(f"trainer.devices={trainer.devices!r}: with hydra/launcher=slurm set "
                          "trainer.devices=N, the GPUs (processes) per node")  # fmt: skip
    tasks = launcher.get("tasks_per_node")
    if tasks != devices:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} differs from trainer.devices={devices}: "
            "Lightning runs one process per device and Slurm one task per process; set both to "
            "the same value (drop the hydra.launcher.tasks_per_node override: it follows "
            "trainer.devices)"
        )
    if launcher.get("nodes") != nodes:
        raise ConfigError(
            f"hydra.launcher.nodes={launcher.get('nodes')} differs from trainer.num_nodes={nodes}: "
            "set both to the same value (drop the hydra.launcher.nodes override: it follows "
            "trainer.num_nodes)"
        )


def resume_requeued(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> None:
    """In a Slurm job that was requeued (SLURM_RESTART_COUNT > 0) and whose run folder has
    checkpoints/last.ckpt: set `resume` to the run folder, so that `train` goes on as with
    `resume=RUN_DIR`. Lightning's mid-epoch hpc_ckpt_N.ckpt (its SIGUSR1 auto-requeue) is
    removed: the run goes on from the epoch end, as the uninterrupted run would have."""
    restarts = int(environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts == 0 or cfg.get("resume"):
        return
    run_dir = Path(str(cfg.paths.output_dir))
    for path in run_dir.glob("hpc_ckpt_*.ckpt"):
        path.unlink(missing_ok=True)
    if not (run_dir / LAST_CHECKPOINT).is_file():
        log.info("Slurm restart %d of this job: no %s yet, starting over", restarts,
                 run_dir / LAST_CHECKPOINT)  # fmt: skip
        return
    log.info("Slurm restart %d of this job: resume=%s", restarts, run_dir)
    with open_dict(cfg):
        cfg.resume = str(run_dir)


def _check_run_dir(config: DictConfig) -> None:
    world = launcher_world()
    if world is None or world.per_node * world.nodes == 1:
        return
    given = (str(o).lstrip("+") for o in config.hydra.overrides.hydra)
    if not any(o.startswith("hydra.run.dir=") for o in given):
        raise ConfigError(
            f"{world.launcher} started {world.per_node * world.nodes} processes: set "
            "hydra.run.dir=FOLDER (the same on every node); the default folder is named by each "
            "process's clock, so the processes could write into different folders"
        )
    if world.rank != 0:  # rank 0 writes .hydra/ (config, overrides); the others would repeat it
        with read_write(config.hydra):
            config.hydra.output_subdir = None


class LaunchCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): the checks above, before any folder is made."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_user_error(lambda: _check_run_dir(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_user_error(lambda: check_launcher(config.hydra.launcher, config.trainer))
