"""experiments/run_vtab1k.py and run_cifar100.py: commands, skipping, tune -> final selection.

Real runs are replaced by a fake `python` (`--python`) that writes what a finished run writes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments import launch, run_cifar100, run_vtab1k
from tests.helpers import TINY_OVERRIDES, compose_config

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """\
#!{python}
# Stands in for `python -m met_lightning OVERRIDES`: writes the files of a finished run.
import json, os, sys
from pathlib import Path
import yaml

args = sys.argv[1:]
assert args[:2] == ["-m", "met_lightning"], args
overrides = args[2:]
values = dict(o.split("=", 1) for o in overrides)
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(overrides) + "\\n")
if values["seed"] == os.environ.get("FAKE_FAIL_SEED"):
    sys.exit(3)
run_dir = Path(values["hydra.run.dir"].strip("'\\""))
rank = int(values.get("model.net.adapter.rank", 8))
acc = {{4: 0.70, 8: 0.75, 16: 0.72}}[rank] + 0.01 * int(values["seed"])
(run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
(run_dir / "checkpoints").mkdir(exist_ok=True)
(run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides[:-1]))
summary = {{"split": "test", "exits": [{{"exit": 1, "accuracy": acc - 0.2}},
                                     {{"exit": 2, "accuracy": acc}}]}}
(run_dir / "summary.json").write_text(json.dumps(summary))
"""


def commands(text: str) -> list[list[str]]:
    """The commands a dry run printed (lines that are not comments), split like a shell."""
    return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def overrides_of(command: list[str]) -> list[str]:
    assert command[1:3] == ["-m", "met_lightning"]
    return command[3:]


def write_tune_run(folder: Path, accs: tuple[float, ...], budget_acc: float | None = None) -> None:
    folder.mkdir(parents=True)
    exits = [{"exit": k + 1, "accuracy": a} for k, a in enumerate(accs)]
    (folder / "summary.json").write_text(json.dumps({"split": "test", "exits": exits}))
    if budget_acc is not None:
        budgets = [{"budget": 0.5, "evaluated": {"accuracy": budget_acc}}]
        (folder / "budget.json").write_text(json.dumps({"budgets": budgets}))


@pytest.fixture
def fake_python(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    return path


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------- dry runs
def test_dry_run_prints_tune_then_final_per_task_and_seed(tmp_path, capsys):
    out = tmp_path / "vtab"
    argv = ["--dry-run", "--tasks", "cifar", "dmlab", "--seeds", "0", "1", "--out", str(out),
            "--extra", "trainer=cpu", "backbone.weights_file=/w/ViT-B_16.npz"]  # fmt: skip
    assert run_vtab1k.main(argv) == 0
    text = capsys.readouterr().out
    cmds = commands(text)
    assert len(cmds) == 8
    assert cmds[0] == [sys.executable, "-m", "met_lightning", "+experiment=vtab1k/cifar", "seed=0",
                       "data.split=tune", "trainer=cpu", "backbone.weights_file=/w/ViT-B_16.npz",
                       f"hydra.run.dir={out}/cifar/tune/seed0"]  # fmt: skip
    stages = [(c[3], c[4], c[5], c[-1].removeprefix(f"hydra.run.dir={out}/")) for c in cmds]
    assert stages == [
        ("+experiment=vtab1k/cifar", "seed=0", "data.split=tune", "cifar/tune/seed0"),
        ("+experiment=vtab1k/cifar", "seed=1", "data.split=tune", "cifar/tune/seed1"),
        ("+experiment=vtab1k/cifar", "seed=0", "data.split=final", "cifar/final/seed0"),
        ("+experiment=vtab1k/cifar", "seed=1", "data.split=final", "cifar/final/seed1"),
        ("+experiment=vtab1k/dmlab", "seed=0", "data.split=tune", "dmlab/tune/seed0"),
        ("+experiment=vtab1k/dmlab", "seed=1", "data.split=tune", "dmlab/tune/seed1"),
        ("+experiment=vtab1k/dmlab", "seed=0", "data.split=final", "dmlab/final/seed0"),
        ("+experiment=vtab1k/dmlab", "seed=1", "data.split=final", "dmlab/final/seed1"),
    ]
    assert "8 run(s) to do, 0 finished already" in text
    assert "1.3-2.0 GPU hours" in text  # 8 runs x 10-15 min
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_grid_points_groups_and_stages(tmp_path, capsys):
    out = tmp_path / "o=ut"  # a character Hydra needs quoted
    argv = ["--dry-run", "--tasks", "specialized", "--seeds", "0", "--out", str(out)]
    argv += ["--grid", "model.net.adapter.rank=4,8", "--grid", "model.loss.graph_weight=0.1,0.3"]
    assert run_vtab1k.main(argv) == 0
    text = capsys.readouterr().out
    cmds = commands(text)
    tasks = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
    assert len(cmds) == len(tasks) * (4 + 1)
    tune = [c for c in cmds if "data.split=tune" in c]
    assert [c[3] for c in tune[::4]] == [f"+experiment=vtab1k/{t}" for t in tasks]
    assert [c[-1] for c in tune[:4]] == [
        f"hydra.run.dir='{out}/patch_camelyon/tune/seed0/{name}'"
        for name in ("rank-4_graph_weight-0.1", "rank-4_graph_weight-0.3",
                     "rank-8_graph_weight-0.1", "rank-8_graph_weight-0.3")
    ]  # fmt: skip
    assert tune[1][6:8] == ["model.net.adapter.rank=4", "model.loss.graph_weight=0.3"]
    # Hydra reads every tune override as a plain value (no accidental sweep)
    parser = OverridesParser.create()
    for command in tune:
        parsed = parser.parse_overrides(overrides_of(command))
        assert not any(o.is_sweep_override() for o in parsed)
        assert parsed[-1].value() == f"{out}/" + command[-1].split(f"{out}/")[1].rstrip("'")
    # final runs wait for the tune results
    final = [c for c in cmds if "data.split=final" in c]
    assert len(final) == len(tasks)
    assert f"model.net.adapter.rank={run_vtab1k.PLACEHOLDER}" in final[0]
    assert "final runs wait for the tune stage" in text
    # --stages tune: no final commands
    assert run_vtab1k.main([*argv, "--stages", "tune"]) == 0
    assert all("data.split=tune" in c for c in commands(capsys.readouterr().out))


def test_dry_run_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "vtab"
    write_tune_run(out / "dtd" / "tune" / "seed1", (0.5, 0.6))
    write_tune_run(out / "dtd" / "final" / "seed0", (0.5, 0.6))
    assert (
        run_vtab1k.main(["--dry-run", "--tasks", "dtd", "--seeds", "0", "1", "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    skipped = [line for line in text.splitlines() if line.startswith("# skip, finished:")]
    assert len(skipped) == 2
    assert skipped[0].endswith(f"hydra.run.dir={out}/dtd/tune/seed1")
    assert skipped[1].endswith(f"hydra.run.dir={out}/dtd/final/seed0")
    assert [c[-1] for c in commands(text)] == [
        f"hydra.run.dir={out}/dtd/tune/seed0",
        f"hydra.run.dir={out}/dtd/final/seed1",
    ]
    assert "2 run(s) to do, 2 finished already" in text


# ---------------------------------------------------------------------- tune -> final
def _grid_fixture(out: Path) -> None:
    """Tune runs of cifar, ranks 4 / 8, seeds 0 / 1; rank 8 best on the last exit (mean 0.73 vs
    0.72), rank 4 best on the mean over exits and at budget 0.5."""
    base = out / "cifar" / "tune"
    write_tune_run(base / "seed0" / "rank-4", (0.60, 0.70), budget_acc=0.66)
    write_tune_run(base / "seed1" / "rank-4", (0.60, 0.74), budget_acc=0.66)
    write_tune_run(base / "seed0" / "rank-8", (0.50, 0.73), budget_acc=0.60)
    write_tune_run(base / "seed1" / "rank-8", (0.50, 0.73), budget_acc=0.60)


@pytest.mark.parametrize(
    ("select_by", "expected"), [("last", "8"), ("mean", "4"), ("budget:0.5", "4")]
)
def test_tune_selection_picks_the_best_mean_val_accuracy(tmp_path, capsys, select_by, expected):
    out = tmp_path / "vtab"
    _grid_fixture(out)
    points = launch.grid_points(launch.parse_grid(["model.net.adapter.rank=4,8"]))
    names = launch.point_names(points)
    best, rows = run_vtab1k.select_point(out, "cifar", points, names, [0, 1], select_by)
    assert best == (("model.net.adapter.rank", expected),)
    if select_by == "last":
        assert [r["mean"] for r in rows] == pytest.approx([0.72, 0.73])
        assert rows[0]["scores"] == pytest.approx({0: 0.70, 1: 0.74})
    # the dry run now shows the final runs with the chosen value, and skips the finished tune runs
    argv = ["--dry-run", "--tasks", "cifar", "--seeds", "0", "1", "--out", str(out),
            "--grid", "model.net.adapter.rank=4,8", "--select-by", select_by]  # fmt: skip
    assert run_vtab1k.main(argv) == 0
    text = capsys.readouterr().out
    cmds = commands(text)
    assert [c[5] for c in cmds] == ["data.split=final", "data.split=final"]
    assert all(f"model.net.adapter.rank={expected}" in c for c in cmds)
    assert f"rank-{expected}: " in text and "<- chosen" in text


def test_tune_selection_ties_and_missing_runs(tmp_path):
    out = tmp_path / "vtab"
    base = out / "dmlab" / "tune" / "seed0"
    write_tune_run(base / "rank-4", (0.5, 0.6))
    write_tune_run(base / "rank-8", (0.5, 0.6))  # tie: the first grid point wins
    points = launch.grid_points(launch.parse_grid(["model.net.adapter.rank=4,8,16"]))
    names = launch.point_names(points)
    best, rows = run_vtab1k.select_point(out, "dmlab", points, names, [0], "last")
    assert best == (("model.net.adapter.rank", "4"),)
    assert rows[2]["mean"] is None  # rank 16 has no finished run: not a candidate
    best, _ = run_vtab1k.select_point(out, "cifar", points, names, [0], "last")
    assert best is None


def test_launcher_runs_tune_selects_and_runs_final_then_resumes(tmp_path, fake_python, capsys):
    out = tmp_path / "vtab"
    argv = ["--tasks", "cifar", "--seeds", "0", "1", "--out", str(out), "--python",
            str(fake_python)]  # fmt: skip
    argv += ["--grid", "model.net.adapter.rank=4,8", "--delete-checkpoints"]
    assert run_vtab1k.main(argv) == 0
    ran = calls(tmp_path)
    assert len(ran) == 2 * 2 + 2
    finals = [c for c in ran if "data.split=final" in c]
    assert [c[1] for c in finals] == ["seed=0", "seed=1"]
    assert all("model.net.adapter.rank=8" in c for c in finals)  # fake: rank 8 is the best
    selection = json.loads((out / "cifar" / "tune" / "selection.json").read_text())
    assert selection["chosen"] == ["model.net.adapter.rank=8"]
    assert selection["points"][1]["mean"] == pytest.approx(0.755)
    assert not (out / "cifar" / "final" / "seed0" / "checkpoints").exists()
    assert "6 run(s) finished now, 0 were finished already, 0 failed" in capsys.readouterr().out
    # started again: everything is finished, nothing runs
    assert run_vtab1k.main(argv) == 0
    assert len(calls(tmp_path)) == 6
    text = capsys.readouterr().out
    assert "0 run(s) finished now, 6 were finished already" in text
    assert "warning" not in text  # same overrides as recorded
    # asking other overrides for a finished run warns
    assert run_vtab1k.main([*argv, "--stages", "final", "--extra", "trainer.max_epochs=5"]) == 0
    assert "was made with other overrides" in capsys.readouterr().out


def test_launcher_stops_at_the_first_failure_unless_keep_going(
    tmp_path, fake_python, capsys, monkeypatch
):
    monkeypatch.setenv("FAKE_FAIL_SEED", "1")
    out = tmp_path / "vtab"
    argv = ["--tasks", "cifar", "dtd", "--seeds", "0", "1", "--out", str(out), "--python",
            str(fake_python)]  # fmt: skip
    assert run_vtab1k.main(argv) == 1
    err = capsys.readouterr().err
    assert "run failed (exit code 3): cifar tune seed 1" in err
    assert "start the launcher again with the same arguments" in err
    assert len(calls(tmp_path)) == 2  # cifar tune seed 0, then seed 1 failed
    assert run_vtab1k.main([*argv, "--keep-going"]) == 1
    text = capsys.readouterr().out
    # seed 0's runs go on (tune seed 0 already finished), seed 1's fail
    assert "3 run(s) finished now, 1 were finished already, 4 failed" in text
    assert (out / "dtd" / "final" / "seed0" / "summary.json").is_file()


def test_launcher_argument_errors(tmp_path, capsys):
    for argv, message in [
        (["--tasks", "nope"], "unknown VTAB-1K task 'nope'"),
        (["--extra", "seed=3"], "the launcher sets seed itself"),
        (["--extra", "trainer"], "is not a Hydra override"),
        (["--grid", "model.net.adapter.rank="], "non-empty values"),
        (["--grid", "data.split=tune,final"], "the launcher sets data.split itself"),
        (["--extra", "model.net.adapter.rank=4,8"], "is a sweep: give its values with --grid"),
        (["--grid", "model.net.exits=[3,6"], "is not a Hydra override"),
    ]:
        assert run_vtab1k.main(["--dry-run", "--out", str(tmp_path), *argv]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_vtab1k.main(["--select-by", "best"])
    assert "use last, mean or budget:F" in capsys.readouterr().err


def test_override_helpers():
    assert launch.parse_grid(["model.net.exits=[3,6,9,12],[6,12]", "+x='a,b',c"]) == [
        ("model.net.exits", ["[3,6,9,12]", "[6,12]"]),
        ("+x", ["'a,b'", "c"]),
    ]
    assert launch.hydra_value("out/vtab1k/cifar/tune/seed0") == "out/vtab1k/cifar/tune/seed0"
    assert launch.hydra_value("out/a,b") == "'out/a,b'"
    points = launch.grid_points(launch.parse_grid(["model.net.exits=[3,6,9,12],[6,12]"]))
    assert launch.point_names(points) == {
        (("model.net.exits", "[3,6,9,12]"),): "exits-3_6_9_12",
        (("model.net.exits", "[6,12]"),): "exits-6_12",
    }
    assert launch.grid_points([]) == [()]


# ---------------------------------------------------------------------- consistency
def test_task_list_matches_the_package_and_configs():
    from met_lightning.data.vtab import VTAB_TASKS

    assert run_vtab1k.VTAB_GROUPS == {t.name: t.group for t in VTAB_TASKS.values()}
    assert list(run_vtab1k.VTAB_GROUPS) == list(VTAB_TASKS)
    for task in VTAB_TASKS:
        assert (run_vtab1k.EXPERIMENT_DIR / f"{task}.yaml").is_file()


def test_tune_and_final_overrides_compose(tmp_path, capsys):
    argv = ["--dry-run", "--tasks", "dmlab", "--seeds", "3", "--out", str(tmp_path), "--grid",
            "model.net.adapter.rank=4"]  # fmt: skip
    assert run_vtab1k.main(argv) == 0
    tune, final = commands(capsys.readouterr().out)
    cfg = compose_config(overrides_of(tune)[:-1], tmp_path)  # hydra.run.dir is Hydra's own
    assert (cfg.data.task, cfg.data.split, cfg.seed, cfg.model.net.adapter.rank) == (
        "dmlab",
        "tune",
        3,
        4,
    )
    cfg = compose_config(overrides_of(final)[:-1], tmp_path)
    assert (cfg.data.split, cfg.model.net.adapter.rank) == ("final", 4)  # one point: no choice


def test_cifar100_launcher_cli_dry_run(tmp_path):
    out = tmp_path / "c100"
    (out / "seed1").mkdir(parents=True)
    (out / "seed1" / "summary.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "experiments/run_cifar100.py", "--dry-run", "--seeds", "0", "1", "2",
         "--out", str(out), "--extra", "trainer=ddp"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert [overrides_of(c) for c in cmds] == [
        ["+experiment=cifar100", f"seed={s}", "trainer=ddp", f"hydra.run.dir={out}/seed{s}"]
        for s in (0, 2)
    ]
    assert "2 run(s) to do, 1 finished already" in result.stdout
    assert (REPO / "conf" / "experiment" / f"{run_cifar100.EXPERIMENT}.yaml").is_file()
    help_text = subprocess.run(
        [sys.executable, "experiments/run_vtab1k.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "10-15 min per run" in help_text and "6 GB" in help_text
    assert yaml.safe_load("- a=b") == ["a=b"]  # what the skip check reads


@pytest.mark.slow
def test_vtab_suite_end_to_end_on_a_tiny_model(tmp_path):
    """Real runs (~30 s): tune over 2 ranks, final with the chosen one, then the report."""
    from tests.data_fixtures import write_vtab_task

    write_vtab_task(tmp_path / "vtab-1k", "kitti", num_classes=4)
    out = tmp_path / "runs"
    extra = ["backbone=demo_vit", *TINY_OVERRIDES, "trainer=cpu", "trainer.max_epochs=1",
             "logger=none", f"data.root={tmp_path / 'vtab-1k'}", "data.num_workers=0",
             "data.batch_size=4", "scheduler.warmup_epochs=0"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "experiments/run_vtab1k.py", "--tasks", "kitti", "--seeds", "0",
         "--out", str(out), "--grid", "model.net.adapter.rank=2,4", "--extra", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 run(s) finished now" in result.stdout
    selection = json.loads((out / "kitti" / "tune" / "selection.json").read_text())
    config = yaml.safe_load((out / "kitti" / "final" / "seed0" / "config.yaml").read_text())
    assert [f"model.net.adapter.rank={config['model']['adapter']['rank']}"] == selection["chosen"]
    assert config["data"]["split"] == "final" and config["data"]["task"] == "kitti"
    md = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, "experiments/report.py", str(out), "--out", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = md.read_text()
    assert "## VTAB-1K suite" in text and "- met: 1 of 19 tasks" in text


# ---------------------------------------------------------------------- --launcher: multiruns
def test_dry_run_with_a_hydra_launcher_prints_one_multirun_per_seed_sweep(tmp_path, capsys):
    """--launcher local_procs: the tune stage of both tasks, then their final stage, as multiruns
    over the seeds whose jobs' folders (hydra.sweep.dir / subdir) are the runs' own folders."""
    out = tmp_path / "vtab"
    write_tune_run(out / "dmlab" / "tune" / "seed1" / "rank-8", (0.5, 0.6))  # finished: skipped
    argv = ["--dry-run", "--tasks", "cifar", "dmlab", "--seeds", "0", "1", "--out", str(out),
            "--grid", "model.net.adapter.rank=4,8", "--launcher", "local_procs",
            "--launcher-arg", "timeout_min=30", "--extra", "trainer=cpu"]  # fmt: skip
    assert run_vtab1k.main(argv) == 0
    text = capsys.readouterr().out
    cmds = commands(text)
    head = [sys.executable, "-m", "met_lightning", "-m", "hydra/launcher=local_procs",
            "hydra.launcher.timeout_min=30"]  # fmt: skip
    assert all(c[:6] == head for c in cmds)
    SUBDIR = "hydra.sweep.subdir=seed${seed}"  # noqa: N806
    assert [c[6:] for c in cmds] == [
        ["+experiment=vtab1k/cifar", "seed=0,1", "data.split=tune", "model.net.adapter.rank=4",
         "trainer=cpu", f"hydra.sweep.dir={out}/cifar/tune", f"{SUBDIR}/rank-4"],
        ["+experiment=vtab1k/cifar", "seed=0,1", "data.split=tune", "model.net.adapter.rank=8",
         "trainer=cpu", f"hydra.sweep.dir={out}/cifar/tune", f"{SUBDIR}/rank-8"],
        ["+experiment=vtab1k/dmlab", "seed=0,1", "data.split=tune", "model.net.adapter.rank=4",
         "trainer=cpu", f"hydra.sweep.dir={out}/dmlab/tune", f"{SUBDIR}/rank-4"],
        ["+experiment=vtab1k/dmlab", "seed=0", "data.split=tune", "model.net.adapter.rank=8",
         "trainer=cpu", f"hydra.sweep.dir={out}/dmlab/tune", f"{SUBDIR}/rank-8"],
        ["+experiment=vtab1k/cifar", "seed=0,1", "data.split=final",
         f"model.net.adapter.rank={run_vtab1k.PLACEHOLDER}", "trainer=cpu",
         f"hydra.sweep.dir={out}/cifar/final", "hydra.sweep.subdir=seed${seed}"],
        ["+experiment=vtab1k/dmlab", "seed=0,1", "data.split=final",
         f"model.net.adapter.rank={run_vtab1k.PLACEHOLDER}", "trainer=cpu",
         f"hydra.sweep.dir={out}/dmlab/final", "hydra.sweep.subdir=seed${seed}"],
    ]  # fmt: skip
    assert "# skip, finished:" in text and "11 run(s) to do, 1 finished already" in text
    # what Hydra's basic sweeper makes of a command: one job per seed, in the run's folder
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(cmds[0][4:])
    seeds = next(o for o in parsed if o.key_or_group == "seed")
    subdir = next(o for o in parsed if o.key_or_group == "hydra.sweep.subdir").value()
    assert [o.key_or_group for o in parsed if o.is_sweep_override()] == ["seed"]
    jobs = [OmegaConf.create({"seed": int(s), "sub": subdir}).sub
            for s in seeds.sweep_string_iterator()]  # fmt: skip
    assert jobs == ["seed0/rank-4", "seed1/rank-4"]
    assert not out.joinpath("cifar").exists()  # a dry run writes nothing


def test_ablation_dry_run_with_a_hydra_launcher_and_launcher_errors(tmp_path, capsys):
    from experiments import run_ablation

    out = tmp_path / "abl"
    argv = ["--dry-run", "--settings", "met", "lora", "--seeds", "0", "1", "--out", str(out)]
    assert run_ablation.main([*argv, "--launcher", "slurm", "--launcher-arg", "partition=cpu"]) == 0
    assert [c[4:] for c in commands(capsys.readouterr().out)] == [
        ["hydra/launcher=slurm", "hydra.launcher.partition=cpu", *run_ablation.SCHEDULE,
         *overrides, "seed=0,1",
         f"hydra.sweep.dir={out}/{setting}", "hydra.sweep.subdir=seed${seed}"]
        for setting, overrides in (("met", ["method=met"]), ("lora", ["method=lora"]))
    ]  # fmt: skip
    # without --launcher: today's commands, one run after the other
    assert run_ablation.main(argv) == 0
    assert [c[-1] for c in commands(capsys.readouterr().out)] == [
        f"hydra.run.dir={out}/{s}/seed{n}" for s in ("met", "lora") for n in (0, 1)
    ]
    for extra, message in [
        (["--launcher", "submitit_slurm"], "error: --launcher 'submitit_slurm' is not one of "
         "local_procs, slurm (the launchers of conf/hydra/launcher/*.yaml)\n"),
        (["--launcher-arg", "partition=gpu"], "error: --launcher-arg 'partition=gpu' needs "
         "--launcher\n"),
        (["--launcher", "slurm", "--launcher-arg", "partition"], "write KEY=VALUE"),
        (["--extra", "hydra/launcher=slurm"], "give the launcher with --launcher NAME"),
        (["--extra", "hydra.sweep.subdir=x"], "the launcher sets hydra.sweep.subdir itself"),
    ]:  # fmt: skip
        assert run_ablation.main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
