"""Write files atomically: to a temporary name in the same folder, then rename over the target.

A crash mid-write leaves the old file (or none) and a stray `.NAME.RANDOM.PID.tmp` (the PID lets
`checkpoint.resume` remove it once its writer is dead), never a truncated file. The temporary is
created exclusively under an unpredictable name and the rename replaces a symlink at the target,
so a link planted in the folder never redirects a write.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the data is on disk before the name points to it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_temporary(path: Path) -> Path:
    """A new empty `.NAME.RANDOM.PID.tmp` beside `path` (O_EXCL: a planted link is not followed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.{os.getpid()}.tmp")
        with suppress(FileExistsError):
            os.close(os.open(tmp, flags, 0o666))
            return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write `text` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
