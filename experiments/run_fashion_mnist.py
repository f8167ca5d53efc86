"""Every method x seeds on Fashion-MNIST, plus raw-pixel baselines on the very same split.

    python experiments/run_fashion_mnist.py                          # 1k: 6 methods x seeds 0 1 2
    python experiments/run_fashion_mnist.py --experiment fashion_mnist   # full 54k / 6k / 10k
    python experiments/run_fashion_mnist.py --seeds 0 --epochs 3 --methods met linear_probe
    python experiments/run_fashion_mnist.py --extra backbone=vit_base_in21k trainer=gpu \\
        data.normalize=imagenet --out outputs/fmnist_vitb --name fashion_mnist_1k_vitb

Each run is `python -m met_lightning +experiment=EXPERIMENT method=M seed=S
[trainer.max_epochs=E] [--extra ...] hydra.run.dir=<out>/<experiment>/<method>/seed<S>`
(experiments/launch.py: finished runs, those with summary.json, are skipped, so the script can be
started again; --dry-run prints the commands). The baselines (scikit-learn on the pixels scaled to
[0, 1]: logistic regression and an RBF SVM, C picked on the validation split) use the DataModule
of the same config and seed, so they see exactly the runs' train / val / test images; each seed's
result is kept in <out>/<experiment>/baselines/seed<S>.json. At the end one table (test accuracy
mean ± std over seeds, trainable parameters, MACs per exit, the early-exit points) goes to
<results>/<name>.{md,json}.

Without data.root in --extra the Debian package's folder /usr/share/datasets/fashion-mnist is used
when it holds the files (`apt-get install dataset-fashion-mnist`), else the recipe downloads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python experiments/run_fashion_mnist.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import launch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("fashion_mnist_1k", "fashion_mnist")
METHODS = ("met", "multi_exit_linear", "linear_probe", "adapter", "lora", "full_finetune")
BASELINES = ("logreg", "svm_rbf")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path("experiments/results")
# 2-core CPU, measured (results/fashion_mnist_*_cpu.md): 1k 1-2 min a run, full 4-15 min
MINUTES_PER_RUN = {"fashion_mnist_1k": (1.0, 4.0), "fashion_mnist": (4.0, 15.0)}
# C of each baseline, the one with the best validation accuracy is kept
C_GRID = {"logreg": (0.01, 0.1, 1.0, 10.0), "svm_rbf": (1.0, 10.0)}


# ---------------------------------------------------------------------- baselines
def split_pixels(overrides: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """{split: (pixels [N, D] float32 in [0, 1], labels)} of the DataModule that
    `python -m met_lightning OVERRIDES` builds (same config, same seed: the same images)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import met_lightning.train  # noqa: F401 - registers the structured configs train.yaml uses
    from met_lightning.data.base import build_datamodule
    from met_lightning.data.torchvision_data import split_arrays
    from met_lightning.paths import config_dir
    from met_lightning.spec import InputSpec

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    datamodule = build_datamodule(cfg.data, InputSpec.from_backbone_config(cfg.backbone))
    datamodule.setup()
    out = {}
    for split, (images, labels) in split_arrays(datamodule).items():
        out[split] = (images.reshape(len(images), -1).astype("float32") / 255.0, labels)
    return out


def fit_baseline(kind: str, data: dict[str, tuple[Any, Any]], seed: int) -> dict[str, Any]:
    """Fit `kind` on train for each C of C_GRID, keep the best on val, score it on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        data[s] for s in ("train", "val", "test")
    )
    best = None
    start = time.monotonic()
    for c in C_GRID[kind]:
        if kind == "logreg":
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        else:
            model = SVC(C=c, kernel="rbf", gamma="scale", random_state=seed)
        model.fit(x_train, y_train)
        val = float(model.score(x_val, y_val))
        if best is None or val > best[0]:
            best = (val, c, model)
    val, c, model = best
    dims, classes = x_train.shape[1], len(set(y_train.tolist()))
    if kind == "logreg":
        params = dims * classes + classes
        macs = dims * classes
    else:  # stored support vectors and dual coefficients; a kernel value per support vector
        n_sv = int(model.support_vectors_.shape[0])
        params = n_sv * dims + int(model.dual_coef_.size) + int(model.intercept_.size)
        macs = n_sv * dims
    return {
        "method": kind,
        "C": c,
        "val_accuracy": val,
        "test_accuracy": float(model.score(x_test, y_test)),
        "params": params,
        "macs": macs,
        "seconds": time.monotonic() - start,
        "sizes": {s: int(len(data[s][1])) for s in ("train", "val", "test")},
    }


def run_baselines(out: Path, seed: int, overrides: Sequence[str], kinds: Sequence[str],
                  dry_run: bool, say) -> list[dict[str, Any]]:  # noqa: ANN001  # fmt: skip
    path = Path(out) / "baselines" / f"seed{seed}.json"
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        if {d["method"] for d in done} >= set(kinds):
            say(f"# skip, finished: baselines seed {seed} ({path})")
            return [d for d in done if d["method"] in kinds]
    if dry_run:
        say(f"# baselines {', '.join(kinds)} seed {seed} on {shlex.join(overrides)} -> {path}")
        return []
    say(f"\n### pixel baselines seed {seed}: {', '.join(kinds)}")
    data = split_pixels(overrides)
    results = []
    for kind in kinds:
        result = fit_baseline(kind, data, seed)
        say(f"### {kind}: test {100 * result['test_accuracy']:.2f} % (C={result['C']}, "
            f"{result['seconds']:.1f} s)")  # fmt: skip
        results.append(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


# ---------------------------------------------------------------------- the table
def _stat(values: Sequence[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _macs(value: float) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def _count(value: float) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def collect(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per method with finished runs: the seeds' summaries, aggregated."""
    rows = []
    for method in methods:
        summaries, minutes = [], []
        for seed in seeds:
            run_dir = Path(out) / method / f"seed{seed}"
            if launch.is_finished(run_dir):
                summaries.append(launch.read_json(run_dir / launch.SUMMARY_FILE))
                timing = run_dir / "wall_minutes.txt"
                if timing.is_file():
                    minutes.append(float(timing.read_text()))
        if not summaries:
            continue
        first = summaries[0]
        exits = first["exits"]
        points = {}
        for setting in ("keep 100 %", "keep 99 %"):
            found = [p for s in summaries for p in (s.get("budget") or {}).get("points", [])
                     if p["setting"] == setting]  # fmt: skip
            if found:
                points[setting] = {
                    "accuracy": [p["accuracy"] for p in found],
                    "macs_fraction": statistics.mean(p["macs_fraction"] for p in found),
                    "speedup": statistics.mean(p["speedup"] for p in found),
                }
        rows.append({
            "method": method,
            "seeds": len(summaries),
            "test_accuracy": [s["exits"][-1]["accuracy"] for s in summaries],
            "exit_accuracy": [[s["exits"][k]["accuracy"] for s in summaries]
                              for k in range(len(exits))],
            "blocks": [e["block"] for e in exits],
            "macs": [e["macs"] for e in exits],
            "params_trainable": first["params_trainable"],
            "points": points,
            "minutes": minutes,
        })  # fmt: skip
    return rows


def render(rows, baselines, header: str) -> str:  # noqa: ANN001
    lines = [header, "",
             "| method | test acc (%) | seeds | acc per exit (block: %) | trainable "
             "| MACs per exit | keep 100 %: MACs (acc) | keep 99 %: MACs (acc) | min / run |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: |"]  # fmt: skip
    for row in rows:
        per_exit = " / ".join(
            f"{b}: {_stat(a)}" for b, a in zip(row["blocks"], row["exit_accuracy"], strict=True)
        )
        macs = " / ".join(_macs(m) for m in row["macs"])
        cells = []
        for setting in ("keep 100 %", "keep 99 %"):
            p = row["points"].get(setting)
            cells.append("–" if p is None else f"{100 * p['macs_fraction']:.0f} % "
                         f"({p['speedup']:.2f}x; {_stat(p['accuracy'])})")  # fmt: skip
        minutes = f"{statistics.mean(row['minutes']):.1f}" if row["minutes"] else "–"
        lines.append(f"| `{row['method']}` | {_stat(row['test_accuracy'])} | {row['seeds']} | "
                     f"{per_exit} | "
                     f"{_count(row['params_trainable'])} | {macs} | {cells[0]} | {cells[1]} | "
                     f"{minutes} |")  # fmt: skip
    by_kind: dict[str, list] = {}
    for result in baselines:
        by_kind.setdefault(result["method"], []).append(result)
    for kind, results in by_kind.items():
        params = statistics.mean(r["params"] for r in results)
        macs = statistics.mean(r["macs"] for r in results)
        cs = sorted({r["C"] for r in results})
        minutes = statistics.mean(r["seconds"] for r in results) / 60
        lines.append(f"| {kind} on pixels (C={'/'.join(map(str, cs))}) | "
                     f"{_stat([r['test_accuracy'] for r in results])} | {len(results)} | – | "
                     f"{_count(params)} | "
                     f"{_macs(macs)} | – | – | {minutes:.1f} |")  # fmt: skip
    lines += ["", "test acc: the last exit's accuracy on the test split, mean ± sample std over "
              "seeds (one value: one seed). MACs per exit: multiply-accumulates per image up to "
              "each exit. keep X %: the cheapest early-exit thresholds (calibrated on val) that "
              "keep X % of the last exit's test accuracy, as a share of the last exit's MACs "
              "(speed-up; accuracy). Baselines: scikit-learn on the pixels / 255, C chosen on "
              "val; trainable = stored numbers (SVM: support vectors + dual coefficients), MACs "
              "= per image (SVM: one kernel value per support vector)."]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = launch.make_parser("run_fashion_mnist.py", __doc__, "outputs/fashion_mnist")
    parser.add_argument(
        "--experiment",
        choices=EXPERIMENTS,
        default="fashion_mnist_1k",
        help="the recipe, conf/experiment/NAME.yaml (default: fashion_mnist_1k)",
    )
    launch.add_choices(parser, "--methods", METHODS, "methods of conf/method/ (default: all)")
    parser.add_argument("--epochs", type=int, help="trainer.max_epochs (default: the recipe's)")
    launch.add_choices(
        parser, "--baselines", BASELINES, "pixel baselines (default: both; none: --baselines)", "*"
    )
    launch.add_results(parser, RESULTS, "<name>.md / .json")
    parser.add_argument("--name", help="file stem of the results (default: <experiment>_cpu)")
    parser.add_argument("--note", default="", help="a sentence for the results file's header")
    return parser  # fmt: skip


def data_overrides(extra: Sequence[str], say) -> list[str]:  # noqa: ANN001
    if any(o.startswith("data.root=") for o in extra):
        return []
    if all((DEBIAN_DIR / f"{n}.gz").is_file() for n in
           ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):  # fmt: skip
        say(f"# data: the Debian package's files in {DEBIAN_DIR}")
        return [f"data.root={DEBIAN_DIR}"]
    return []


def body(args: argparse.Namespace) -> int:
    launcher = launch.make_launcher(args)
    name = args.name or f"{args.experiment}_cpu"
    out = Path(args.out) / args.experiment
    common = [f"+experiment={args.experiment}", *data_overrides(args.extra, launcher.say)]
    if args.epochs is not None:
        common.append(f"trainer.max_epochs={args.epochs}")
    launcher.say(f"# {args.experiment}: {args.methods} x seeds {args.seeds}, runs in {out}")
    started = time.monotonic()
    for method in args.methods:
        for seed in args.seeds:
            run = launch.Run(out / method / f"seed{seed}",
                             (*common, f"method={method}", f"seed={seed}", *args.extra),
                             f"{method} seed {seed}")  # fmt: skip
            start = time.monotonic()
            if launcher.launch(run) == "ok":
                minutes = (time.monotonic() - start) / 60
                (Path(run.run_dir) / "wall_minutes.txt").write_text(f"{minutes:.3f}\n")
    launcher.flush()
    baselines = []
    if args.baselines:
        for seed in args.seeds:
            baselines += run_baselines(out, seed, [*common, f"seed={seed}", *args.extra],
                                       args.baselines, args.dry_run, launcher.say)  # fmt: skip
    launcher.say(launcher.summary(MINUTES_PER_RUN[args.experiment], "hours on a 2-core CPU"))
    if args.dry_run:
        return 0
    if launcher.failed:
        raise launch.LaunchError("some runs failed (above); the table is not written")
    import torch

    command = shlex.join(["python", "experiments/run_fashion_mnist.py", *args.argv])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}")  # fmt: skip
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    wall = (time.monotonic() - started) / 60
    rows = collect(out, args.methods, args.seeds)
    header = (f"# Fashion-MNIST: {args.experiment}\n\nCommand: `{command}`  \nMachine: {machine}"
              f"  \nDate: {date}; this invocation took {wall:.1f} min (finished runs it skipped "
              f"are not counted).")  # fmt: skip
    if args.note:
        header += f"\n\n{args.note}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.md").write_text(render(rows, baselines, header), encoding="utf-8")
    payload = {"command": command, "machine": machine, "date": date, "experiment": args.experiment,
               "seeds": args.seeds, "note": args.note, "overrides": common + list(args.extra),
               "methods": rows, "baselines": baselines}  # fmt: skip
    (args.results / f"{name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    launcher.say(f"# wrote {args.results / name}.md and .json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(argv=argv)
    return launch.run_main(body, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
