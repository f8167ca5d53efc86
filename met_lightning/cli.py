"""Shared behaviour of the command-line entry points: user errors are one line, exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from met_lightning.errors import MetError

T = TypeVar("T")


def user_error(err: BaseException | None) -> MetError | None:
    """The MetError behind `err`, also when Hydra's `instantiate` has wrapped it."""
    while err is not None:
        if isinstance(err, MetError):
            return err
        err = err.__cause__
    return None


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run `fn`; a MetError prints `error: <message>`, exits 2 (traceback: HYDRA_FULL_ERROR=1)."""
    try:
        return fn()
    except Exception as err:
        cause = user_error(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
