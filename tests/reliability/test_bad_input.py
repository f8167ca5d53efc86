"""Bad input: one clear `error:` line naming the problem and the fix, exit code 2, no Python
traceback (unless HYDRA_FULL_ERROR=1), nothing written or lost, and, where the problem can be seen
without it, no backbone built (no weights, no data loaded).

Each scenario runs in-process as Hydra would run it: the real config composed from the same
overrides (`tests.helpers.compose_config`), then the entry's Hydra task (`met_lightning.train._task`
or `met_lightning.predict._task`, which print the `error:` line and `sys.exit(2)`), with stdout,
stderr and the log captured. Config-key errors are in tests/test_config.py. Hydra's own override
error goes through the entry's `main()` (Hydra's parsing and error report, in-process:
`tests.helpers.run_main`); one configuration error end to end in a `python -m` process is in
tests/test_config.py.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import huggingface_hub.constants
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from met_lightning import train as train_entry
from met_lightning.cli import RunFolderCheck
from met_lightning.errors import ConfigError
from met_lightning.paths import config_dir
from tests.data_fixtures import write_class_folders, write_image, write_vtab_task
from tests.helpers import TINY_OVERRIDES, compose_config, run_main, run_task

TRAIN, PREDICT = "met_lightning", "met_lightning.predict"
FAST = [*TINY_OVERRIDES, "debug=fast"]
VTAB = ["data=vtab1k", "data.task=kitti", "data.split=tune", "data.num_workers=0"]
# logged when a backbone with random weights is built (the tiny ViT of TINY_OVERRIDES, or the
# one a predict checkpoint of it rebuilds): its absence shows a run stopped before that
BACKBONE_BUILT = "has random weights"


@dataclass(frozen=True)
class Scenario:
    module: str
    args: tuple[str, ...]  # {data}, {run}, {out} are filled in
    expect: tuple[str, ...]  # fragments of the stderr
    before_backbone: bool = True  # fails before any backbone is built
    empty_hub: bool = False  # an empty Hugging Face cache (HF_HOME), offline
    main: bool = False  # through the entry's main() (Hydra's own errors)


def train(*args: str, expect: tuple[str, ...], **kw) -> Scenario:
    return Scenario(TRAIN, (*FAST, *args), expect, **kw)


def predict(*args: str, expect: tuple[str, ...], **kw) -> Scenario:
    return Scenario(PREDICT, ("checkpoint={run}", *args), expect, **kw)


SCENARIOS = {
    # ------------------------------------------------------------------ config (the key errors
    # of validate_config: tests/test_config.py)
    "unknown-key": train(
        "model.net.adapter.rnk=4",
        expect=("Could not override 'model.net.adapter.rnk'", "Key 'rnk' not in 'AdapterConfig'"),
        main=True,  # Hydra's own error, exit code 1
    ),
    # ------------------------------------------------------------------ data
    "missing-data-folder": train(
        "data=image_folder",
        "data.root={data}/nowhere",
        expect=("data.root='{data}/nowhere' is not a folder", "<root>/<class>/*.jpg"),
    ),
    "missing-vtab-task": train(
        *VTAB,
        "data.root={data}/nowhere",
        expect=("VTAB-1K task folder {data}/nowhere/kitti does not exist", "NOAH"),
    ),
    "missing-cifar-files": train(
        "data=cifar100",
        "data.root={data}/nowhere",
        "data.download=false",
        expect=(
            "CIFAR100 not found (3 of 3 expected paths missing): expected "
            "cifar-100-python/{{train,test,meta}} under data.root={data}/nowhere",
            "data.download=true",
        ),
    ),
    "empty-split": train(
        "data=image_folder",
        "data.root={data}/empty_val",
        expect=("{data}/empty_val/val holds no images in its class folders",),
    ),
    "empty-list-file": train(
        *VTAB,
        "data.split=final",
        "data.root={data}/vtab_empty",
        expect=("VTAB-1K list file {data}/vtab_empty/kitti/test.txt lists no images",),
    ),
    "label-out-of-range": train(
        *VTAB,
        "data.root={data}/vtab_label",
        expect=("{data}/vtab_label/kitti/val200.txt, line 3: label 7 is outside 0..3",),
    ),
    "class-count-vtab": train(
        *VTAB,
        "data.root={data}/vtab",
        "data.num_classes=5",
        expect=("data.num_classes=5, but VTAB-1K task 'kitti' has 4 classes",),
    ),
    "class-count-folders": train(
        "data=image_folder",
        "data.root={data}/classes",
        "data.num_classes=5",
        expect=("data.num_classes=5, but {data}/classes has 3 class folders (a, b, c)",),
    ),
    "undecodable-image": train(
        *VTAB,
        "data.root={data}/vtab_bad",
        expect=(
            "2 undecodable image(s) in {data}/vtab_bad/kitti/train800.txt: "
            "images/train800/0000.png, images/train800/0002.png",
            "data.skip_bad_images=true",
        ),
    ),
    # a truncated image passes the header check: named when a DataLoader worker loads it
    "truncated-image": train(
        *VTAB,
        "data.root={data}/vtab_truncated",
        "data.num_workers=1",
        expect=(
            "cannot decode image {data}/vtab_truncated/kitti/images/train800/0001.jpg",
            "data.skip_bad_images=true",
        ),
        before_backbone=False,
    ),
    # ------------------------------------------------------------------ checkpoints, weights
    "ckpt-path-missing": train(
        "ckpt_path={data}/nowhere.ckpt", expect=("ckpt_path='{data}/nowhere.ckpt' does not exist",)
    ),
    "ckpt-path-corrupt": train(
        "ckpt_path={data}/truncated.ckpt",
        expect=("checkpoint '{data}/truncated.ckpt' is corrupt or truncated",),
    ),
    "hub-offline": Scenario(
        TRAIN,
        ("backbone=vit_tiny", "debug=fast"),
        expect=(
            "could not get pretrained weights for backbone.name='vit_tiny_patch16_224",
            "backbone.weights_file=",
            "backbone.pretrained=false",
        ),
        before_backbone=False,
        empty_hub=True,
    ),
    # ------------------------------------------------------------------ output folders
    "unwritable-output-dir": train(
        "paths.output_dir={data}/a_file/run",
        expect=("paths.output_dir={data}/a_file/run cannot be created: {data}/a_file is a file",),
    ),
    # ------------------------------------------------------------------ predict
    "predict-checkpoint-missing": Scenario(
        PREDICT,
        ("checkpoint={data}/nowhere", "input={data}/images"),
        expect=("checkpoint '{data}/nowhere' does not exist",),
    ),
    "predict-checkpoint-corrupt": Scenario(
        PREDICT,
        ("checkpoint={data}/corrupt.safetensors", "input={data}/images"),
        expect=("checkpoint '{data}/corrupt.safetensors' is corrupt or not safetensors",),
    ),
    "predict-input-empty": predict(
        "input={data}/empty", expect=("input folder '{data}/empty' has no images",)
    ),
    "predict-undecodable-image": predict(
        "input={data}/bad_images",
        expect=("cannot read 1 input image(s): {data}/bad_images/1.png", "skip_bad_images=true"),
    ),
    "predict-budget-below-exit-1": predict(
        "input={data}/images",
        "budget=0.01",
        expect=("budget=0.01: ", "is below the cost of exit 1", "raise the budget to at least"),
        before_backbone=False,  # the MACs come from the network
    ),
    "predict-thresholds-length": predict(
        "input={data}/images",
        "thresholds=[0.5,0.5,0.5]",
        expect=("thresholds has 3 values, but the model has 2 exits: give 1",),
    ),
    "predict-unwritable-output": predict(
        "input={data}/images",
        "output={data}/a_file/preds.csv",
        expect=("output={data}/a_file/preds.csv cannot be created: {data}/a_file is a file",),
    ),
}
# runs that succeed: the skip options (counted warnings)
SKIPS = {
    "skip-undecodable-images": Scenario(
        TRAIN,
        (*FAST, *VTAB, "data.root={data}/vtab_bad", "data.skip_bad_images=true"),
        expect=(
            "skipped 2 undecodable image(s) in {data}/vtab_bad/kitti/train800.txt "
            "(data.skip_bad_images=true): images/train800/0000.png, images/train800/0002.png",
        ),
    ),
    "predict-skip-undecodable-images": predict(
        "input={data}/bad_images",
        "skip_bad_images=true",
        expect=("skipped 1 undecodable image(s) (skip_bad_images=true): {data}/bad_images/1.png",),
    ),
}
# the scenarios that read the tiny CLI run (a checkpoint or its truncated copy)
NEEDS_RUN = {"ckpt-path-corrupt"} | {
    name for name, s in {**SCENARIOS, **SKIPS}.items() if "checkpoint={run}" in s.args
}


def make_data(root: Path) -> None:
    """Every bad (and good) input the scenarios name, under `root`."""
    rng = np.random.default_rng(0)
    write_vtab_task(root / "vtab")
    write_vtab_task(root / "vtab_empty")
    (root / "vtab_empty" / "kitti" / "test.txt").write_text("")
    val = write_vtab_task(root / "vtab_label") / "val200.txt"
    lines = val.read_text().splitlines()
    lines[2] = lines[2].rsplit(maxsplit=1)[0] + " 7"  # kitti has 4 classes
    val.write_text("\n".join(lines) + "\n")
    bad = write_vtab_task(root / "vtab_bad") / "images" / "train800"
    (bad / "0000.png").write_bytes(b"<html>not an image</html>")
    (bad / "0002.png").write_bytes(b"")
    truncated = write_vtab_task(root / "vtab_truncated") / "images" / "train800" / "0001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-50])  # the header still reads
    write_class_folders(root / "classes", ["a", "b", "c"], 4)
    write_class_folders(root / "empty_val" / "train", ["a", "b"], 3)
    for name in ("a", "b"):
        (root / "empty_val" / "val" / name).mkdir(parents=True)
    (root / "a_file").write_text("a file where a folder is expected\n")
    (root / "empty").mkdir()
    (root / "hf_home").mkdir()
    for i in range(3):
        write_image(root / "images" / f"{i}.png", rng, size=8)
        write_image(root / "bad_images" / f"{i}.png", rng, size=8)
    (root / "bad_images" / "1.png").write_bytes(b"this is not a PNG")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def fill(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    make_data(root / "data")
    return root


@pytest.fixture
def paths(request, data) -> dict[str, Path]:
    """{data}, {run} (the tiny CLI run, for the scenarios that need one) and {out}."""
    name = request.node.callspec.params["name"]
    run = data / "no_run"
    if name in NEEDS_RUN:
        run = request.getfixturevalue("tiny_run")
        truncated = data / "data" / "truncated.ckpt"
        if not truncated.exists():
            last = (run / "checkpoints" / "last.ckpt").read_bytes()
            truncated.write_bytes(last[: len(last) // 2])
    return {"data": data / "data", "run": run, "out": data / "runs" / name}


def run_scenario(scenario: Scenario, paths: dict[str, Path]) -> subprocess.CompletedProcess:
    args = [fill(a, paths) for a in scenario.args]
    out = paths["out"]
    out.mkdir(parents=True, exist_ok=True)
    if scenario.main:
        return run_main([*args, f"paths.log_dir={out}"], module=scenario.module)
    # HF_HOME is read when huggingface_hub is imported: its cache folder is set in-process
    hub = paths["data"] / "hf_home" / "hub"
    cache = str(hub) if scenario.empty_hub else huggingface_hub.constants.HF_HUB_CACHE
    with mock.patch.object(huggingface_hub.constants, "HF_HUB_CACHE", cache):
        return run_task(args, out, module=scenario.module)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_input_fails_early_and_clearly(paths, name):
    scenario = SCENARIOS[name]
    result, out = run_scenario(scenario, paths), paths["out"]
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in scenario.expect:
        assert fill(fragment, paths) in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if name != "unknown-key":  # that one is Hydra's own message (exit code 1)
        assert len(errors) == 1 and result.returncode == 2, result.stderr[-3000:]
    if scenario.before_backbone:
        assert BACKBONE_BUILT not in result.stdout + result.stderr
        # nothing is written: no config.yaml, no checkpoint (Hydra's .hydra/ and log aside)
        written = [p for p in out.rglob("*") if p.is_file() and ".hydra" not in p.parts]
        assert not [p for p in written if p.name != "train.log"], written
    assert (paths["data"] / "a_file").read_text() == "a file where a folder is expected\n"
    assert not (paths["data"] / "a_file").is_dir()


@pytest.mark.parametrize("name", list(SKIPS))
def test_skip_options(paths, name):
    """skip_bad_images: the run goes on without the bad images, one warning counts and names
    them."""
    result = run_scenario(SKIPS[name], paths)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    (fragment,) = SKIPS[name].expect
    assert output.count(fill(fragment, paths)) == 1, output[-3000:]


def test_unwritable_log_dir_stops_before_hydra_makes_the_run_folder(tmp_path, capsys):
    """Hydra's run-folder callback (conf/hydra/default.yaml) on the composed hydra.run.dir."""
    (tmp_path / "a_file").write_text("a file\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", [f"paths.log_dir={tmp_path}/a_file/outputs"], True)
    with pytest.raises(SystemExit) as exit:
        RunFolderCheck().on_run_start(config=cfg)
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: hydra.run.dir={tmp_path}/a_file/outputs/")
    assert f"cannot be created: {tmp_path}/a_file is a file, not a folder" in line
    assert "paths.log_dir=" in line
    assert (tmp_path / "a_file").read_text() == "a file\n"


def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch):
    """HYDRA_FULL_ERROR=1: the same user error raised (Hydra prints its traceback), for a bug
    report."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    cfg = compose_config([*FAST, "model.net.adapter.rank=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"model\.net\.adapter\.rank=0 must be a positive"):
        train_entry._task(cfg)


def test_a_run_folder_survives_bad_input(tiny_run, tmp_path):
    """Bad input pointed at an existing run folder changes none of its files: the data is checked
    before config.yaml is written."""
    folder = shutil.copytree(tiny_run, tmp_path / "run")
    before = {
        p.relative_to(folder): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }
    args = [*FAST, "data=image_folder", f"data.root={tmp_path / 'nowhere'}"]
    result = run_task(args, folder)
    assert result.returncode == 2 and "data.root=" in result.stderr, result.stderr[-3000:]
    after = {
        p.relative_to(folder): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }
    assert after == before
