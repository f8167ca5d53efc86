"""Where the package's files are (`conf/`, `assets/`), whether a path the user gives can be
written (`check_writable`) and whether a URL's host can be reached (`host_reachable`). The lowest
floor: only the errors below it."""

from __future__ import annotations

import importlib.resources
import os
import socket
import threading
import urllib.request
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

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


# `${met_asset:NAME}` in the configs of conf/: the absolute path of met_lightning/assets/NAME
if not OmegaConf.has_resolver("met_asset"):
    OmegaConf.register_new_resolver("met_asset", lambda name: str(ASSETS_DIR / name))


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


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host (or urllib's proxy) opens within `timeout` s.

    In a daemon thread: name resolution ignores socket timeouts and can block much longer offline.
    """
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # downloads go there
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        with suppress(OSError, ValueError):  # unreachable: no result
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)
