"""Where the package's files are (`conf/`, `assets/`) and whether a path the user gives can be
written (`check_writable`). The lowest floor: only the errors below it."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from omegaconf import OmegaConf

from met_lightning.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
WRITABLE_HINT = "give a path in a writable folder"


def config_dir() -> str:
    """The `conf/` folder: the repository's in a source checkout, the wheel's copy otherwise."""
    repo_conf = PACKAGE_DIR.parent / "conf"
    if (repo_conf / "train.yaml").is_file():
        return str(repo_conf)
    return str(importlib.resources.files("met_lightning") / "conf")


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in met_lightning/assets (resolver `${met_asset:NAME}`)."""
    return str(ASSETS_DIR / name)


if not OmegaConf.has_resolver("met_asset"):  # the configs of conf/ use it
    OmegaConf.register_new_resolver("met_asset", asset_path)


def check_writable(path: str | Path, key: str, folder: bool = True) -> Path:
    """`path` if it is, or can be created as, a writable folder (`folder`) or file; else a
    ConfigError naming `key` and the reason. Creates nothing."""
    target = Path(path).expanduser()
    if target.exists() and folder != target.is_dir():
        kind = "a file" if folder else "a folder"
        raise ConfigError(f"{key}={path} is {kind}; give {'a folder' if folder else 'a file'} path")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={path} cannot be created: {existing} is a file, not a folder; {WRITABLE_HINT}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={path} is not writable (no write permission on {existing}); {WRITABLE_HINT}"
        )
    return target
