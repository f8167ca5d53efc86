"""Benchmark: does the early-exit engine turn saved MACs into saved wall-clock time?

For a ViT (random weights: timing does not depend on them), exits [3, 6, 9, 12], rank-8
E-adapters, at each batch size it times

- `timm`: timm's own `forward_features` + a linear head on the class token (what a user would
  run instead of MET),
- `plain`: MET's full multi-exit forward (every image through every block, all heads),
- the engine with no early exit (`no-exit`, thresholds +inf) and with thresholds forced
  (calibrated on this very batch) to exit shares such as 50/25/15/10 %.

Runs alternate (in a rotating order) and medians are reported:

- overhead   = median(no-exit) / median(plain) - 1          (target <= 3 % on CPU)
- efficiency = measured speed-up / MACs-predicted speed-up   (1.0 is the limit)
- vs timm    = median(timm) / median(run)                    (MET without exit: plain)

At batch 1 it reports the latency (p50, p90) of an image leaving at each exit instead.
`--modes eager compiled graphs`: compiled = `torch.compile` on timm's forward, MET's forward and
the engine's stages; graphs (CUDA) = `torch.compile(mode="reduce-overhead")` on the two forwards
and the engine's CUDA-graph mode. The script only uses the stage API shared with commit 41f771a,
so the same file measures the code before this change (`PYTHONPATH=<old checkout>`).
`--layouts streams joint` times MET in each token layout (`MultiExitViT.token_layout`; default
auto: streams on CUDA, joint on a CPU).

    python experiments/bench_early_exit.py   # CPU defaults, writes experiments/results/
    python experiments/bench_early_exit.py --device cuda --precision bf16 \\
        --models vit_base_patch16_224 --img-size 224 --batches 1 64 512 --modes eager graphs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import json
import math
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python experiments/NAME.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_common import machine, timed  # noqa: E402
from met_lightning.inference.budget import (
    SplitScores,
    calibrate_thresholds,
    evaluate,
    forced_thresholds,
)
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.macs import format_macs, model_exit_costs
from met_lightning.models.backbone import create_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DISTRIBUTIONS = ("50,25,15,10", "25,25,25,25", "10,15,25,50")
EXITS = [3, 6, 9, 12]


def build(name: str, args: argparse.Namespace, device: torch.device):
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    backbone = create_backbone(name, model_kwargs=kwargs)
    net = MultiExitViT(backbone, args.num_classes, EXITS).eval().to(device)
    torch.manual_seed(0)
    with torch.no_grad():  # make the exits differ (adapters start at zero)
        for param in net.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    head = torch.nn.Linear(backbone.embed_dim, args.num_classes).eval().to(device)
    return backbone, net, head


def make_engine(net, thresholds, mode: str) -> EarlyExitEngine:
    if mode == "graphs":
        return EarlyExitEngine(net, thresholds, mode="graphs")
    return EarlyExitEngine(net, thresholds)


class CompiledStages:
    """The net's stage API with `stage` compiled (dynamic batch): the engine's compiled mode."""

    def __init__(self, net) -> None:
        self._net = net
        self.stage = torch.compile(net.stage, dynamic=True)

    def __getattr__(self, name):
        return getattr(self._net, name)


def bench_batch(name, nets, args, device, batch: int, mode: str) -> dict:
    backbone, net, head = nets
    img = args.img_size or 224
    images = torch.randn(batch, 3, img, img, device=device)
    costs = model_exit_costs(net)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (
        torch.autocast(device.type, dtype=dtype, cache_enabled=mode != "graphs")
        if dtype
        else contextlib.nullcontext()
    )
    features, forward, engine_net = backbone.forward_features, net, net
    if mode == "compiled":
        features, forward = torch.compile(features), torch.compile(net)
        engine_net = CompiledStages(net)
    elif mode == "graphs":
        features = torch.compile(features, mode="reduce-overhead")
        forward = torch.compile(net, mode="reduce-overhead")

    def timm_fn() -> None:
        with torch.inference_mode(), autocast:
            head(features(images)[:, 0])

    def plain() -> None:
        with torch.inference_mode(), autocast:
            forward(images)

    runs: dict[str, dict] = {
        "timm": {"fn": timm_fn, "mean_macs": costs.backbone},
        "plain": {"fn": plain, "mean_macs": costs.full},
    }
    with torch.inference_mode(), autocast:
        logits = net(images).logits.float().cpu()
    scores = SplitScores.from_logits(logits, torch.zeros(batch, dtype=torch.long))
    if batch == 1:
        specs = [f"exit{k + 1}" for k in range(net.num_exits)]
    else:
        specs = ["no-exit", *args.distributions]
    for spec in specs:
        if spec == "no-exit":
            thresholds = [math.inf] * net.num_exits
        elif spec.startswith("exit"):
            thresholds = list(forced_thresholds(int(spec[4:]) - 1, net.num_exits))
        else:
            shares = [float(s) / 100 for s in spec.split(",")]
            thresholds = list(calibrate_thresholds(scores.confidence, shares))
        point = evaluate(scores, thresholds, costs.to_exit)
        engine = make_engine(engine_net, thresholds, mode)

        def run(engine: EarlyExitEngine = engine) -> None:
            with autocast:
                engine(images)

        with autocast:
            got = torch.bincount(engine(images).exit_index.cpu(), minlength=net.num_exits)
        runs[spec] = {
            "fn": run,
            "mean_macs": point.mean_macs,
            "shares": [round(c / batch, 4) for c in got.tolist()],
        }

    repeats = args.latency_repeats if batch == 1 else args.repeats
    for entry in runs.values():  # warm-up (and compilation)
        for _ in range(args.warmup if batch > 1 else max(args.warmup, 3)):
            entry["fn"]()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate to spread drift
        for n in order:
            times[n].append(timed(runs[n]["fn"], device))
        if batch > 1 or (r + 1) % 10 == 0:
            print(f"  {name} {mode} batch {batch} repeat {r + 1}/{repeats}: "
                  + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)  # fmt: skip

    plain_s = statistics.median(times["plain"])
    timm_s = statistics.median(times["timm"])
    rows = []
    for n in names:
        median = statistics.median(times[n])
        predicted = costs.full / runs[n]["mean_macs"]
        measured = plain_s / median
        q = statistics.quantiles(times[n], n=10) if len(times[n]) >= 2 else [median] * 9
        rows.append(
            {
                "run": n,
                "shares": runs[n].get("shares"),
                "mean_macs": runs[n]["mean_macs"],
                "median_s": median,
                "p50_s": median,
                "p90_s": q[8],
                "times_s": times[n],
                "predicted_speedup": predicted,
                "measured_speedup": measured,
                "efficiency": measured / predicted,
                "vs_timm": timm_s / median,
                "vs_timm_macs": costs.backbone / runs[n]["mean_macs"],
                "images_per_s": batch / median,
            }
        )
    result = {
        "model": name,
        "mode": mode,
        "batch": batch,
        "full_macs": costs.full,
        "backbone_macs": costs.backbone,
        "exit_macs": list(costs.to_exit),
        "plain_vs_timm": timm_s / plain_s,
        "rows": rows,
    }
    no_exit = next((r for r in rows if r["run"] == "no-exit"), None)
    if no_exit is not None:
        result["overhead"] = no_exit["median_s"] / plain_s - 1
    return result


def markdown(results: list[dict], args: argparse.Namespace, command: str, device: str,
             when: str, before: dict | None) -> str:  # fmt: skip
    img = args.img_size or 224
    lines = [
        f"# Early-exit engine vs. plain forward vs. timm ({device})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine() if device == 'cpu' else torch.cuda.get_device_name()}"
        + (" (2-core CPU dev machine shared with other jobs, no GPU)" if device == "cpu" else ""),
        f"- date: {when}",
        f"- {img} px, exits {EXITS}, rank 8, {args.num_classes} classes, "
        f"{args.precision} {'autocast' if args.precision != 'fp32' else ''}, "
        f"{args.repeats} alternating repeats after {args.warmup} warm-up (batch 1: "
        f"{args.latency_repeats}); medians",
        "- timm = `backbone.forward_features` + linear head on the class token; plain = MET's "
        "full multi-exit forward; efficiency = measured speed-up over plain / MACs-predicted "
        "speed-up (1.0 is the limit); overhead = engine without early exit vs. plain; "
        "vs timm = timm median / run median",
        "",
    ]
    for res in results:
        layout = f", layout {res['layout']}" if "layout" in res else ""
        head = f"## {res['model']}{layout}, {res['mode']}, batch {res['batch']}: "
        head += f"{format_macs(res['full_macs'])} per image at the last exit; MET without early "
        head += f"exit vs timm {res['plain_vs_timm']:.3f}x"
        if "overhead" in res:
            head += f"; engine overhead without early exit {100 * res['overhead']:+.1f} %"
        lines += [head, ""]
        old = (before or {}).get((res["model"], res["mode"], res["batch"]))
        if res["batch"] == 1:
            lines += [
                "| run | MACs | p50 ms | p90 ms | p50 / plain | MACs / plain | p50 vs timm |"
                + (" before p50 ms |" if old else ""),
                "|---|---|---|---|---|---|---|" + ("---|" if old else ""),
            ]
            plain = next(r for r in res["rows"] if r["run"] == "plain")
            for r in res["rows"]:
                line = (
                    f"| {r['run']} | {format_macs(r['mean_macs'])} | {1e3 * r['p50_s']:.2f} | "
                    f"{1e3 * r['p90_s']:.2f} | {r['p50_s'] / plain['p50_s']:.3f} | "
                    f"{r['mean_macs'] / plain['mean_macs']:.3f} | {r['vs_timm']:.2f}x |"
                )
                if old:
                    o = old.get(r["run"])
                    line += f" {1e3 * o['p50_s']:.2f} |" if o else " - |"
                lines.append(line)
        else:
            lines += [
                "| run | exit shares | mean MACs | median s | img/s | predicted speed-up | "
                "measured | efficiency | vs timm (MACs) |"
                + (" before: median s / efficiency / vs timm |" if old else ""),
                "|---|---|---|---|---|---|---|---|---|" + ("---|" if old else ""),
            ]
            for r in res["rows"]:
                shares = "/".join(f"{100 * s:.0f}" for s in r["shares"]) if r["shares"] else "-"
                line = (
                    f"| {r['run']} | {shares} | {format_macs(r['mean_macs'])} | "
                    f"{r['median_s']:.3f} | {r['images_per_s']:.1f} | "
                    f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                    f"{r['efficiency']:.3f} | {r['vs_timm']:.2f}x ({r['vs_timm_macs']:.2f}x) |"
                )
                if old:
                    o = old.get(r["run"])
                    line += (f" {o['median_s']:.3f} / {o['efficiency']:.3f} / "
                             f"{o['vs_timm']:.2f}x |" if o else " - |")  # fmt: skip
                lines.append(line)
        lines.append("")
    return "\n".join(lines)


def load_before(path: Path | None) -> dict | None:
    """{(model, mode, batch): {run: row}} of an earlier results JSON (the "before" column)."""
    if path is None:
        return None
    payload = json.loads(path.read_text())
    return {
        (res["model"], res["mode"], res["batch"]): {r["run"]: r for r in res["rows"]}
        for res in payload["results"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224"])
    parser.add_argument("--img-size", type=int, default=112,
                        help="input size (0: the model's own); CPU default 112 px")  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 512])
    parser.add_argument("--modes", nargs="+", default=["eager"],
                        choices=["eager", "compiled", "graphs"])  # fmt: skip
    parser.add_argument("--layouts", nargs="+", default=["auto"],
                        choices=["auto", "streams", "joint"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--distributions", nargs="+", default=list(DEFAULT_DISTRIBUTIONS),
                        help="exit shares in %% per exit, e.g. 50,25,15,10")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, OpenMP barriers "
        "of multi-threaded ops wait for descheduled threads; 0: torch's default)",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="results JSON of the code before, shown as a 'before' column",
    )
    parser.add_argument("--out", type=Path, default=None, help="results file stem")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only rewrite the markdown of this results JSON (with --before)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        args.__dict__.update(payload.get("args", {}))
        text = markdown(payload["results"], args, payload["command"], payload["device"],
                        payload["date"], load_before(args.before))  # fmt: skip
        args.render.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    device = torch.device(args.device)
    if "graphs" in args.modes and device.type != "cuda":
        parser.error("--modes graphs needs --device cuda")
    if "graphs" in args.modes and "mode" not in inspect.signature(EarlyExitEngine).parameters:
        parser.error("this checkout's engine has no graph mode")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for name in args.models:
        nets = build(name, args, device)
        for layout in args.layouts:
            if hasattr(nets[1], "token_layout"):  # older checkouts have one layout
                nets[1].token_layout = layout
            for mode in args.modes:
                for batch in args.batches:
                    print(f"{name} {layout} {mode} batch {batch} on {device} ...", flush=True)
                    result = bench_batch(name, nets, args, device, batch, mode)
                    results.append({**result, "layout": layout})
    text = markdown(results, args, command, device.type, when, load_before(args.before))
    print(text)
    stem = args.out or RESULTS / f"bench_early_exit_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    plain_args = {k: v for k, v in vars(args).items() if k not in ("before", "out", "render")}
    payload = {"command": command, "machine": machine(device), "date": when, "device": device.type,
               "args": plain_args, "results": results}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
