"""Launch the VTAB-1K suite: every task x seed, stage `tune` (train800 / val200, an optional grid),
then stage `final` (train800val200 / test) with the grid point that was best on val200.

Each run is its own process, `python -m met_lightning +experiment=vtab1k/<task> seed=S
data.split=tune|final [grid values] [--extra ...] hydra.run.dir=<out>/<task>/<stage>/seed<S>[/<grid
point>]`. A run whose folder has summary.json is finished and skipped, so the launcher can be
started again after an interruption. Then: `python experiments/report.py <out> --out report.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python experiments/run_vtab1k.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import launch  # noqa: E402
from met_lightning.atomic import write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_DIR = REPO / "conf" / "experiment" / "vtab1k"
# Task -> group, in the order of met_lightning.data.vtab.VTAB_TASKS (tests check they agree; a
# copy, so that the launcher and the report start without importing torch).
VTAB_GROUPS: dict[str, str] = {
    **dict.fromkeys(
        ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
        "natural",
    ),
    **dict.fromkeys(
        ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"], "specialized"
    ),
    **dict.fromkeys(
        [
            "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
            "smallnorb_azi", "smallnorb_ele",
        ],
        "structured",
    ),
}  # fmt: skip
GROUPS = ("natural", "specialized", "structured")
MINUTES_PER_RUN = (10.0, 15.0)
STAGES = ("tune", "final")
PLACEHOLDER = "<chosen-by-tune>"

DESCRIPTION = (
    __doc__
    + """
cost (estimates, not measured here):
  time  ViT-B/16 in21k, 1000 training images, 100 epochs: about 10-15 min per run on one
        A100-class GPU. Runs = tasks x (tune seeds x grid points + seeds). All 19 tasks, seeds
        0 1 2, no grid: 19 x (3 + 3) = 114 runs, about 19-29 GPU hours; --stages final only:
        57 runs, about 10-14 hours; a 2 x 2 grid tuned on seed 0 only (--tune-seeds 0):
        19 x (4 + 3) = 133 runs, about 22-33 hours. --dry-run counts the runs left to do.
  disk  VTAB-1K data about 6 GB (prepared as in NOAH's README); the ViT-B/16 weights about
        330 MB once; per run about 15-45 MB (checkpoints/: best and last Lightning checkpoints
        with AdamW state; --delete-checkpoints removes them once a run is done) plus the logit
        store of val200 and test (all 19 final runs of one seed together about 250 MB, of which
        sun397 alone about 140 MB).

examples:
  python experiments/run_vtab1k.py --dry-run
  python experiments/run_vtab1k.py --seeds 0 1 2 --out outputs/vtab1k \\
      --extra data.root=/data/vtab-1k
  python experiments/run_vtab1k.py --tasks natural dmlab --tune-seeds 0 \\
      --grid model.net.adapter.rank=4,8 --grid model.loss.graph_weight=0.1,0.3
  python experiments/run_vtab1k.py --seeds 0 1 2 --out outputs/vtab1k --launcher slurm \\
      --launcher-arg partition=gpu --launcher-arg gpus_per_node=1 --extra trainer.devices=1
  python experiments/report.py outputs/vtab1k --out experiments/results/vtab1k.md
"""
)


def parse_tasks(names: Sequence[str]) -> list[str]:
    """Task names and group names (natural, specialized, structured), in suite order."""
    chosen: set[str] = set()
    for name in names:
        if name in GROUPS:
            chosen.update(t for t, g in VTAB_GROUPS.items() if g == name)
        elif name in VTAB_GROUPS:
            chosen.add(name)
        else:
            raise launch.LaunchError(
                f"unknown VTAB-1K task {name!r}; tasks: {', '.join(VTAB_GROUPS)}; "
                f"groups: {', '.join(GROUPS)}"
            )
    return [t for t in VTAB_GROUPS if t in chosen]


def task_dir(out: Path, task: str) -> Path:
    return Path(out) / task


def tune_run(
    out: Path, task: str, seed: int, point: launch.GridPoint, name: str, extra: Sequence[str]
) -> launch.Run:
    run_dir = task_dir(out, task) / "tune" / f"seed{seed}"
    if name:
        run_dir = run_dir / name
    overrides = (
        f"+experiment=vtab1k/{task}", f"seed={seed}", "data.split=tune",
        *launch.point_overrides(point), *extra,
    )  # fmt: skip
    label = f"{task} tune seed {seed}" + (f" {name}" if name else "")
    return launch.Run(run_dir, overrides, label)


def final_run(
    out: Path, task: str, seed: int, overrides: Sequence[str], extra: Sequence[str]
) -> launch.Run:
    run_dir = task_dir(out, task) / "final" / f"seed{seed}"
    all_overrides = (
        f"+experiment=vtab1k/{task}", f"seed={seed}", "data.split=final", *overrides, *extra,
    )  # fmt: skip
    return launch.Run(run_dir, all_overrides, f"{task} final seed {seed}")


def select_point(
    out: Path,
    task: str,
    points: Sequence[launch.GridPoint],
    names: dict[launch.GridPoint, str],
    seeds: Sequence[int],
    metric: str = "last",
) -> tuple[launch.GridPoint | None, list[dict]]:
    """The grid point with the best mean tune score over `seeds` (ties: the first in grid order).

    Returns the point (None if no tune run of this task is finished) and one row per point:
    {name, overrides, scores {seed: score}, mean}. Points without a finished run are left out of
    the choice; a point is compared on the seeds it has.
    """
    rows, best, best_mean = [], None, None
    for point in points:
        scores = {}
        for seed in seeds:
            run = tune_run(out, task, seed, point, names[point], ())
            score = launch.selection_score(run.run_dir, metric)
            if score is not None:
                scores[seed] = score
        mean = statistics.fmean(scores.values()) if scores else None
        rows.append(
            {"name": names[point], "overrides": launch.point_overrides(point), "scores": scores,
             "mean": mean}
        )  # fmt: skip
        if mean is not None and (best_mean is None or mean > best_mean):
            best, best_mean = point, mean
    return best, rows


def describe_selection(task: str, metric: str, rows: Sequence[dict], chosen: str | None) -> str:
    lines = [f"# {task}: tune score ({metric}, mean over the finished tune seeds):"]
    for row in rows:
        mean = "-" if row["mean"] is None else f"{100 * row['mean']:.2f} %"
        mark = "  <- chosen" if row["name"] == chosen else ""
        lines.append(f"#   {row['name']}: {mean} (seeds {sorted(row['scores'])}){mark}")
    return "\n".join(lines)


def tune_stage(
    task: str,
    args: argparse.Namespace,
    launcher: launch.Launcher,
    points: Sequence[launch.GridPoint],
) -> bool:
    """Launch (or queue) the task's tune runs; True if a dry run leaves some of them to do."""
    names = launch.point_names(points)
    tune_seeds = args.tune_seeds if args.tune_seeds is not None else args.seeds
    pending = False
    if "tune" in args.stages:
        for seed in tune_seeds:
            for point in points:
                run = tune_run(args.out, task, seed, point, names[point], args.extra)
                state = launcher.launch(run)
                pending |= state == "planned" or (state == "queued" and launcher.dry_run)
    return pending


def final_stage(
    task: str,
    args: argparse.Namespace,
    launcher: launch.Launcher,
    points: Sequence[launch.GridPoint],
    tune_pending: bool,
) -> None:
    """Choose the task's grid point from its finished tune runs, launch (or queue) its final
    runs."""
    names = launch.point_names(points)
    tune_seeds = args.tune_seeds if args.tune_seeds is not None else args.seeds
    if "final" not in args.stages:
        return
    if len(points) == 1:  # nothing to choose
        chosen: list[str] | None = launch.point_overrides(points[0])
    else:
        best, rows = select_point(args.out, task, points, names, tune_seeds, args.select_by)
        if tune_pending:  # dry run with tune runs still to do
            best = None
        else:
            launcher.say(describe_selection(task, args.select_by, rows, names.get(best)))
        if best is None:
            if not launcher.dry_run:
                message = f"{task}: no finished tune run to choose the grid point from"
                if not launcher.keep_going:
                    raise launch.LaunchError(message + " (run the tune stage first)")
                launcher.say(f"# {message}; --keep-going: no final runs for {task}")
                return
            chosen = None
            launcher.say(f"# {task}: final runs wait for the tune stage; shown with {PLACEHOLDER}")
        else:
            chosen = launch.point_overrides(best)
            if not launcher.dry_run:
                record = {"metric": args.select_by, "seeds": list(tune_seeds), "points": rows,
                          "chosen": chosen}  # fmt: skip
                path = task_dir(args.out, task) / "tune" / "selection.json"
                write_text(path, json.dumps(record, indent=2))  # atomic
    if chosen is None:
        chosen = [f"{key}={PLACEHOLDER}" for key, _ in points[0]]
    for seed in args.seeds:
        launcher.launch(final_run(args.out, task, seed, chosen, args.extra))


def build_parser() -> argparse.ArgumentParser:
    parser = launch.make_parser("run_vtab1k.py", DESCRIPTION, "outputs/vtab1k")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(VTAB_GROUPS),
        metavar="TASK",
        help="tasks and/or groups (natural, specialized, structured); default: all 19",
    )
    parser.add_argument(
        "--tune-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the tune stage (default: --seeds)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a tune grid axis, repeatable (the grid is their product), e.g. "
        "--grid model.net.adapter.rank=4,8 --grid model.loss.graph_weight=0.1,0.3",
    )
    launch.add_choices(
        parser,
        "--stages",
        STAGES,
        "stages to run (default: tune final); final alone reads the tune runs if --grid",
    )
    parser.add_argument(
        "--select-by", type=launch.parse_select, default="last", help=launch.SELECT_HELP
    )
    return parser


def body(args: argparse.Namespace) -> int:
    tasks = parse_tasks(args.tasks)
    missing = [t for t in tasks if not (EXPERIMENT_DIR / f"{t}.yaml").is_file()]
    if missing:
        raise launch.LaunchError(f"no experiment config for {missing} in {EXPERIMENT_DIR}")
    points = launch.grid_points(launch.parse_grid(args.grid))
    launcher = launch.make_launcher(args)
    launcher.say(
        f"# VTAB-1K: {len(tasks)} task(s), seeds {args.seeds}, stages {args.stages}, "
        f"{len(points)} grid point(s), results in {args.out}"
    )
    if not launcher.hydra_launcher:  # one run after the other, task by task
        for task in tasks:
            final_stage(task, args, launcher, points, tune_stage(task, args, launcher, points))
        return launcher.finish(MINUTES_PER_RUN)
    # --launcher: every task's tune runs at once, wait, then every task's final runs at once
    pending = {task: tune_stage(task, args, launcher, points) for task in tasks}
    launcher.flush()
    for task in tasks:
        final_stage(task, args, launcher, points, pending[task])
    return launcher.finish(MINUTES_PER_RUN)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.run_main(body, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
