"""Benchmark: does the early-exit engine turn saved MACs into saved wall-clock time?

For ViT-S/16 and ViT-B/16 at 224 px (random weights: timing does not depend on them), batch 64,
exits [3, 6, 9, 12], rank-8 E-adapters, it times

- `plain`: the full multi-exit forward (every image through every block, all heads), and
- the engine with thresholds forced (calibrated on this very batch) to exit distributions such as
  50/25/15/10 % and 25/25/25/25 %, and with no early exit at all (`no-exit`, thresholds +inf).

Runs alternate (plain, engine, ... in a rotating order) and medians are reported:

- overhead = median(no-exit) / median(plain) - 1             (target <= 3 %)
- efficiency = measured speed-up / MACs-predicted speed-up    (target >= 0.9; the limit is 1.0)

    python experiments/bench_early_exit.py                       # CPU, writes experiments/results/
    python experiments/bench_early_exit.py --device cuda --bf16  # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from met_lightning.inference.budget import SplitScores, calibrate_thresholds, evaluate
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.macs import format_macs, model_exit_costs
from met_lightning.models.backbone import create_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DISTRIBUTIONS = ("50,25,15,10", "25,25,25,25", "10,15,25,50")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    backbone = create_backbone(name)
    net = MultiExitViT(backbone, args.num_classes, [3, 6, 9, 12], rank=8).eval().to(device)
    torch.manual_seed(0)
    with torch.no_grad():  # make the exits differ (adapters start at zero)
        for param in net.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    costs = model_exit_costs(net)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    with torch.inference_mode(), autocast:
        logits = net(images).logits.float().cpu()
    scores = SplitScores.from_logits(logits, torch.zeros(args.batch, dtype=torch.long))
    runs: dict[str, dict] = {}

    def plain() -> None:
        with torch.inference_mode(), autocast:
            net(images)

    runs["plain"] = {"fn": plain, "mean_macs": costs.full}
    for spec in ["no-exit", *args.distributions]:
        if spec == "no-exit":
            thresholds = [math.inf] * net.num_exits
        else:
            shares = [float(s) / 100 for s in spec.split(",")]
            thresholds = list(calibrate_thresholds(scores.confidence, shares))
        point = evaluate(scores, thresholds, costs.to_exit)
        engine = EarlyExitEngine(net, thresholds)

        def run(engine: EarlyExitEngine = engine) -> None:
            with autocast:
                engine(images)

        with autocast:
            got = torch.bincount(engine(images).exit_index.cpu(), minlength=net.num_exits)
        runs[spec] = {
            "fn": run,
            "mean_macs": point.mean_macs,
            "shares": [round(c / args.batch, 4) for c in got.tolist()],
        }

    for entry in runs.values():  # warm-up
        for _ in range(args.warmup):
            entry["fn"]()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate to spread drift
        for n in order:
            times[n].append(timed(runs[n]["fn"], device))
        print(f"  {name} repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)  # fmt: skip

    plain_s = statistics.median(times["plain"])
    rows = []
    for n in names:
        median = statistics.median(times[n])
        predicted = costs.full / runs[n]["mean_macs"]
        measured = plain_s / median
        rows.append(
            {
                "run": n,
                "shares": runs[n].get("shares"),
                "mean_macs": runs[n]["mean_macs"],
                "median_s": median,
                "times_s": times[n],
                "predicted_speedup": predicted,
                "measured_speedup": measured,
                "efficiency": measured / predicted,
            }
        )
    no_exit = next(r for r in rows if r["run"] == "no-exit")
    return {
        "model": name,
        "full_macs": costs.full,
        "exit_macs": list(costs.to_exit),
        "overhead": no_exit["median_s"] / plain_s - 1,
        "rows": rows,
    }


def markdown(results: list[dict], args: argparse.Namespace, command: str, device: str) -> str:
    lines = [
        f"# Early-exit engine vs. plain forward ({device})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine() if device == 'cpu' else torch.cuda.get_device_name()}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- batch {args.batch}, 224 px, exits [3, 6, 9, 12], rank 8, {args.num_classes} classes, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.repeats} alternating repeats "
        f"after {args.warmup} warm-up; medians",
        "- efficiency = measured speed-up / MACs-predicted speed-up (1.0 is the limit); "
        "overhead = engine without early exit vs. plain forward",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}: {format_macs(res['full_macs'])} per image at the last exit; "
            f"engine overhead without early exit {100 * res['overhead']:+.1f} %",
            "",
            "| run | exit shares | mean MACs | median s | predicted speed-up | measured | "
            "efficiency |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            shares = "/".join(f"{100 * s:.0f}" for s in r["shares"]) if r["shares"] else "-"
            lines.append(
                f"| {r['run']} | {shares} | {format_macs(r['mean_macs'])} | {r['median_s']:.3f} | "
                f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                f"{r['efficiency']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"]
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--distributions", nargs="+", default=list(DEFAULT_DISTRIBUTIONS),
                        help="exit shares in %% per exit, e.g. 50,25,15,10")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--out", type=Path, default=None, help="results file stem")
    args = parser.parse_args()
    device = torch.device(args.device)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    results = []
    for name in args.models:
        print(f"{name} on {device} ...", flush=True)
        results.append(bench_model(name, args, device))
    text = markdown(results, args, command, device.type)
    print(text)
    stem = args.out or RESULTS / f"bench_early_exit_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    payload = {"command": command, "machine": machine(), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
