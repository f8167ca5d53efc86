"""An export folder is data: the runner loads only the stage graphs inside it, one per exit, and
the exporter (like every atomic write) replaces planted symlinks instead of writing through them."""

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
from safetensors.torch import save_file

from met_lightning.atomic import atomic_path, write_text
from met_lightning.checkpoint.resume import TMP_FILE
from met_lightning.errors import CheckpointError
from tests.test_export import export_cfg, split_images

pytest.importorskip("onnxruntime")
import onnxruntime  # noqa: E402

from met_lightning.export.__main__ import export  # noqa: E402
from met_lightning.export.ort_runner import MAX_MANIFEST_BYTES, OrtEarlyExit  # noqa: E402

VICTIM = "precious contents\n"


def old_temporary(path):
    """The predictable temporary name the atomic writer used to write through."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def plant(link, target):
    target.write_text(VICTIM)
    link.symlink_to(target)


@pytest.fixture(scope="module")
def planted_export(tiny_run, tmp_path_factory):
    """An export of `tiny_run` into a folder where symlinks to files outside it were planted at
    stage_0.onnx and at the old temporary names of every output; (root, export folder)."""
    root = tmp_path_factory.mktemp("planted")
    out = root / "onnx"
    out.mkdir()
    plant(out / "stage_0.onnx", root / "victim_stage_0")
    for name in ("stage_0.onnx", "stage_1.onnx", "manifest.json"):
        plant(old_temporary(out / name), root / f"victim_tmp_{name}")
    export(export_cfg(checkpoint=str(tiny_run), out=str(out)))
    return root, out


def test_export_replaces_planted_symlinks(planted_export):
    root, out = planted_export
    victims = sorted(root.glob("victim_*"))
    assert len(victims) == 4 and all(v.read_text() == VICTIM for v in victims)
    for name in ("stage_0.onnx", "stage_1.onnx", "manifest.json"):
        assert stat.S_ISREG((out / name).lstat().st_mode), name
        assert old_temporary(out / name).is_symlink()  # left alone, not written through
    assert (out / "stage_0.onnx").read_bytes()[:2] != VICTIM.encode()[:2]
    leftovers = {p.name for p in out.iterdir()} - {"stage_0.onnx", "stage_1.onnx", "manifest.json"}
    assert leftovers == {old_temporary(out / n).name for n in ("stage_0.onnx", "stage_1.onnx",
                                                                "manifest.json")}  # fmt: skip


# ------------------------------------------------------------------------------- atomic writer
def test_write_text_does_not_follow_a_planted_temporary(tmp_path):
    target = tmp_path / "summary.json"
    plant(old_temporary(target), tmp_path / "victim")
    write_text(target, "new\n")
    assert target.read_text() == "new\n" and not target.is_symlink()
    assert (tmp_path / "victim").read_text() == VICTIM


def test_atomic_temporary_is_new_unpredictable_and_resume_recognizes_it(tmp_path):
    target = tmp_path / "last.ckpt"
    names = []
    for _ in range(2):
        with atomic_path(target) as tmp:
            names.append(tmp.name)
            assert tmp.parent == tmp_path and stat.S_ISREG(tmp.lstat().st_mode)
            assert tmp.stat().st_size == 0  # created empty, exclusively, before the caller writes
            umask = os.umask(0)
            os.umask(umask)
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~umask  # as open() would make it
            match = TMP_FILE.fullmatch(tmp.name)
            assert match and int(match.group(1)) == os.getpid()  # resume removes it if we die
            assert tmp.name.startswith(".last.ckpt.")
            tmp.write_bytes(b"x")
    assert names[0] != names[1] and old_temporary(target).name not in names
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_callers_write_the_temporary_by_name(tmp_path):
    """open(tmp, "wb"), Path.write_text and safetensors' save_file all write the created file."""
    import torch

    with atomic_path(tmp_path / "a.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"abc")
    with atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("text")
    with atomic_path(tmp_path / "c.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "b.txt").read_text() == "text"
    assert (tmp_path / "c.safetensors").stat().st_size > 0
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "d.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.safetensors"]


# ------------------------------------------------------------------------------- the runner
@pytest.fixture
def folder(planted_export, tmp_path, monkeypatch):
    """A copy of the export to tamper with; ONNX Runtime loads nothing from it (a test that
    wants it to calls `monkeypatch.undo()`): the checks come first."""
    copy = tmp_path / "onnx"
    shutil.copytree(planted_export[1], copy, ignore=shutil.ignore_patterns(".*"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"ONNX Runtime loaded {args[0]}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return copy


def edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def assert_refused(folder, *needles):
    with pytest.raises(CheckpointError) as err:
        OrtEarlyExit(folder)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(folder / "manifest.json") in message or str(folder) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def set_stage_file(index, name):
    return lambda m: m["stages"][index].update(file=name)


def test_stage_outside_the_folder_is_refused(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(folder / "stage_0.onnx", outside / "elsewhere.onnx")  # a loadable graph
    for name in ("../outside/elsewhere.onnx", str(outside / "elsewhere.onnx"), "sub/x.onnx", ".."):
        path = edit_manifest(folder, set_stage_file(0, name))
        message = assert_refused(folder, str(path), "stages[0].file", "plain name")
        assert "export again" in message


def test_stage_symlink_leading_outside_is_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(folder / "stage_1.onnx", outside)
    (folder / "stage_1.onnx").unlink()
    (folder / "stage_1.onnx").symlink_to(outside)
    assert_refused(folder, "stages[1].file='stage_1.onnx'", "symlink", str(outside))


def test_missing_stage_is_refused(folder):
    (folder / "stage_1.onnx").unlink()
    assert_refused(folder, "stages[1].file", "not a file")


def test_stage_count_must_equal_the_exits(folder):
    edit_manifest(folder, lambda m: m.update(exits=[1, 2, 3, 4]))
    assert_refused(folder, "stages lists 2 graphs but exits lists 4 exits")
    edit_manifest(folder, lambda m: m.update(exits=[2, 4], stages=m["stages"][:1]))
    assert_refused(folder, "stages lists 1 graphs but exits lists 2 exits")


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda m: m.update(exits=[4, 2]), "exits"),
        (lambda m: m.update(exits="24"), "exits"),
        (lambda m: m.update(stages=["stage_0.onnx", "stage_1.onnx"]), "stages[0]"),
        (lambda m: m.update(confidence="__import__"), "confidence"),
        (lambda m: m.update(budgets={"0.5": [0.5]}), "budgets"),
        (lambda m: m.update(budgets=[{"budget": "0.5", "thresholds": [0.5]}]), "budgets[0]"),
        (lambda m: m.update(budgets=[{"budget": 0.5, "thresholds": [0.5] * 3}]),
         "budgets[0].thresholds"),
        (lambda m: m.update(budgets=[{"budget": 0.5, "thresholds": ["nan"]}]),
         "budgets[0].thresholds"),
        (lambda m: m.update(input=[3, 32, 32]), "input"),
        (lambda m: m["input"]["input_spec"].update(input_size=[3, 32]),
         "input.input_spec.input_size"),
        (lambda m: m["input"]["input_spec"].update(std=[0, 1, 1]), "input.input_spec.std"),
        (lambda m: m["input"]["input_spec"].update(mean="0.5"), "input.input_spec.mean"),
        (lambda m: m["input"].update(normalize="${oc.env:HOME}"), "input.normalize"),
    ],
)  # fmt: skip
def test_manifest_fields_are_checked(folder, edit, key):
    path = edit_manifest(folder, edit)
    assert_refused(folder, f"{path}: {key}", "export again")


def test_manifest_must_be_small_valid_json(folder):
    path = folder / "manifest.json"
    path.write_text('{"format": ')
    assert_refused(folder, "is not valid JSON")
    path.write_bytes(b"\xff\xfe")
    assert_refused(folder, "is not valid JSON")
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(folder, "is not valid JSON")
    path.write_text("[]")
    assert_refused(folder, "is not a met_lightning ONNX export")
    path.write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    assert_refused(folder, "over 8 MiB")


def test_graph_reading_weights_from_outside_is_refused(folder, tmp_path):
    """ONNX Runtime before 1.24 reads any external data file an ONNX graph names."""
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = numpy_helper.from_array(np.zeros((1, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../secret.bin")
    graph = helper.make_graph(
        [helper.make_node("Add", ["tokens", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])],
        [weight],
    )
    (folder / "stage_1.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert_refused(folder, "stage_1.onnx", "stages[1]", "'../secret.bin'", "outside")


def test_unreadable_graph_is_one_clear_error(folder):
    (folder / "stage_0.onnx").write_bytes(b"not a graph")
    assert_refused(folder, "stage_0.onnx", "stages[0]", "not an ONNX graph")


def test_symlink_inside_the_folder_is_loaded(folder, tiny_run, monkeypatch):
    (folder / "stage_0.onnx").rename(folder / "graph_0.onnx")
    (folder / "stage_0.onnx").symlink_to("graph_0.onnx")
    monkeypatch.undo()
    images = split_images(tiny_run, "val")[:8].numpy()
    got = OrtEarlyExit(folder, thresholds=[0.0])(images)
    assert set(got.exit_index.tolist()) == {0}
    assert re.fullmatch(r"stage_\d\.onnx", json.loads((folder / "manifest.json").read_text())[
        "stages"][0]["file"])  # fmt: skip
