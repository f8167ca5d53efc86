"""What the experiment launchers share: one training run per subprocess, resumable, dry-runnable.

A run is `python -m met_lightning OVERRIDES hydra.run.dir=RUN_DIR`. It counts as finished when
RUN_DIR/summary.json exists (train() writes it last), so a launcher started again skips what is
done and goes on where it stopped. `--dry-run` prints the commands instead of running them.

With `--launcher NAME` (conf/hydra/launcher/NAME.yaml: slurm, local_procs) the runs of a stage
are not run one after the other but submitted as Hydra multiruns through submitit, all at once,
and the launcher waits for them before the next stage: runs that differ only in their seed are
one multirun, `python -m met_lightning -m hydra/launcher=NAME [hydra.launcher.KEY=VALUE ...]
OVERRIDES seed=0,1,2 hydra.sweep.dir=PARENT 'hydra.sweep.subdir=seed${seed}[/REST]'`, so that
each job's folder is the run's own folder PARENT/seed<S>[/REST] (Hydra's sweep.dir/subdir).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

SUMMARY_FILE = "summary.json"
BUDGET_FILE = "budget.json"
METRICS_FILE = "metrics.csv"
OVERRIDES_FILE = ".hydra/overrides.yaml"
# Keys the launchers set themselves; --extra / --grid may not set them.
RESERVED_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "seed", "data.split")
REPO = Path(__file__).resolve().parents[1]
LAUNCHER_DIR = REPO / "conf" / "hydra" / "launcher"  # the choices of --launcher


class LaunchError(Exception):
    """A launcher stops with this message (exit code 1)."""


# ---------------------------------------------------------------------- overrides
_PARSER = OverridesParser.create()  # Hydra's own override grammar


def parse_override(text: str, what: str) -> Override:
    """`text` as Hydra reads it; a LaunchError naming `what` if it is not an override."""
    try:
        return _PARSER.parse_override(text)
    except HydraException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaunchError(
            f"{what} {text!r} is not a Hydra override: write key=value ({first})"
        ) from None


def hydra_value(value: str | Path) -> str:
    """`value` as the right-hand side of a Hydra override that Hydra reads back as `value`:
    bare if it can (`out/seed0`), else quoted (`'out/rank=4'`, `'out/a,b'`)."""
    text = str(value)
    for candidate in (text, f"'{text}'", f'"{text}"'):
        try:
            parsed = _PARSER.parse_override(f"key={candidate}")
        except HydraException:
            continue
        if not parsed.is_sweep_override() and parsed.value() == text:
            return candidate
    raise LaunchError(f"cannot pass {text!r} to Hydra as a plain string")


def check_override(text: str, what: str) -> Override:
    """A `key=value` (or `~key`) override that does not touch the keys the launcher sets."""
    override = parse_override(text, what)
    if override.key_or_group in RESERVED_KEYS:
        raise LaunchError(f"{what} {text!r}: the launcher sets {override.key_or_group} itself")
    return override


GridPoint = tuple[tuple[str, str], ...]  # ((key, value), ...) in the order given


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`["model.net.adapter.rank=4,8", "model.loss.graph_weight=0.1,0.3"]` -> keys with values (as
    Hydra writes each value of the sweep)."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        override = check_override(spec, "--grid")
        key = override.get_key_element()
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        if not values or any(v in ("", "''", '""') for v in values):
            raise LaunchError(f"--grid {spec!r}: write key=v1,v2,... with non-empty values")
        if key in (k for k, _ in grid):
            raise LaunchError(f"--grid names {key} twice")
        if len(set(values)) != len(values):
            raise LaunchError(f"--grid {spec!r} repeats a value")
        grid.append((key, values))
    return grid


def grid_points(grid: Sequence[tuple[str, list[str]]]) -> list[GridPoint]:
    """Every combination, the first key varying slowest; [()] for an empty grid."""
    keys = [key for key, _ in grid]
    return [
        tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grid))
    ]


def point_overrides(point: GridPoint) -> list[str]:
    return [f"{key}={value}" for key, value in point]


def point_names(points: Sequence[GridPoint]) -> dict[GridPoint, str]:
    """A folder name per grid point, e.g. `rank-4_graph_weight-0.1` (unique within `points`)."""
    if not points or points == [()]:
        return {p: "" for p in points}
    keys = [key for key, _ in points[0]]
    short = [key.rsplit(".", 1)[-1] for key in keys]
    if len(set(short)) != len(short):  # e.g. model.loss.weight and optimizer.weight
        short = [key.replace(".", "-") for key in keys]

    def clean(value: str) -> str:
        return re.sub(r"[^\w.+\-]+", "_", value).strip("_") or "_"

    names = {
        p: "_".join(f"{s}-{clean(v)}" for s, (_, v) in zip(short, p, strict=True)) for p in points
    }
    if len(set(names.values())) != len(names):  # values that differ only in odd characters
        names = {p: f"point{i}" for i, p in enumerate(points)}
    return names


# ---------------------------------------------------------------------- run folders
def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).is_file()


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """The task overrides Hydra recorded for a run (.hydra/overrides.yaml), None if unreadable."""
    path = Path(run_dir) / OVERRIDES_FILE
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return None
    return [str(x) for x in data] if isinstance(data, list) else None


def metric_from_csv(run_dir: Path, name: str) -> float | None:
    """The last logged value of `name` in the run's metrics.csv (CSV logger), None if absent."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    value = None
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row.get(name) not in (None, ""):
                value = float(row[name])
    return value


SELECT_HELP = (
    "how tune runs are compared, all on the tune split's held-out val200: "
    "'last' = last-exit accuracy (summary.json; metrics.csv val/acc_best if missing), "
    "'mean' = mean accuracy over all exits, 'budget:F' = accuracy with thresholds chosen for "
    "budget F (budget.json; F must be in callbacks.budget_analysis.budgets)"
)


def parse_select(text: str) -> str:
    """argparse type of --select-by: last | mean | budget:F."""
    if text in ("last", "mean"):
        return text
    if text.startswith("budget:"):
        try:
            float(text.split(":", 1)[1])
        except ValueError:
            pass
        else:
            return text
    raise argparse.ArgumentTypeError(f"{text!r}: use last, mean or budget:F (e.g. budget:0.5)")


def selection_score(run_dir: Path, metric: str = "last") -> float | None:
    """The held-out score of a finished run by `metric` (see SELECT_HELP); None if unavailable."""
    run_dir = Path(run_dir)
    try:
        summary = read_json(run_dir / SUMMARY_FILE)
    except (OSError, ValueError):
        return None
    accs = [e.get("accuracy") for e in summary.get("exits", [])]
    if metric == "last":
        if accs and accs[-1] is not None:
            return float(accs[-1])
        return metric_from_csv(run_dir, "val/acc_best")
    if metric == "mean":
        if not accs or any(a is None for a in accs):
            return None
        return sum(accs) / len(accs)
    budget = float(metric.split(":", 1)[1])
    try:
        report = read_json(run_dir / BUDGET_FILE)
    except (OSError, ValueError):
        return None
    for entry in report.get("budgets", []):
        if math.isclose(float(entry["budget"]), budget, rel_tol=1e-9):
            return float(entry["evaluated"]["accuracy"])
    return None


# ---------------------------------------------------------------------- launching
@dataclass(frozen=True)
class Run:
    """One training run: its folder and overrides (hydra.run.dir is added by `command`)."""

    run_dir: Path
    overrides: tuple[str, ...]
    label: str = ""

    def command(self, python: str = sys.executable) -> list[str]:
        run_dir = f"hydra.run.dir={hydra_value(self.run_dir)}"
        return [python, "-m", "met_lightning", *self.overrides, run_dir]


@dataclass(frozen=True)
class Sweep:
    """Runs submitted as one Hydra multirun: `seed` swept, each job in its run's folder
    (hydra.sweep.dir / hydra.sweep.subdir, where the subdir names the job's seed)."""

    runs: tuple[Run, ...]
    overrides: tuple[str, ...]  # the runs' overrides, seed=S1,S2,... for their seeds
    sweep_dir: Path
    subdir: str  # e.g. seed${seed}/rank-4: Hydra resolves it in each job's config

    def command(self, python: str, launcher: Sequence[str]) -> list[str]:
        return [python, "-m", "met_lightning", "-m", *launcher, *self.overrides,
                f"hydra.sweep.dir={hydra_value(self.sweep_dir)}",
                f"hydra.sweep.subdir={hydra_value(self.subdir)}"]  # fmt: skip


def _seed_shape(run: Run) -> tuple[tuple, str] | None:
    """(what the run shares with its seed siblings, its seed) if the run has one `seed=S` and a
    folder .../seed<S>/..., else None."""
    seeds = [o for o in run.overrides if o.startswith("seed=")]
    if len(seeds) != 1:
        return None
    seed = seeds[0].split("=", 1)[1]
    parts = Path(run.run_dir).parts
    if not seed.isdigit() or f"seed{seed}" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index(f"seed{seed}")
    shared = tuple("seed=" if o == seeds[0] else o for o in run.overrides)
    return (shared, parts[:at], parts[at + 1 :]), seed


def group_sweeps(runs: Sequence[Run]) -> list[Sweep]:
    """The runs as Hydra multiruns: runs that differ only in their seed are one multirun over
    `seed`; any other run is a multirun of its own (hydra.sweep.dir=RUN_DIR subdir=.)."""
    groups: dict[Any, list[tuple[Run, str]]] = {}
    for n, run in enumerate(runs):
        shape = _seed_shape(run)
        key, seed = shape if shape is not None else (n, "")
        groups.setdefault(key, []).append((run, seed))
    sweeps = []
    for key, members in groups.items():
        group = tuple(run for run, _ in members)
        if isinstance(key, int):
            sweeps.append(Sweep(group, group[0].overrides, Path(group[0].run_dir), "."))
            continue
        shared, parent, rest = key
        seeds = ",".join(seed for _, seed in members)
        overrides = tuple(f"seed={seeds}" if o == "seed=" else o for o in shared)
        subdir = "/".join(("seed${seed}", *rest))
        sweeps.append(Sweep(group, overrides, Path(*parent) if parent else Path("."), subdir))
    return sweeps


def launcher_names() -> list[str]:
    return sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))


def hydra_launcher_overrides(name: str | None, args: Sequence[str]) -> tuple[str, ...]:
    """`--launcher NAME --launcher-arg KEY=VALUE ...` as Hydra overrides: hydra/launcher=NAME
    hydra.launcher.KEY=VALUE ...; () without a launcher."""
    if name is None:
        if args:
            raise LaunchError(f"--launcher-arg {args[0]!r} needs --launcher")
        return ()
    choices = launcher_names()
    if name not in choices:
        raise LaunchError(
            f"--launcher {name!r} is not one of {', '.join(choices)} "
            f"(the launchers of {LAUNCHER_DIR.relative_to(REPO)}/*.yaml)"
        )
    overrides = [f"hydra/launcher={name}"]
    for text in args:
        text = text.removeprefix("hydra.launcher.")
        if (
            "=" not in text
            or not text.split("=")[0]
            or parse_override(f"hydra.launcher.{text}", "--launcher-arg").is_sweep_override()
        ):
            raise LaunchError(f"--launcher-arg {text!r}: write KEY=VALUE, one value (e.g. "
                              "partition=gpu, timeout_min=120)")  # fmt: skip
        overrides.append(f"hydra.launcher.{text}")
    return tuple(overrides)


@dataclass
class Launcher:
    """Runs (or, with dry_run, prints) runs one after the other; skips finished ones. With a
    Hydra launcher (`hydra_launcher`: hydra/launcher=NAME ...), `launch` queues the runs and
    `flush` submits the queued ones as multiruns at once and waits for them."""

    python: str = sys.executable
    dry_run: bool = False
    keep_going: bool = False
    delete_checkpoints: bool = False
    hydra_launcher: tuple[str, ...] = ()
    multiruns_at_once: int = 8
    queued: list[Run] = field(default_factory=list)
    out: TextIO | None = None  # None: sys.stdout at call time (pytest's capsys replaces it)
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    planned: list[Run] = field(default_factory=list)  # dry run: would run these
    failed: list[tuple[Run, str]] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def launch(self, run: Run) -> str:
        """'skipped' | 'queued' (with a Hydra launcher) | 'planned' (dry run) | 'ok' | 'failed'
        (only with keep_going)."""
        command = shlex.join(run.command(self.python))
        if is_finished(run.run_dir):
            self.skipped.append(run)
            self.say(f"# skip, finished: {command}")
            self._check_recorded(run)
            return "skipped"
        if self.hydra_launcher:
            self.queued.append(run)
            return "queued"
        if self.dry_run:
            self.planned.append(run)
            self.say(command)
            return "planned"
        self.say(f"\n### {run.label or run.run_dir}\n{command}")
        start = time.monotonic()
        try:
            rc = subprocess.run(run.command(self.python), check=False).returncode
        except OSError as err:  # e.g. --python points nowhere
            rc, reason = None, f"could not start it: {err}"
        else:
            reason = f"exit code {rc}"
        minutes = (time.monotonic() - start) / 60
        if rc == 0 and not is_finished(run.run_dir):
            rc, reason = -1, f"exit code 0 but no {SUMMARY_FILE} in {run.run_dir}"
        if rc != 0:
            return self._failed(run, command, reason)
        self.ran.append(run)
        self.say(f"### finished in {minutes:.1f} min: {run.run_dir}")
        if self.delete_checkpoints:  # trainable.safetensors keeps the tested weights
            shutil.rmtree(Path(run.run_dir) / "checkpoints", ignore_errors=True)
        return "ok"

    def flush(self) -> None:
        """Submit the queued runs (a stage) as Hydra multiruns, `multiruns_at_once` at a time,
        and wait until all have ended; a dry run prints their commands."""
        runs, self.queued = self.queued, []
        if not runs:
            return
        sweeps = group_sweeps(runs)
        commands = [sweep.command(self.python, self.hydra_launcher) for sweep in sweeps]
        if self.dry_run:
            self.planned.extend(runs)
            for command in commands:
                self.say(shlex.join(command))
            return
        self.say(f"\n### {len(runs)} run(s) as {len(sweeps)} multirun(s), "
                 f"{self.hydra_launcher[0]}:")  # fmt: skip
        for command in commands:
            self.say(shlex.join(command))
        start = time.monotonic()

        def run_sweep(command: list[str]) -> str:
            try:
                return f"exit code {subprocess.run(command, check=False).returncode}"
            except OSError as err:  # e.g. --python points nowhere
                return f"could not start it: {err}"

        with ThreadPoolExecutor(max(1, self.multiruns_at_once)) as pool:
            ends = list(pool.map(run_sweep, commands))
        minutes = (time.monotonic() - start) / 60
        failures = []
        for sweep, command, end in zip(sweeps, commands, ends, strict=True):
            for run in sweep.runs:
                if not is_finished(run.run_dir):
                    failures.append((run, f"multirun {end}, no {SUMMARY_FILE}", command, sweep))
                    continue
                self.ran.append(run)
                if self.delete_checkpoints:
                    shutil.rmtree(Path(run.run_dir) / "checkpoints", ignore_errors=True)
        self.say(f"### multiruns ended in {minutes:.1f} min: {len(runs) - len(failures)} of "
                 f"{len(runs)} run(s) finished")  # fmt: skip
        for run, reason, _, sweep in failures:
            self.failed.append((run, reason))
            self.say(f"### run failed ({reason}): {run.label or run.run_dir}\n  its log: "
                     f"{Path(run.run_dir) / 'train.log'}; submitit's logs: "
                     f"{sweep.sweep_dir / '.submitit'}/")  # fmt: skip
        if failures and not self.keep_going:
            raise LaunchError(
                f"{len(failures)} run(s) failed (above), e.g. {failures[0][0].run_dir}\n"
                f"  command: {shlex.join(failures[0][2])}\n"
                "  fix the cause and start the launcher again with the same arguments: finished "
                "runs are skipped"
            )
        if failures:
            self.say("### --keep-going: going on")

    def _failed(self, run: Run, command: str, reason: str) -> str:
        self.failed.append((run, reason))
        message = (
            f"run failed ({reason}): {run.label or run.run_dir}\n  command: {command}\n"
            f"  its log: {Path(run.run_dir) / 'train.log'} (if it got that far)\n"
            "  fix the cause and start the launcher again with the same arguments: finished runs "
            "are skipped"
        )
        if not self.keep_going:
            raise LaunchError(message)
        self.say(f"### {message}\n### --keep-going: going on")
        return "failed"

    def _check_recorded(self, run: Run) -> None:
        """Warn when a finished run was made with other overrides than the ones asked now."""
        recorded = recorded_overrides(run.run_dir)
        if recorded is None:
            return
        missing = [o for o in run.overrides if o not in recorded]
        extra = [o for o in recorded if o not in run.overrides]
        if missing or extra:
            self.say(
                f"# warning: {run.run_dir} was made with other overrides (now asked: {missing}, "
                f"it had instead: {extra}); delete the folder to run it again"
            )

    def finish(self, minutes_per_run: tuple[float, float], hours: str = "GPU hours") -> int:
        """Run what is still queued, print the summary; the launcher's exit code (1 if a run
        failed)."""
        self.flush()
        self.say(self.summary(minutes_per_run, hours))
        return 1 if self.failed else 0

    def summary(self, minutes_per_run: tuple[float, float], hours: str = "GPU hours") -> str:
        lo, hi = minutes_per_run
        if self.dry_run:
            n = len(self.planned)
            return (
                f"# dry run: {n} run(s) to do, {len(self.skipped)} finished already; at "
                f"{lo:g}-{hi:g} min per run (estimate) that is {n * lo / 60:.1f}-"
                f"{n * hi / 60:.1f} {hours}"
            )
        text = (
            f"# {len(self.ran)} run(s) finished now, {len(self.skipped)} were finished already, "
            f"{len(self.failed)} failed"
        )
        for run, reason in self.failed:
            text += f"\n#   failed ({reason}): {run.run_dir}"
        return text


# ---------------------------------------------------------------------- command line
def make_parser(prog: str, description: str, default_out: str) -> argparse.ArgumentParser:
    """A launcher's argument parser with the arguments every launcher has."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, default_out)
    return parser


def add_choices(
    parser: argparse.ArgumentParser, flag: str, choices: Sequence[str], help: str, nargs="+"
) -> None:
    """`flag A B ...`, each one of `choices`; all of them by default."""
    parser.add_argument(flag, nargs=nargs, choices=list(choices), default=list(choices), help=help)


def add_results(parser: argparse.ArgumentParser, default: Path, what: str) -> None:
    """`--results FOLDER`: where a launcher writes `what`."""
    parser.add_argument(
        "--results", type=Path, default=default, help=f"where {what} go (default: {default})"
    )


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help=f"results root (default: {default_out})"
    )
    parser.add_argument(
        "--extra",
        nargs="+",
        action="extend",
        default=[],
        metavar="OVERRIDE",
        help="further Hydra overrides for every run, e.g. --extra trainer=cpu "
        "backbone.weights_file=/w/ViT-B_16.npz data.root=/data/vtab-1k",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after a failed run (default: stop at the first failure)",
    )
    parser.add_argument(
        "--delete-checkpoints",
        action="store_true",
        help="delete a finished run's checkpoints/ (Lightning .ckpt files for resuming; "
        "trainable.safetensors keeps the tested weights)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the Python that runs met_lightning (default: this one)",
    )
    parser.add_argument(
        "--launcher",
        metavar="NAME",
        help="submit each stage's runs as Hydra multiruns through this launcher of "
        f"conf/hydra/launcher/ ({', '.join(launcher_names())}) and wait for them; default: run "
        "them one after the other here",
    )
    parser.add_argument(
        "--launcher-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the launcher, repeatable, passed as hydra.launcher.KEY=VALUE, e.g. "
        "--launcher-arg partition=gpu --launcher-arg timeout_min=120",
    )
    parser.add_argument(
        "--multiruns-at-once",
        type=int,
        default=8,
        metavar="N",
        help="with --launcher: at most N multirun processes (each waits for its jobs) at a time "
        "(default: 8)",
    )


def make_launcher(args: argparse.Namespace) -> Launcher:
    for text in args.extra:
        override = check_override(text, "--extra")
        if override.is_sweep_override():
            raise LaunchError(f"--extra {text!r} is a sweep: give its values with --grid")
        if override.key_or_group.startswith(("hydra/launcher", "hydra.launcher")):
            raise LaunchError(f"--extra {text!r}: give the launcher with --launcher NAME "
                              "--launcher-arg KEY=VALUE")  # fmt: skip
    return Launcher(
        python=args.python,
        dry_run=args.dry_run,
        keep_going=args.keep_going,
        delete_checkpoints=args.delete_checkpoints,
        hydra_launcher=hydra_launcher_overrides(args.launcher, args.launcher_arg),
        multiruns_at_once=args.multiruns_at_once,
    )


def run_main(body, argv: Iterable[str] | None, parser: argparse.ArgumentParser) -> int:  # noqa: ANN001
    """Parse, run `body(args)`; a LaunchError prints `error: ...` and returns 1."""
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return body(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
