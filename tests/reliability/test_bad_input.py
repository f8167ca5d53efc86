"""Bad input, end to end through the CLI: one clear `error:` line naming the problem and the fix,
a non-zero exit, no Python traceback (unless HYDRA_FULL_ERROR=1), nothing written or lost, and,
where the problem can be seen without it, no backbone built (no weights, no data loaded).

Each scenario is one `python -m met_lightning ...` or `python -m met_lightning.predict ...` run.
Almost all of such a run's time is imports (about 5 CPU seconds on the 2-core development
machine; the error itself takes well under one): the selected scenarios run once, in a module
fixture, from a warm process that forks one child per command (tests/reliability/warm_cli.py;
MET_FAULTS_COLD=1 runs each as a fresh `python -m` process instead). Scenarios that depend on
environment variables read at import time, the HYDRA_FULL_ERROR test and the run-folder test
always run as fresh processes (`tests.helpers.run_cli`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import write_class_folders, write_image, write_vtab_task
from tests.helpers import TINY_OVERRIDES, run_cli
from tests.reliability.warm_cli import WarmCLI

TRAIN, PREDICT = "met_lightning", "met_lightning.predict"
# one thread per run: a fresh process can go beside the warm one on a small machine
ENV = {"OMP_NUM_THREADS": "1"}
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
    env: dict[str, str] = field(default_factory=dict)
    cold: bool = False  # a fresh process (environment read at import time)


def train(*args: str, expect: tuple[str, ...], **kw) -> Scenario:
    return Scenario(TRAIN, (*FAST, *args), expect, **kw)


def predict(*args: str, expect: tuple[str, ...], **kw) -> Scenario:
    return Scenario(PREDICT, ("checkpoint={run}", *args), expect, **kw)


SCENARIOS = {
    # ------------------------------------------------------------------ config
    "unknown-key": train(
        "model.adapter.rnk=4", expect=("Could not override 'model.adapter.rnk'", "not in struct")
    ),
    "unknown-key-appended": train(
        "+model.adapter.rnk=4",
        expect=("model.adapter.rnk: unknown key", "valid keys there: kind, rank"),
    ),
    "unknown-data-key": train(
        "+data.batchsize=8", expect=("data.batchsize: unknown key; did you mean data.batch_size?",)
    ),
    "wrong-type": train(
        "optimizer.lr=fast", expect=("optimizer.lr='fast' must be a number, not a string",)
    ),
    "exits-out-of-range": train(
        "model.exits=[2,5]", expect=("model.exits=[2, 5]: block(s) [5] outside 1..4",)
    ),
    "exits-unsorted": train(
        "model.exits=[4,2]", expect=("model.exits=[4, 2] is not sorted; use model.exits=[2, 4]",)
    ),
    "exits-duplicated": train(
        "model.exits=[2,2,4]", expect=("model.exits=[2, 2, 4] has duplicate blocks",)
    ),
    "rank-zero": train(
        "model.adapter.rank=0", expect=("model.adapter.rank=0 must be a positive integer",)
    ),
    "negative-graph-weight": train(
        "model.loss.graph_weight=-0.5", expect=("model.loss.graph_weight=-0.5 must be >= 0",)
    ),
    "batch-size-zero": train(
        "data.batch_size=0", expect=("data.batch_size=0 must be a positive integer",)
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
            "CIFAR-100 not found: missing {data}/nowhere/cifar-100-python/train",
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
        env={"HF_HOME": "{data}/hf_home"},
        cold=True,
    ),
    # ------------------------------------------------------------------ output folders
    "unwritable-log-dir": train(
        "paths.log_dir={data}/a_file/outputs",
        expect=("cannot be created: {data}/a_file is a file, not a folder", "paths.log_dir="),
    ),
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
NEEDS_RUN = {"ckpt-path-corrupt"} | {name for name, s in SCENARIOS.items() if s.module == PREDICT}
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


def make_data(root: Path, run: Path | None) -> None:
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
    if run is not None:
        last = (run / "checkpoints" / "last.ckpt").read_bytes()
        (root / "truncated.ckpt").write_bytes(last[: len(last) // 2])


def fill(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


def selected(request: pytest.FixtureRequest, test_names: set[str]) -> set[str]:
    """The scenario ids of this module's tests that this pytest session runs."""
    return {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module
        and item.originalname in test_names
        and hasattr(item, "callspec")
    }


def run_scenario(scenario: Scenario, paths: dict[str, Path], out: Path, cli: WarmCLI):
    args = [fill(a, paths) for a in scenario.args]
    if scenario.module == TRAIN and not any(a.startswith("paths.log_dir=") for a in args):
        args.append(f"paths.log_dir={out}")
    env = {**ENV, **{k: fill(v, paths) for k, v in scenario.env.items()}}
    out.mkdir(parents=True, exist_ok=True)
    run = run_cli if scenario.cold else cli.run
    return run(args, cwd=out, module=scenario.module, **env)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """{name: (completed process, its output folder, the paths)} of the selected scenarios."""
    names = selected(request, {"test_bad_input_fails_early_and_clearly", "test_skip_options"})
    everything = {**SCENARIOS, **SKIPS}
    cli = WarmCLI(**ENV)  # imports while tiny_run trains
    try:
        run = request.getfixturevalue("tiny_run") if names & (NEEDS_RUN | set(SKIPS)) else None
        root = tmp_path_factory.mktemp("bad_input")
        paths = {"data": root / "data", "run": run or root / "no_run", "out": root / "runs"}
        make_data(paths["data"], run)
        cold = sorted(n for n in names if everything[n].cold)
        warm = sorted(n for n in names if not everything[n].cold)
        with ThreadPoolExecutor(1) as pool:  # the fresh processes beside the warm ones
            futures = {
                n: pool.submit(run_scenario, everything[n], paths, paths["out"] / n, cli)
                for n in cold
            }
            results = {n: run_scenario(everything[n], paths, paths["out"] / n, cli) for n in warm}
            results.update({n: f.result() for n, f in futures.items()})
    finally:
        cli.close()
    return {name: (results[name], paths["out"] / name, paths) for name in names}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_input_fails_early_and_clearly(outcomes, name):
    scenario = SCENARIOS[name]
    result, out, paths = outcomes[name]
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
def test_skip_options(outcomes, name):
    """skip_bad_images: the run goes on without the bad images, one warning counts and names
    them."""
    result, _, paths = outcomes[name]
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    (fragment,) = SKIPS[name].expect
    assert output.count(fill(fragment, paths)) == 1, output[-3000:]


def test_hydra_full_error_shows_the_traceback(tmp_path):
    """HYDRA_FULL_ERROR=1: the same user error with its traceback, for a bug report."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **ENV}
    env["HYDRA_FULL_ERROR"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", TRAIN, *FAST, "model.adapter.rank=0", f"paths.log_dir={tmp_path}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "model.adapter.rank=0 must be a positive integer" in result.stderr


def test_a_run_folder_survives_bad_input(tiny_run, tmp_path):
    """Bad input pointed at an existing run folder changes none of its files: the data is checked
    before config.yaml is written."""
    folder = shutil.copytree(tiny_run, tmp_path / "run")
    before = {
        p.relative_to(folder): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }
    result = run_cli(
        [
            *FAST,
            "data=image_folder",
            f"data.root={tmp_path / 'nowhere'}",
            f"hydra.run.dir={folder}",
        ],
        cwd=tmp_path,
        **ENV,
    )
    assert result.returncode == 2 and "data.root=" in result.stderr, result.stderr[-3000:]
    after = {
        p.relative_to(folder): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }
    assert after == before
