"""Fixtures of the fault suite."""

import pytest

from tests.reliability.inprocess import run


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The uninterrupted in-process run of tests.reliability.inprocess.ARGS (test=true, the
    default), made once: (run folder, its metrics). The resume and export tests compare with it
    or check it; none may change it (copy it first)."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    return folder, run(folder)
