"""A run's Lightning checkpoints, and resuming a stopped run in its own folder (`resume=RUN_DIR`).

`.ckpt` files are written next to the target and renamed (Lightning's move from the temp folder
is a copy across file systems, which a crash can leave truncated) and loaded `weights_only=True`:
never code from the file (`SafeCheckpointIO`, `load_lightning_checkpoint`).

`resume_argv` (before Hydra parses argv) puts the run's `.hydra/overrides.yaml` before the user's
overrides and points Hydra's run folder at RUN_DIR; `resume_checkpoint` (in `train`) checks the
composed config is the run's `config.yaml` and returns RUN_DIR/checkpoints/last.ckpt, with the
callback state's absolute paths re-rooted into RUN_DIR if the folder was moved or copied.

A run folder is data that may come from someone else: it never chooses code to run (only
overrides that select a shipped config file or set a plain value are applied) and never makes
Lightning delete outside it (the paths its callback state names, which Lightning may delete, must
lie in the run's checkpoint folders: `outside_paths`, `confined`).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from met_lightning.atomic import atomic_path
from met_lightning.checkpoint.migrate import migrate, migrate_override
from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.paths import config_dir

log = logging.getLogger(__name__)

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# a leftover of met_lightning.atomic.atomic_path: .NAME.RANDOM.PID.tmp
TMP_FILE = re.compile(r"\..+\.(\d+)\.tmp")
# keys that may differ between the run's config.yaml and the resumed one
IGNORED = ("resume",)
# a config option a group override may select: conf/<group>/<option>.yaml
OPTION = re.compile(r"[A-Za-z0-9_][\w-]*(/[A-Za-z0-9_][\w-]*)*")
# ModelCheckpoint's state entries that name files it may later delete (besides `best_k_models`'s
# keys); its `dirpath` is only compared with the callback's own, never used as a path
DELETABLE_PATHS = ("best_model_path", "last_model_path", "kth_best_model_path")
# what torch.load raises on a file that is not a whole checkpoint
CORRUPT = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile)


def load_lightning_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`; CheckpointError naming the file if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, *CORRUPT) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        if isinstance(err, pickle.UnpicklingError):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain values; it "
                f"is not loaded, since that would run code from the file ({reason}). Use a "
                "checkpoint written by met_lightning, or start a fresh run"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({reason}); use another "
            "checkpoint (ckpt_path=...) or start a fresh run"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint (no state_dict)"
        )
    return checkpoint


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """(epoch, global step) of a Lightning checkpoint, tensors memory-mapped, not read; None if
    it is not a readable checkpoint (-1 for a missing field)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1))
    except Exception:  # noqa: BLE001 - not a readable checkpoint of ours
        return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def reroot(value: Any, old: str, new: str) -> Any:
    """`value` (dict keys and values, lists, tuples, recursively) with every string that is the
    absolute folder `old` or a path inside it moved into `new`."""
    old, new = old.rstrip(os.sep) or os.sep, new.rstrip(os.sep) or os.sep
    if isinstance(value, str):
        rest = value[len(old) :].lstrip(os.sep)
        return (os.path.join(new, rest) if rest else new) if _within(value, old) else value
    if isinstance(value, dict):
        return {reroot(k, old, new): reroot(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(reroot(v, old, new) for v in value)
    return value


def inside(path: str | Path, folders: Sequence[str]) -> bool:
    """Whether `path`, resolved (symlinks, `..`), is one of `folders` (resolved) or in one."""
    return any(_within(os.path.realpath(path), os.path.realpath(f)) for f in folders)


def outside_paths(callbacks: Any, folders: Sequence[str]) -> list[str]:
    """The files the ModelCheckpoint states in a checkpoint's `callbacks` name outside every one
    of `folders`: Lightning would delete them."""
    found: list[str] = []
    for state in callbacks.values() if isinstance(callbacks, dict) else ():
        if isinstance(state, dict):
            best_k = state.get("best_k_models")
            named = [state.get(key) for key in DELETABLE_PATHS]
            named += list(best_k) if isinstance(best_k, dict) else []
            found += [p for p in named if isinstance(p, str) and p and not inside(p, folders)]
    return found


def confined(callbacks: Any, folders: Sequence[str]) -> Any:
    """`callbacks` with every path of `outside_paths` emptied / left out of `best_k_models`."""
    bad = set(outside_paths(callbacks, folders))
    if not bad:
        return callbacks
    log.warning("checkpoint names files outside the run's checkpoint folders %s; they are "
                "ignored: %s", list(folders), sorted(bad)[:5])  # fmt: skip
    result = {}
    for name, state in callbacks.items():
        if isinstance(state, dict):
            state = {k: "" if k in DELETABLE_PATHS and v in bad else v for k, v in state.items()}
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {
                    k: v for k, v in state["best_k_models"].items() if k not in bad
                }
        result[name] = state
    return result


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic `.ckpt` writes and weights-only loading; `relocate=(old, new)` re-roots loaded
    callback paths (a moved run folder), `confine` keeps them in the run's checkpoint folders."""

    def __init__(
        self, relocate: tuple[str, str] | None = None, confine: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.relocate = relocate
        self.confine = list(confine) if confine is not None else None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialize fully before touching the file system
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError("met_lightning loads checkpoints with weights_only=True only")
        checkpoint = load_lightning_checkpoint(path, map_location=map_location or "cpu")
        if self.relocate is not None and "callbacks" in checkpoint:
            checkpoint["callbacks"] = reroot(checkpoint["callbacks"], *self.relocate)
        if self.confine is not None and "callbacks" in checkpoint:
            checkpoint["callbacks"] = confined(checkpoint["callbacks"], self.confine)
        return checkpoint

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete the checkpoint file `path` (never a folder, never outside `confine`)."""
        path = Path(path)
        if self.confine is not None and not inside(path, self.confine):
            log.warning("not removing %s: outside the run's checkpoint folders", path)
        elif path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            log.warning("not removing %s: not a checkpoint file", path)


def override_key(override: str) -> str:
    """`+a.b=c` -> `a.b` (also `++`, `~`); `debug=fast` -> `debug`."""
    return override.split("=", 1)[0].lstrip("+~")


def _quote(value: str) -> str:
    if re.fullmatch(r"[\w./:@%+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _plain(item: Any) -> bool:
    """Whether `item` is plain data: no interpolation, no `_`-key (`_target_`, ...) anywhere."""
    if isinstance(item, dict):
        named_code = any(not isinstance(k, str) or k.startswith("_") for k in item)
        return not named_code and _plain(list(item.values()))
    if isinstance(item, list):
        return all(_plain(v) for v in item)
    if isinstance(item, str):
        return "${" not in item
    return item is None or isinstance(item, (bool, int, float))


def _refusal(override: Override, conf: Path) -> str | None:
    """Why a run folder's recorded `override` may not be applied, or None if it may."""
    key = override.key_or_group
    if override.is_sweep_override():
        return "a sweep"
    if key == "hydra" or key.startswith("hydra."):
        return "a Hydra setting"
    if override.package is not None:
        return "a package (@) override"
    if override.type is OverrideType.DEL:
        return None
    value = override.value()
    if (conf / key).is_dir():  # a config group: the value selects one of its shipped files
        ok = isinstance(value, str) and OPTION.fullmatch(value) and ".." not in value
        ok = ok and (conf / key / f"{value}.yaml").is_file()
        return None if ok else f"not a config option of group {key!r}"
    if any(part.startswith("_") for part in key.split(".")):
        return "a key that names code (_target_, _partial_, ...)"
    if override.type is OverrideType.ADD:  # `++key=value` may override an existing key
        return "a key that is not in the config (+)"
    return None if _plain(value) else "an interpolation or a node that names code"


def saved_overrides(run_dir: Path) -> list[str]:
    """The task overrides RUN_DIR/.hydra/overrides.yaml records; CheckpointError naming one that
    could choose code to run or read outside the config (`_refusal`), before anything is composed.
    """
    saved = run_dir / ".hydra" / "overrides.yaml"
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors alike
        raise CheckpointError(f"resume={run_dir}: {saved} cannot be read ({err})") from None
    if not isinstance(recorded, list) or not all(isinstance(o, str) for o in recorded):
        raise CheckpointError(f"resume={run_dir}: {saved} is not a list of overrides")
    recorded = [migrate_override(text) for text in recorded]  # an earlier version's spelling
    conf = Path(config_dir())
    parser = OverridesParser.create()
    for text in recorded:
        try:
            reason = _refusal(parser.parse_override(text), conf)
        except HydraException as err:
            reason = f"not an override ({str(err).splitlines()[0][:120]})"
        if reason is not None:
            raise CheckpointError(
                f"resume={run_dir}: {saved} holds {text[:200]!r}, {reason}, which a run folder "
                "may not set (it is data and never chooses code to run). Remove that line if "
                "the run was yours, or start a new run"
            )
    return recorded


def resume_argv(argv: list[str]) -> list[str]:
    """`argv` with, for `resume=RUN_DIR`, the run's overrides first and `hydra.run.dir=RUN_DIR`;
    overrides the user gives again replace the run's (`train` reports the difference)."""
    index = max((i for i, a in enumerate(argv) if i > 0 and a.startswith("resume=")), default=0)
    run_dir = argv[index].split("=", 1)[1].strip("'\"") if index else ""
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
    skip = {override_key(a) for a in argv[1:] if "=" in a and not a.startswith("-")} | {*IGNORED}
    theirs = [o for o in saved_overrides(Path(run_dir)) if override_key(o) not in skip]
    # hydra.output_subdir=null: the run's own .hydra/ stays as it was, so a resume that fails
    # (e.g. a bad extra override) does not change what the next resume= composes
    return [*argv[:index], *theirs, *argv[index:], f"hydra.run.dir={_quote(run_dir)}",
            "hydra.output_subdir=null"]  # fmt: skip


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict) or not value:  # a leaf, or an empty mapping as one
        return {prefix[:-1]: value}
    parts = (_flatten(item, f"{prefix}{key}.") for key, item in value.items())
    return {k: v for part in parts for k, v in part.items()}


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: saved -> now` for every leaf that differs (run-folder paths compared as moved)."""
    old_dir = str(saved.get("paths", {}).get("output_dir", ""))
    new_dir = str(now.get("paths", {}).get("output_dir", ""))
    before = {k: reroot(v, old_dir, new_dir) if old_dir else v for k, v in _flatten(saved).items()}
    after = _flatten(now)
    missing = "<absent>"
    return [
        f"{k}: {before.get(k, missing)!r} -> {after.get(k, missing)!r}"
        for k in sorted(set(before) | set(after))
        if k.split(".")[0] not in IGNORED and before.get(k, missing) != after.get(k, missing)
    ]


@dataclass(frozen=True)
class ResumePoint:
    """What `resume=RUN_DIR` goes on from (`resume_checkpoint`)."""

    checkpoint: str  # RUN_DIR/checkpoints/last.ckpt
    global_step: int  # of that checkpoint
    run_dir: str  # RUN_DIR, resolved as ModelCheckpoint resolves its dirpath
    written_in: str  # the (resolved) run folder the checkpoint was written in
    callbacks: dict[str, Any]  # the checkpoint's callback states, paths re-rooted into run_dir

    @property
    def relocate(self) -> tuple[str, str] | None:
        """(old, new) run folder for SafeCheckpointIO if the folder was moved or copied."""
        return None if self.written_in == self.run_dir else (self.written_in, self.run_dir)


def written_in(checkpoint: dict[str, Any], fallback: str) -> str:
    """The run folder a last.ckpt was written in (ModelCheckpoint's state names the file it is
    written to, so last.ckpt names itself); `fallback` if none does."""
    for state in (checkpoint.get("callbacks") or {}).values():
        for key in ("best_model_path", "last_model_path"):
            path = state.get(key) if isinstance(state, dict) else None
            if isinstance(path, str) and PurePath(path).parts[-2:] == LAST_CHECKPOINT.parts:
                return str(PurePath(path).parent.parent)
    return fallback


def checkpoint_folders(cfg: DictConfig) -> list[str]:
    """The run's checkpoint folders (resolved), the only places a checkpoint's state may name:
    RUN_DIR/checkpoints and the `dirpath` of every ModelCheckpoint in `cfg.callbacks`."""
    folders = {os.path.realpath(Path(str(cfg.paths.output_dir)) / LAST_CHECKPOINT.parent)}
    for callback in (cfg.get("callbacks") or {}).values():
        target = str(callback.get("_target_", "")) if isinstance(callback, DictConfig) else ""
        if target.endswith("ModelCheckpoint") and callback.get("dirpath"):
            folders.add(os.path.realpath(str(callback.dirpath)))
    return sorted(folders)


def resume_checkpoint(cfg: DictConfig) -> ResumePoint:
    """RUN_DIR's last.ckpt, after checking the config is the run's own: CheckpointError if it is
    missing, corrupt or unsafe; ConfigError if the config differs or the run folder is not RUN_DIR.
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
    # a folder written by an earlier version compares in today's shape
    differences = config_differences(migrate(saved, f"resume={cfg.resume}: {saved_file}"), now)
    if differences:
        more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the run's config.yaml: "
            f"{'; '.join(differences[:5])}{more}. resume= goes on with the run's own config "
            "(its overrides are applied for you); to train with another config, start a new run "
            f"from its checkpoint: ckpt_path={last}"
        )
    checkpoint = load_lightning_checkpoint(last)  # corrupt / unsafe: fails here, before building
    here = os.path.realpath(output_dir)
    saved_dir = saved.get("paths", {}).get("output_dir")
    origin = written_in(checkpoint, os.path.realpath(str(saved_dir)) if saved_dir else here)
    callbacks = checkpoint.get("callbacks") or {}
    if origin != here:
        log.info("run folder moved or copied from %s: checkpoint paths re-rooted", origin)
        callbacks = reroot(callbacks, origin, here)
    if outside := outside_paths(callbacks, checkpoint_folders(cfg)):
        raise CheckpointError(
            f"resume={cfg.resume}: {last} names files outside the run's checkpoint folders "
            f"({', '.join(map(repr, outside[:3]))}), which the resumed run would delete. A run "
            "folder may only name its own files: use a checkpoint written by met_lightning"
        )
    return ResumePoint(str(last), int(checkpoint.get("global_step", 0)), here, origin, callbacks)


def _paths(value: Any) -> set[str]:
    """Every string in `value` (dict keys and values, lists), as a resolved path."""
    if isinstance(value, str):
        return {os.path.realpath(value)} if value else set()
    if isinstance(value, dict):
        return _paths(list(value)) | _paths(list(value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*map(_paths, value))
    return set()


def _writer_running(pid: int) -> bool:
    """Whether process `pid` (not this one, which has written nothing in the run folder yet) may
    still be writing."""
    try:
        os.kill(pid, 0)  # signal 0: only whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid != os.getpid()


def remove_stale_files(point: ResumePoint) -> list[Path]:
    """Remove (and return) what a killed run left in RUN_DIR that the resumed run never uses:
    atomic writers' `*.tmp` files whose process is gone, and `.ckpt`s in its checkpoint folders
    the restored callback state does not know, written after `point` (e.g. the new best of the
    epoch whose last.ckpt the kill prevented: it would stay next to its rewritten `-v1` copy)."""
    run_dir = Path(point.run_dir)
    removed = []
    for path in sorted(run_dir.rglob("*.tmp")):
        match = TMP_FILE.fullmatch(path.name)
        if match and path.is_file() and not _writer_running(int(match.group(1))):
            removed.append(path)
    known = _paths(point.callbacks) | {os.path.realpath(point.checkpoint)}
    folders = {os.path.realpath(run_dir / LAST_CHECKPOINT.parent)} | {
        os.path.realpath(state["dirpath"])
        for state in point.callbacks.values()
        if isinstance(state, dict) and isinstance(state.get("dirpath"), str)
    }
    for folder in sorted(f for f in folders if Path(f).is_relative_to(run_dir)):
        for path in sorted(Path(folder).glob("*.ckpt")):
            if os.path.realpath(path) in known or not path.is_file():
                continue
            progress = checkpoint_progress(path)  # unreadable: not ours, never removed
            if progress is not None and progress[1] > point.global_step:
                removed.append(path)
    for path in removed:
        path.unlink()
        log.info("removed %s: written after %s, unused by the resumed run", path, point.checkpoint)
    return removed
