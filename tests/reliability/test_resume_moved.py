"""A copied or moved run folder resumes as itself (issue 11, item 3): Lightning's ModelCheckpoint
state holds absolute paths into the folder it was written in; `resume=` re-roots them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from met_lightning.checkpoint import SafeCheckpointIO, load_lightning_checkpoint
from tests.reliability.inprocess import (
    EPOCHS,
    assert_same_results,
    best_checkpoint,
    epoch_of,
    killed_run,
    resume,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_run):
    """(uninterrupted run, the same run stopped right after its last.ckpt of the best epoch)."""
    (reference, _), original = reference_run, tmp_path_factory.mktemp("moved") / "original"
    best = epoch_of(best_checkpoint(reference))
    assert best < EPOCHS - 1, "the test needs a best epoch before the last one"

    def after_best_epoch(checkpoint, path):
        return "after" if path.name == "last.ckpt" and checkpoint["epoch"] == best else None

    killed_run(original, after_best_epoch)
    assert epoch_of(original / "checkpoints" / "last.ckpt") == best
    return reference, original


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def _resume_spying(folder: Path) -> list[Path]:
    """Resume `folder` in process; the checkpoint files Lightning loaded."""
    loaded = []
    original = SafeCheckpointIO.load_checkpoint

    def load(self, path, *args, **kwargs):  # noqa: ANN001
        loaded.append(Path(path))
        return original(self, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SafeCheckpointIO, "load_checkpoint", load)
        resume(folder)
    return loaded


def _assert_resumed_in_place(folder: Path, loaded: list[Path], reference: Path) -> None:
    root = folder.resolve()
    assert loaded and all(root in p.resolve().parents for p in loaded), loaded
    assert best_checkpoint(folder).resolve() in [p.resolve() for p in loaded]  # the tested one
    # last.ckpt, written by the resumed run, names only files of this folder (the best
    # checkpoint is the original's file, copied: it is re-rooted whenever it is loaded)
    state = load_lightning_checkpoint(folder / "checkpoints" / "last.ckpt")["callbacks"]
    paths = [s for s in _strings(state) if s.startswith("/")]
    assert len(paths) >= 5 and all(root in Path(s).parents for s in paths), paths
    assert_same_results(folder, reference)


def test_a_copied_run_folder_resumes_as_itself(runs, tmp_path):
    reference, original = runs
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    loaded = _resume_spying(copy)
    _assert_resumed_in_place(copy, loaded, reference)
    assert not (original / "summary.json").exists()  # the original was not touched


def test_a_moved_run_folder_resumes_as_itself(runs, tmp_path):
    reference, original = runs
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, tmp_path / "keep")  # for other tests of this module
    shutil.move(original, moved)
    try:
        loaded = _resume_spying(moved)
        _assert_resumed_in_place(moved, loaded, reference)
    finally:
        shutil.move(tmp_path / "keep", original)
