"""Benchmark: does early exit inside LitServe's dynamic batches save served time?

For each model (a trained run folder) it starts `python -m met_lightning.serve` on 127.0.0.1 twice,
with early exit and with early exit off, and drives it with C concurrent clients (C in
--concurrency) for at most --requests requests or --seconds seconds per point: throughput and
p50 / p95 / p99 latency. Then it times the engine offline (same process, no HTTP) on batches of
--batch images, with and without early exit, and reports

    served speed-up   = served throughput with early exit / without (at the highest concurrency)
    offline speed-up  = engine throughput with early exit / without, at the same batch size
    ratio             = served / offline speed-up                              (target >= 0.8)

and, at concurrency 1, how a request's latency splits into image decoding + transform, the model
(engine on one image) and the rest (HTTP, LitServe's queues; the loopback network is ~0).

Requests are the digits test images as PNG files (multipart uploads). `--demo RUN` uses the run's
budget (--budget); `--compute RUN` (a larger model, e.g. ViT-S/16-like) uses thresholds forced to
exit shares --shares on these images (MSDNet's calibration on their own logits).

    python experiments/bench_serve.py --demo DEMO_RUN --compute VITS_RUN
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from experiments.bench_common import machine
from met_lightning.data.digits import stratified_split
from met_lightning.inference.budget import SplitScores, calibrate_thresholds
from met_lightning.inference.session import decode_image, open_session

RESULTS = Path(__file__).resolve().parent / "results"


def digit_pngs(run: Path, count: int) -> list[bytes]:
    """The run's digits test images (never trained on) as PNG file bytes."""
    seed = OmegaConf.load(run / "config.yaml").seed
    digits = load_digits()
    _, _, test_index = stratified_split(digits.target, 0.2, 0.2, seed=seed)
    files = []
    for i in test_index[:count]:
        pixels = np.round(digits.images[i] / 16 * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def session_cfg(run: Path, **values) -> object:
    base = dict(checkpoint=str(run), budget=None, thresholds=None, confidence="max_softmax",
                store=None, weights_file=None)  # fmt: skip
    return OmegaConf.create({**base, **values})


def tensors(session, pngs: list[bytes]) -> torch.Tensor:
    out = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            out.append(session.transform(decode_image(image, session.spec)))
    return torch.stack(out)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, thresholds: list[float] | None, args: argparse.Namespace):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "met_lightning.serve",
        f"checkpoint={run}",
        f"port={port}",
        "device=cpu",
        f"max_batch_size={args.batch}",
        f"batch_timeout={args.batch_timeout}",
    ]
    if thresholds is not None:
        command.append(f"thresholds=[{','.join(repr(float(t)) for t in thresholds[:-1])}]")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the server's torch threads
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server not healthy within 300 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def load(url: str, pngs: list[bytes], concurrency: int, requests: int, seconds: float):
    """`concurrency` clients send at most `requests` uploads in at most `seconds`."""
    latencies, batches, failures = [], [], 0
    sent = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, failures
            while sent < requests and time.perf_counter() < stop:
                data = pngs[sent % len(pngs)]
                sent += 1
                start = time.perf_counter()
                answer = await client.post("/predict", files={"file": ("x.png", data, "image/png")})
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    failures += 1
                else:
                    batches.append(answer.json()["batch_size"])

        await client.post("/predict", files={"file": ("x.png", pngs[0], "image/png")})  # warm-up
        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failures": failures,
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
    }


async def round_trip(url: str, count: int = 32) -> float:
    """Median latency (ms) of an upload the server rejects at decoding (not an image): HTTP,
    LitServe's queues and a decode attempt, without the model."""
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(count + 1):
            start = time.perf_counter()
            answer = await client.post("/predict", files={"file": ("x.png", b"not an image")})
            times.append((time.perf_counter() - start) * 1000)
            assert answer.status_code == 400, answer.text
    return statistics.median(times[1:])


def offline(session, images: torch.Tensor, settings: dict, batch: int, repeats: int) -> dict:
    """Engine images/s per setting (name -> thresholds) on batches of `batch` images: passes over
    the images alternate between the settings; medians of `repeats` passes."""
    from met_lightning.inference.engine import EarlyExitEngine

    chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    engines = {name: EarlyExitEngine(session.net, t, "max_softmax") for name, t in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for engine in engines.values():
        engine(chunks[0])  # warm-up
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            for chunk in chunks:
                engine(chunk)
            times[name].append(time.perf_counter() - start)
    return {name: len(chunks) * batch / statistics.median(t) for name, t in times.items()}


def breakdown(session, pngs: list[bytes], thresholds: list[float], count: int = 32) -> dict:
    """Per-image decode + transform time and the engine's time on one image (ms, medians)."""
    from met_lightning.inference.engine import EarlyExitEngine

    engine = EarlyExitEngine(session.net, thresholds, "max_softmax")
    decode_ms, model_ms = [], []
    for data in pngs[:count]:
        start = time.perf_counter()
        with Image.open(io.BytesIO(data)) as image:
            x = session.transform(decode_image(image, session.spec))
        decode_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        engine(x[None])
        model_ms.append((time.perf_counter() - start) * 1000)
    return {"decode_ms": statistics.median(decode_ms), "model_ms": statistics.median(model_ms)}


def bench(name: str, run: Path, args: argparse.Namespace, forced: bool) -> dict:
    torch.set_num_threads(args.threads)
    pngs = digit_pngs(run, args.images)
    if forced:
        session = open_session(session_cfg(run), torch.device("cpu"))
        images = tensors(session, pngs)
        with torch.inference_mode():
            logits = session.net(images).logits
        scores = SplitScores.from_logits(logits, torch.zeros(len(images), dtype=torch.long))
        shares = [float(s) / 100 for s in args.shares.split(",")]
        thresholds = [*calibrate_thresholds(scores.confidence, shares)[:-1], -math.inf]
        how = f"thresholds forced to exit shares {args.shares} % on these images"
    else:
        session = open_session(session_cfg(run, budget=args.budget), torch.device("cpu"))
        images = tensors(session, pngs)
        thresholds, how = session.thresholds, f"budget={args.budget}: {session.how}"
    k = session.net.num_exits
    exits = session.engine.__class__(session.net, thresholds)(images).exit_index
    shares = (torch.bincount(exits, minlength=k).float() / len(images)).tolist()
    mean_macs = float(np.dot(shares, session.costs.to_exit))
    result = {
        "model": name,
        "run": str(run),
        "backbone": session.config["backbone"]["model_kwargs"],
        "input_size": list(session.spec.input_size),
        "exits": list(session.net.exits),
        "macs_per_exit": list(session.costs.to_exit),
        "thresholds": [t if math.isfinite(t) else str(t) for t in thresholds],
        "how": how,
        "exit_shares": shares,
        "macs_speedup": session.costs.full / mean_macs,
        "offline_img_s": offline(
            session,
            images,
            {"early_exit": thresholds, "off": [math.inf] * k},
            args.batch,
            args.repeats,
        ),  # fmt: skip
        "breakdown_c1": breakdown(session, pngs, thresholds),
        "served": {},
    }
    del session
    # both servers up at once; the load points alternate between them (the machine is shared)
    servers = {mode: start_server(run, chosen, args)
               for mode, chosen in (("early_exit", thresholds), ("off", None))}  # fmt: skip
    try:
        for mode in servers:
            result["served"][mode] = []
        for c in args.concurrency:
            points: dict[str, list[dict]] = {mode: [] for mode in servers}
            for _ in range(args.load_repeats):
                for mode, (_, url) in servers.items():
                    points[mode].append(
                        asyncio.run(load(url, pngs, c, args.requests, args.seconds))
                    )
            for mode, runs in points.items():
                best = sorted(runs, key=lambda p: p["throughput"])[len(runs) // 2]  # median
                best["throughput_runs"] = [p["throughput"] for p in runs]
                best["failures"] = sum(p["failures"] for p in runs)
                result["served"][mode].append(best)
        result["breakdown_c1"]["round_trip_ms"] = asyncio.run(round_trip(servers["early_exit"][1]))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    offline_speedup = result["offline_img_s"]["early_exit"] / result["offline_img_s"]["off"]
    top = {m: result["served"][m][-1]["throughput"] for m in ("early_exit", "off")}
    served_speedup = top["early_exit"] / top["off"]
    result.update(
        offline_speedup=offline_speedup,
        served_speedup=served_speedup,
        ratio=served_speedup / offline_speedup,
    )
    c1 = result["served"]["early_exit"][0]
    parts = result["breakdown_c1"]
    parts["latency_p50_ms"] = c1["p50_ms"]
    parts["decode_and_http_share"] = (parts["decode_ms"] + parts["round_trip_ms"]) / c1["p50_ms"]
    return result


def breakdown_line(parts: dict) -> str:
    line = (
        f"- one request at concurrency 1: p50 {parts['latency_p50_ms']:.1f} ms; image decode + "
        f"transform {parts['decode_ms']:.2f} ms; the engine on one image "
        f"{parts['model_ms']:.1f} ms (offline, median)"
    )
    if "round_trip_ms" in parts:  # a rejected upload: HTTP + LitServe's queues, no model
        line += (
            f"; HTTP + LitServe queues {parts['round_trip_ms']:.1f} ms (a request rejected at "
            f"decoding); decode + HTTP = {100 * parts['decode_and_http_share']:.0f} % of the "
            "p50 latency, the loopback network ~0"
        )
    return line


def markdown(results: list[dict], args: argparse.Namespace, command: str, when: str) -> str:
    lines = [
        "# Serving benchmark: LitServe + early exit in dynamic batches (cpu, loopback)",
        "",
        f"- command: `{command}`",
        f"- machine: 2-core CPU dev machine, no GPU ({machine().split(', ')[0]}, torch "
        f"{torch.__version__}); shared with other jobs (load average "
        f"{os.getloadavg()[0]:.0f}), and "
        "the load clients run on the same 2 cores as the server",
        f"- date: {when}",
        f"- server: max_batch_size={args.batch}, batch_timeout={args.batch_timeout} s, fp32, "
        f"{args.threads} torch thread(s) (offline too); "
        f"clients: multipart PNG uploads of the digits test images, at most {args.requests} "
        f"requests or {args.seconds} s per run after one warm-up request; the early-exit and the "
        f"no-exit servers run side by side and their runs alternate, {args.load_repeats} per "
        "point: the median run is shown (failed: summed over the runs)",
        "- offline: the engine on batches of the same size, same images and thresholds, no HTTP",
        "",
    ]
    for r in results:
        shares = "/".join(f"{100 * s:.0f}" for s in r["exit_shares"])
        lines += [
            f"## {r['model']}: input {r['input_size']}, exits {r['exits']}, "
            f"{r['macs_per_exit'][-1] / 1e6:.1f} MMACs per image at the last exit",
            "",
            f"- early exit: {r['how']}; exit shares {shares} %, MACs speed-up "
            f"{r['macs_speedup']:.2f}x",
            f"- offline engine: {r['offline_img_s']['early_exit']:.1f} img/s with early exit, "
            f"{r['offline_img_s']['off']:.1f} img/s without: speed-up "
            f"**{r['offline_speedup']:.2f}x**",
            f"- served (highest concurrency): speed-up **{r['served_speedup']:.2f}x**; "
            f"served / offline speed-up = **{r['ratio']:.2f}** (target >= 0.8)",
            breakdown_line(r["breakdown_c1"]),
            "",
            "| early exit | clients | requests | failed | req/s | p50 ms | p95 ms | p99 ms | "
            "mean batch |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in ("early_exit", "off"):
            for p in r["served"][mode]:
                lines.append(
                    f"| {'on' if mode == 'early_exit' else 'off'} | {p['concurrency']} | "
                    f"{p['requests']} | {p['failures']} | {p['throughput']:.1f} | "
                    f"{p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
                    f"{p['mean_batch']:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, help="the demo's run folder")
    parser.add_argument("--compute", type=Path, help="a compute-dominated model's run folder")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--shares", default="50,25,15,10")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                        default=[1, 8, 32])  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="offline passes per setting")
    parser.add_argument("--load-repeats", type=int, default=3, help="load runs per point")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and offline")
    parser.add_argument("--append", action="store_true", help="keep --out's earlier models")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_serve_cpu")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for name, run, forced in (("demo", args.demo, False), ("compute", args.compute, True)):
        if run is not None:
            results.append(bench(name, run, args, forced))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "served"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "date": when, "machine": machine(), "results": results}
    if args.append and args.out.with_suffix(".json").is_file():  # results of an earlier model
        earlier = json.loads(args.out.with_suffix(".json").read_text())
        record["results"] = results = earlier["results"] + results
        record["command"] = command = f"{earlier['command']}; then {command}"
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, args, command, when))
    print(markdown(results, args, command, when))


if __name__ == "__main__":
    main()
