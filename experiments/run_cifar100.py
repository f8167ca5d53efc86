"""Launch the CIFAR-100 recipe (conf/experiment/cifar100.yaml) over seeds.

Each run is its own process, `python -m met_lightning +experiment=cifar100 seed=S [--extra ...]
hydra.run.dir=<out>/seed<S>`. The recipe holds out 5 000 training images for validation
(data.val_fraction 0.1 of each class, split by data.seed = seed) and tests on the 10 000 test
images. A run whose folder has summary.json is finished and skipped, so the launcher can be
started again after an interruption. Then: `python experiments/report.py <out> --out report.md`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python experiments/run_cifar100.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import launch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "cifar100"
MINUTES_PER_RUN = (30.0, 60.0)

DESCRIPTION = (
    __doc__
    + """
cost (estimates, not measured here):
  time  ViT-B/16 in21k, 45 000 training images at 224 px, 20 epochs, bf16: about 30-60 min per
        run on one A100-class GPU; seeds 0 1 2: about 1.5-3 GPU hours.
  disk  CIFAR-100 about 340 MB (161 MB archive + 180 MB extracted, downloaded once into
        DATA_DIR); the ViT-B/16 weights about 330 MB once (HF_HOME); per run about 15 MB of
        checkpoints (--delete-checkpoints removes them once a run is done) and about 25 MB of
        logits (val 5 000 + test 10 000 images x 4 exits x 100 classes, float32).

examples:
  python experiments/run_cifar100.py --dry-run
  python experiments/run_cifar100.py --seeds 0 1 2 --out outputs/cifar100
  python experiments/run_cifar100.py --extra trainer=ddp backbone.weights_file=/w/ViT-B_16.npz
  python experiments/report.py outputs/cifar100 --out experiments/results/cifar100.md
"""
)


def seed_run(out: Path, seed: int, extra: Sequence[str]) -> launch.Run:
    overrides = (f"+experiment={EXPERIMENT}", f"seed={seed}", *extra)
    return launch.Run(Path(out) / f"seed{seed}", overrides, f"cifar100 seed {seed}")


def build_parser() -> argparse.ArgumentParser:
    parser = launch.make_parser("run_cifar100.py", DESCRIPTION, "outputs/cifar100")
    return parser


def body(args: argparse.Namespace) -> int:
    config = REPO / "conf" / "experiment" / f"{EXPERIMENT}.yaml"
    if not config.is_file():
        raise launch.LaunchError(f"{config} does not exist: the CIFAR-100 recipe is missing")
    launcher = launch.make_launcher(args)
    launcher.say(f"# CIFAR-100: seeds {args.seeds}, results in {args.out}")
    for seed in args.seeds:
        launcher.launch(seed_run(args.out, seed, args.extra))
    return launcher.finish(MINUTES_PER_RUN)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.run_main(body, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
