"""Resume a stopped run in its own folder: `python -m met_lightning resume=RUN_DIR`.

`resume_argv` (before Hydra parses the command line) puts the run's own overrides (its
`.hydra/overrides.yaml`) in front of the user's and points Hydra's run folder at RUN_DIR, so that
one override composes the run's config again. `resume_checkpoint` (in `train`) checks that the
composed config is the run's `config.yaml` and returns RUN_DIR/checkpoints/last.ckpt.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.training.checkpoint_io import load_lightning_checkpoint

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# keys that may differ between the run's config.yaml and the resumed one
IGNORED = ("resume",)


def override_key(override: str) -> str:
    """`+a.b=c` -> `a.b` (also `++`, `~`); `debug=fast` -> `debug`."""
    return override.split("=", 1)[0].lstrip("+~")


def _quote(value: str) -> str:
    if re.fullmatch(r"[\w./:@%+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """`argv` with, for `resume=RUN_DIR`, the run's overrides first and `hydra.run.dir=RUN_DIR`.

    Overrides the user gives again replace the run's (and `train` then reports the difference).
    """
    given = [i for i, arg in enumerate(argv) if i > 0 and arg.startswith("resume=")]
    if not given:
        return argv
    index = given[-1]
    run_dir = argv[index].split("=", 1)[1].strip("'\"")
    if run_dir in ("", "null"):
        return argv
    saved = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not Path(run_dir).is_dir():
        raise CheckpointError(
            f"resume={run_dir}: no such folder; give the run folder of an earlier "
            "`python -m met_lightning` (outputs/train/runs/<date_time>)"
        )
    if not saved.is_file():
        raise CheckpointError(
            f"resume={run_dir}: {saved} does not exist, so this is not a run folder of "
            "`python -m met_lightning`; give one (outputs/train/runs/<date_time>), or start from "
            "a checkpoint in a new run with ckpt_path=..."
        )
    mine = {override_key(arg) for arg in argv[1:] if "=" in arg and not arg.startswith("-")}
    theirs = [
        str(o)
        for o in OmegaConf.load(saved)
        if override_key(str(o)) not in mine and override_key(str(o)) not in IGNORED
    ]
    # hydra.output_subdir=null: the run's own .hydra/ stays as it was, so a resume that fails
    # (e.g. a bad extra override) does not change what the next resume= composes
    return [*argv[:index], *theirs, *argv[index:], f"hydra.run.dir={_quote(run_dir)}",
            "hydra.output_subdir=null"]  # fmt: skip


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _moved(value: Any, old: str, new: str) -> Any:
    """`value` with the run folder's old absolute path replaced by the new one (folder moved)."""
    if isinstance(value, str) and old and value.startswith(old):
        return new + value[len(old) :]
    return value


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: saved -> now` for every leaf that differs (run-folder paths compared as moved)."""
    old_dir = str(saved.get("paths", {}).get("output_dir", ""))
    new_dir = str(now.get("paths", {}).get("output_dir", ""))
    before = {k: _moved(v, old_dir, new_dir) for k, v in _flatten(saved).items()}
    after = _flatten(now)
    keys = sorted(set(before) | set(after))
    missing = "<absent>"
    return [
        f"{k}: {before.get(k, missing)!r} -> {after.get(k, missing)!r}"
        for k in keys
        if k.split(".")[0] not in IGNORED and before.get(k, missing) != after.get(k, missing)
    ]


def resume_checkpoint(cfg: DictConfig) -> tuple[str, int]:
    """(path, global step) of RUN_DIR's last.ckpt, after checking the config is the run's own.

    CheckpointError if the checkpoint is missing, corrupt or unsafe; ConfigError if the composed
    config differs from the run's config.yaml or the run folder is not RUN_DIR.
    """
    run_dir = Path(str(cfg.resume))
    output_dir = Path(str(cfg.paths.output_dir))
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={cfg.resume}: no such folder")
    if output_dir.resolve() != run_dir.resolve():
        raise ConfigError(
            f"resume={cfg.resume}: the run folder is {output_dir}, not {run_dir}; pass resume= "
            "on the command line of `python -m met_lightning`, which writes into RUN_DIR"
        )
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        raise CheckpointError(
            f"resume={cfg.resume}: {saved_file} does not exist; not a met_lightning run folder"
        )
    last = run_dir / LAST_CHECKPOINT
    if not last.is_file():
        raise CheckpointError(
            f"resume={cfg.resume}: {last} does not exist (the run stopped before its first "
            "checkpoint, or ran with callbacks.last_checkpoint=null); start it again without "
            "resume=, or give another checkpoint in a new run with ckpt_path=..."
        )
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    now = OmegaConf.to_container(cfg, resolve=True)
    differences = config_differences(saved, now)
    if differences:
        more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the run's config.yaml: "
            f"{'; '.join(differences[:5])}{more}. resume= goes on with the run's own config "
            "(its overrides are applied for you); to train with another config, start a new run "
            f"from its checkpoint: ckpt_path={last}"
        )
    checkpoint = load_lightning_checkpoint(last)  # corrupt / unsafe: fails here, before building
    return str(last), int(checkpoint.get("global_step", 0))
