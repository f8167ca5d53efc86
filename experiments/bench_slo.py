"""Open-loop load against the SLO controller (issue 22): Poisson arrivals on loopback whose rate
ramps from half the server's capacity to twice it and back; fixed keep-100 % thresholds, the
fixed cheapest point over the floor and `slo_ms=` compared in one run.

    python -m experiments.bench_slo --run RUN [--slo-ms MS] --phase-seconds 10 [--shift]

Without --slo-ms the SLO is --slo-factor (3) x the unloaded p50 of keep-100 % (one request at a
time). The servers' logs go to the temporary folder (`bench_slo_<ramp|shift>_<config>.log`).

Per phase: p50 / p95 / p99 latency, goodput (answers within the SLO per second), accuracy (the
digits' labels are known); the controller's trace (rate, p95, point over time) as a PNG.
`--shift` adds noise to half of the images (the accuracy guard's case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

from experiments.bench_serve import RESULTS, load, png_bytes, start_server, stop_server, test_digits
from met_lightning.inference.session import SessionOptions, calibration_scores, resolve
from met_lightning.inference.slo import operating_points

RAMP = (0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5)  # x capacity, one phase each


def digits(run: Path, count: int, shift: bool, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """The run's digits test images as PNGs and their labels (half noised with --shift)."""
    images, labels = test_digits(run, count)
    noise = np.random.default_rng(seed)
    files = []
    for n, image in enumerate(images):
        pixels = image / 16 * 255
        if shift and n % 2:
            pixels = pixels + noise.normal(0, 80, pixels.shape)
        files.append(png_bytes(pixels))
    return files, [int(label) for label in labels]


async def open_loop(url: str, pngs: list[bytes], rates: list[float], seconds: float) -> list[dict]:
    """Poisson arrivals at each rate for `seconds`: every request's send time, latency, answer."""
    records, tasks, rng = [], [], random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=512)) as client:  # fmt: skip

        async def one(phase: int, k: int, sent: float) -> None:
            try:
                answer = await client.post("/predict", files={"file": ("x.png", pngs[k])})
                body = answer.json() if answer.status_code == 200 else {}
            except httpx.HTTPError:
                answer, body = None, {}
            status = answer.status_code if answer is not None else 0
            latency = time.monotonic() - sent
            records.append(
                {"phase": phase, "sent": sent, "latency": latency, "index": k, "status": status}
                | body
            )

        start = time.monotonic()
        for phase, rate in enumerate(rates):
            end = start + (phase + 1) * seconds
            now = time.monotonic()
            while now < end:
                await asyncio.sleep(max(0.0, rng.expovariate(rate)))
                now = time.monotonic()
                tasks.append(asyncio.create_task(one(phase, rng.randrange(len(pngs)), now)))
        await asyncio.gather(*tasks)
    return records


def summary(records: list[dict], labels: list[int], slo_s: float, seconds: float) -> list[dict]:
    rows = []
    for phase in sorted({r["phase"] for r in records}):
        rs = [r for r in records if r["phase"] == phase]
        lat = np.array([r["latency"] for r in rs]) * 1000
        ok = [r for r in rs if r["status"] == 200]
        rows.append({
            "phase": phase, "requests": len(rs),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "goodput": sum(r["latency"] <= slo_s for r in ok) / seconds,
            "accuracy": sum(r["class"] == labels[r["index"]] for r in ok) / max(len(ok), 1),
            "mean_macs": float(np.mean([r["macs"] for r in ok])) if ok else 0.0,
        })  # fmt: skip
    return rows


def plot(records: list[dict], labels: dict[str, int], path: Path, slo_ms: float) -> None:
    t0 = min(r["sent"] for r in records)
    t = np.array([r["sent"] - t0 for r in records])
    bins = np.arange(0, t.max() + 1, 1.0)
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].hist(t, bins=bins)
    axes[0].set_ylabel("requests / s")
    lat = np.array([r["latency"] * 1000 for r in records])
    p95 = [np.percentile(lat[(t >= b) & (t < b + 1)], 95) if ((t >= b) & (t < b + 1)).any()
           else np.nan for b in bins[:-1]]  # fmt: skip
    axes[1].plot(bins[:-1], p95)
    axes[1].axhline(slo_ms, color="red", linestyle="--")
    axes[1].set_ylabel("p95 ms")
    points = [labels.get(r.get("point"), np.nan) for r in records]
    axes[2].plot(t, points, ".", markersize=2)
    axes[2].set_ylabel("point (0: cheapest)")
    axes[2].set_xlabel("s")
    fig.savefig(path, dpi=100)


def cpu_set(text: str) -> set[int]:
    """ "0" or "0,1": the cores a process is pinned to."""
    return {int(c) for c in text.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--slo-ms", type=float, help="default: --slo-factor x unloaded p50")
    parser.add_argument("--slo-factor", type=float, default=3.0)
    parser.add_argument("--floor", type=float, default=0.99)
    parser.add_argument("--phase-seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guard-share", type=float, help="the SLO server's (default: its own)")
    parser.add_argument("--shift", action="store_true", help="noise on half of the images")
    parser.add_argument("--server-cpus", type=cpu_set, help="e.g. 0: the server's cores only")
    parser.add_argument("--client-cpus", type=cpu_set, help="e.g. 1: the load generator's cores")
    args = parser.parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    pngs, labels = digits(args.run, 200, args.shift)
    options = SessionOptions(checkpoint=str(args.run), device="cpu")
    plan = resolve(options)
    scores = calibration_scores(options, plan.macs_per_exit, plan.exits)
    points = operating_points(scores, plan.macs_per_exit, args.floor)
    index = {p.label: i for i, p in enumerate(points)}
    tag = "shift" if args.shift else "ramp"
    fixed = {"keep-100%": list(points[-1].thresholds), "cheapest": list(points[0].thresholds)}
    results, rates, slo_ms = {}, None, args.slo_ms
    for name in [*fixed, "slo"]:
        extra = () if name in fixed else (f"slo_ms={slo_ms}", f"accuracy_floor={args.floor}")
        if name not in fixed and args.guard_share is not None:
            extra += (f"guard_share={args.guard_share}",)
        # the server's log goes to a file: a pipe nobody reads would block it once full
        with open(Path(tempfile.gettempdir()) / f"bench_slo_{tag}_{name}.log", "w") as log:
            proc, url = start_server(args.run, fixed.get(name), args, extra, stderr=log)
            try:
                if rates is None:  # keep-100 %: the ramp's unit, and the SLO's
                    # a closed loop of 32 clients for 4 s: the server's capacity
                    cap = asyncio.run(load(url, pngs, 32, 10**9, 4.0))["throughput"]
                    rates = [f * cap for f in RAMP]
                    # one request at a time (no queue): the SLO's unit
                    unloaded = asyncio.run(load(url, pngs, 1, 30, 60.0))["p50_ms"]
                    slo_ms = slo_ms or round(args.slo_factor * unloaded)
                    print(f"capacity {cap:.1f}/s, unloaded p50 {unloaded:.1f} ms, SLO {slo_ms} ms")
                records = asyncio.run(open_loop(url, pngs, rates, args.phase_seconds))
                info = httpx.get(f"{url}/info").json()["model"]
            finally:
                stop_server(proc)
        name = name if name in fixed else f"slo_ms={slo_ms:g}"
        results[name] = {"phases": summary(records, labels, slo_ms / 1000, args.phase_seconds),
                         "changes": info.get("slo", {}).get("changes", [])}  # fmt: skip
        if name not in fixed:
            plot(records, index, RESULTS / f"bench_slo_{tag}.png", slo_ms)
    out = RESULTS / f"bench_slo_{tag}.json"
    meta = {"command": " ".join(["python -m experiments.bench_slo", *sys.argv[1:]]),
            "capacity": cap, "unloaded_p50_ms": unloaded, "slo_ms": slo_ms,
            "server_cpus": sorted(args.server_cpus or []),
            "client_cpus": sorted(args.client_cpus or []),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    out.write_text(json.dumps({**meta, "rates": rates, "results": results}, indent=1))
    for name, r in results.items():
        print(name)
        for row in r["phases"]:
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
