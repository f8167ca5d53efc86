"""Every method and MET ablation on the offline demo (glyph-pretrained ViT, digits), over seeds.

    python experiments/run_ablation.py                       # 12 settings x seeds 0 1 2
    python experiments/run_ablation.py --settings met lora --seeds 0
    python experiments/run_ablation.py --launcher slurm --launcher-arg partition=cpu

Each run is `python -m met_lightning <setting's overrides> seed=S hydra.run.dir=<out>/<setting>/
seed<S>` on the default (demo) config, so it needs no download. Finished runs (summary.json) are
skipped, so the launcher can be started again after an interruption. At the end it writes the
comparison report (experiments/report.py) and the budget curves of every setting averaged over
seeds (experiments/plot_budget_curves.py) into --results.

A small proxy task: 1 797 8x8 digit images upscaled to 32 px, a 12-block width-96 ViT pretrained
on rendered letters. It checks that the methods run and compares them on equal terms; it says
nothing about the paper's VTAB-1K / CIFAR-100 numbers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python experiments/run_ablation.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import launch, plot_budget_curves, report  # noqa: E402

MINUTES_PER_RUN = (1.0, 2.5)  # one demo run on a 2-core CPU (measured: 0.8-2.2 min)
# setting -> overrides of the demo config. Full fine-tuning trains every backbone weight; it runs
# at the adapters' lr 1e-3 and at 1e-4, the usual order of magnitude for fine-tuning all weights.
SETTINGS: dict[str, tuple[str, ...]] = {
    "met": ("method=met",),
    "met_no_graph": ("method=met", "model.loss.graph_weight=0"),
    "met_shared_gamma": ("method=met", "model.net.adapter.exit_specific=false"),
    "met_no_separate_cls": (
        "method=met",
        "model.net.adapter.separate_cls=false",
        "model.net.adapter.exit_specific=false",
    ),
    "met_1bit": ("method=met", "model.net.adapter.bits=1"),
    "multi_exit_linear": ("method=multi_exit_linear",),
    "linear_probe": ("method=linear_probe",),
    "adapter": ("method=adapter",),
    "adapter_1bit": ("method=adapter", "model.net.adapter.bits=1"),
    "lora": ("method=lora",),
    "full_finetune": ("method=full_finetune",),
    "full_finetune_lr1e-4": ("method=full_finetune", "optimizer.lr=1e-4"),
}
# The committed table's schedule (the demo's until 2026-12-04, now 12 epochs); a run's --extra wins.
SCHEDULE = ("trainer.max_epochs=20",)
RESULTS = Path("experiments/results")  # relative, so the report names it as given


def setting_run(out: Path, setting: str, seed: int, extra: Sequence[str]) -> launch.Run:
    overrides = (*SCHEDULE, *SETTINGS[setting], f"seed={seed}", *extra)
    return launch.Run(Path(out) / setting / f"seed{seed}", overrides, f"{setting} seed {seed}")


def build_parser() -> argparse.ArgumentParser:
    parser = launch.make_parser("run_ablation.py", __doc__, "outputs/ablation_demo")
    launch.add_choices(parser, "--settings", list(SETTINGS), "settings to run (default: all)")
    launch.add_results(parser, RESULTS, "the report and plot")
    parser.add_argument("--name", default="ablation_demo", help="file stem of the report and plot")
    return parser


def body(args: argparse.Namespace) -> int:
    launcher = launch.make_launcher(args)
    launcher.say(f"# demo ablation: {args.settings} x seeds {args.seeds}, runs in {args.out}")
    for setting in args.settings:
        for seed in args.seeds:
            launcher.launch(setting_run(args.out, setting, seed, args.extra))
    launcher.flush()  # with --launcher: every run at once, as multiruns over the seeds
    launcher.say(launcher.summary(MINUTES_PER_RUN, "hours on a 2-core CPU"))
    if args.dry_run:
        return 0
    if launcher.failed:
        raise launch.LaunchError("some runs failed (above); the report is not written")
    command = shlex.join(["python", "experiments/run_ablation.py", *args.argv])
    markdown = args.results / f"{args.name}.md"
    png = args.results / f"{args.name}.png"
    if report.main([str(args.out), "--out", str(markdown), "--csv",
                    str(args.results / f"{args.name}.csv")]) != 0:  # fmt: skip
        raise launch.LaunchError(f"experiments/report.py failed on {args.out}")
    title = f"Demo ablation (digits, demo ViT), seeds {' '.join(map(str, args.seeds))}"
    if plot_budget_curves.main([str(args.out), "--out", str(png), "--title", title]) != 0:
        raise launch.LaunchError(f"experiments/plot_budget_curves.py failed on {args.out}")
    # say in the report which command made it (report.py records its own command line)
    text = markdown.read_text(encoding="utf-8")
    markdown.write_text(
        text.replace("# MET results", f"# MET results: demo ablation\n\nRuns made with `{command}`"
                     f"; budget curves: [{png.name}]({png.name}).", 1),
        encoding="utf-8",
    )  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(argv=argv)  # the command line, for the report's provenance line
    return launch.run_main(body, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
