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

`--faults RUN` is the hostile-load check instead (issue 19): --clients concurrent clients for
--duration seconds mix good digits (multipart and JSON), malformed requests (fuzzed DDS / IM
files, truncated and non-image files, JSON nested 50,000 deep, multipart with a wrong boundary)
and small files of huge images (9400x9400 and 13000x13000 1-bit, 8000x8000 16-bit PNG). Every good
request must be 200 with predict's answer (the engine offline on the same files), every bad one
4xx; the server's process-group memory (RSS and PSS summed over its processes, sampled every
0.1 s) is compared with its idle level. Then SIGTERM while the clients are still sending: every
request in flight must be answered, every process gone within --drain-timeout.

    python experiments/bench_serve.py --faults RUN            # writes bench_serve_faults_cpu.*
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
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
import tempfile
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
from met_lightning.data.images import decode_image
from met_lightning.inference.budget import SplitScores, calibrate_thresholds
from met_lightning.inference.session import SessionOptions, open_session, resolve

RESULTS = Path(__file__).resolve().parent / "results"


def test_digits(run: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's first `count` digits test images (never trained on) [count, 8, 8], values
    0..16, and their labels [count]."""
    seed = OmegaConf.load(run / "config.yaml").seed
    digits = load_digits()
    _, _, test_index = stratified_split(digits.target, 0.2, 0.2, seed=seed)
    return digits.images[test_index[:count]], digits.target[test_index[:count]]


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey PNG file of `pixels` [h, w] in 0..255 (rounded, clipped)."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def digit_pngs(run: Path, count: int) -> list[bytes]:
    """The run's digits test images (never trained on) as PNG file bytes."""
    return [png_bytes(image / 16 * 255) for image in test_digits(run, count)[0]]


def cpu_session(run: Path, **values) -> object:
    """The run's inference session on the CPU (`values`: session options, e.g. budget=)."""
    return open_session(resolve(SessionOptions(checkpoint=str(run), device="cpu", **values)))


def offline_rows(session, pngs: list[bytes]) -> list[dict]:
    """The session's rows for PNG files, run offline as one batch: what a server must answer."""
    with torch.inference_mode():
        return session.classify(list(tensors(session, pngs)))


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


def start_server(
    run: Path,
    thresholds: list[float] | None,
    args: argparse.Namespace,
    extra: tuple[str, ...] = (),
    stderr: object = subprocess.PIPE,
):
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
    command.extend(extra)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the server's torch threads
    cpus = getattr(args, "server_cpus", None)  # the server and its workers on these cores only
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True, env=env, preexec_fn=pin)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 300)
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float) -> None:
    """Return once the server process `proc` answers GET /health with 200; RuntimeError (its
    process group killed) if it exits or is not healthy within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = proc.stderr.read()[-3000:] if proc.stderr else ""  # None unless a pipe
            raise RuntimeError(f"the server exited: {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"the server did not become healthy within {seconds:g} s")


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
    engines = {name: EarlyExitEngine(session.net, t) for name, t in settings.items()}
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

    engine = EarlyExitEngine(session.net, thresholds)
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
        session = cpu_session(run)
        images = tensors(session, pngs)
        with torch.inference_mode():
            logits = session.net(images).logits
        scores = SplitScores.from_logits(logits, torch.zeros(len(images), dtype=torch.long))
        shares = [float(s) / 100 for s in args.shares.split(",")]
        thresholds = [*calibrate_thresholds(scores.confidence, shares)[:-1], -math.inf]
        how = f"thresholds forced to exit shares {args.shares} % on these images"
    else:
        session = cpu_session(run, budget=args.budget)
        images = tensors(session, pngs)
        thresholds, how = session.plan.thresholds, f"budget={args.budget}: {session.plan.how}"
    k = session.net.num_exits
    exits = session.engine.__class__(session.net, thresholds)(images).exit_index
    shares = (torch.bincount(exits, minlength=k).float() / len(images)).tolist()
    macs = session.plan.macs_per_exit
    mean_macs = float(np.dot(shares, macs))
    result = {
        "model": name,
        "run": str(run),
        "backbone": session.plan.config["backbone"]["model_kwargs"],
        "input_size": list(session.spec.input_size),
        "exits": list(session.net.exits),
        "macs_per_exit": list(macs),
        "thresholds": [t if math.isfinite(t) else str(t) for t in thresholds],
        "how": how,
        "exit_shares": shares,
        "macs_speedup": macs[-1] / mean_macs,
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


# ---------------------------------------------------------------------- --faults
def fuzzed_files() -> dict[str, bytes]:
    """Files Pillow fails on, each with another exception (see tests/security/test_server.py)."""
    out = {}
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="DDS")
    dds = bytearray(buffer.getvalue())
    dds[80] = 0  # pixel-format flags: NotImplementedError
    out["fuzzed DDS"] = bytes(dds)
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="IM")
    out["fuzzed IM"] = buffer.getvalue().replace(b"8*8", b"8*8.5")  # TypeError on load
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 99).save(buffer, format="PNG")
    out["truncated PNG"] = buffer.getvalue()[:60]
    out["not an image"] = b"<html>not an image</html>"
    return out


def huge_pngs() -> dict[str, bytes]:
    """Small files of huge images (the sizes of the issue)."""
    out = {}
    for name, mode, side in (("9400x9400 1-bit PNG", "1", 9400),
                             ("13000x13000 1-bit PNG", "1", 13000),
                             ("8000x8000 16-bit PNG", "I;16", 8000)):  # fmt: skip
        buffer = io.BytesIO()
        Image.new(mode, (side, side)).save(buffer, format="PNG")
        out[name] = buffer.getvalue()
    return out


def fault_mix(pngs: list[bytes], expected: list[dict]) -> list[tuple[str, str, dict, object]]:
    """(kind, name, request kwargs, expected row or None) in the order clients cycle through:
    per 10 requests 6 good (multipart / JSON), 2 malformed, 2 huge."""
    good = []
    for i, (data, row) in enumerate(zip(pngs, expected, strict=True)):
        if i % 2:
            request = {"json": {"image": base64.b64encode(data).decode()}}
        else:
            request = {"files": {"file": (f"{i}.png", data, "image/png")}}
        good.append(("good", f"digit {i}", request, row))
    deep = "[" * 50_000 + "]" * 50_000
    bad = [("bad", name, {"files": {"file": ("x.png", data)}}, None)
           for name, data in fuzzed_files().items()]  # fmt: skip
    bad += [
        ("bad", "JSON 50000 deep",
         {"content": deep.encode(), "headers": {"content-type": "application/json"}}, None),
        ("bad", "wrong multipart boundary",
         {"content": b"--a\r\n\r\nx\r\n--a--\r\n",
          "headers": {"content-type": "multipart/form-data; boundary=b"}}, None),
    ]  # fmt: skip
    huge = [("huge", name, {"files": {"file": ("x.png", data)}}, None)
            for name, data in huge_pngs().items()]  # fmt: skip
    mix = []
    for k in range(max(len(good) // 6, 1) * 10):
        block, slot = divmod(k, 10)
        if slot < 6:
            mix.append(good[(block * 6 + slot) % len(good)])
        elif slot < 8:
            mix.append(bad[(block * 2 + slot - 6) % len(bad)])
        else:
            mix.append(huge[(block * 2 + slot - 8) % len(huge)])
    return mix


def group_memory(pgid: int) -> tuple[int, int, int]:
    """(processes, RSS bytes, PSS bytes) summed over the live processes of a process group."""
    count, rss, pss = 0, 0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) != pgid or state == "Z":
                continue
            status = (stat.parent / "status").read_text()
            rollup = (stat.parent / "smaps_rollup").read_text()
        except (OSError, ValueError):
            continue  # gone meanwhile
        count += 1
        rss += 1024 * int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
        pss += 1024 * int(rollup.split("Pss:")[1].split()[0]) if "Pss:" in rollup else 0
    return count, rss, pss


class MemorySampler:
    """Samples `group_memory` every `period` s in a thread; peaks and the latest sample."""

    def __init__(self, pgid: int, period: float = 0.1) -> None:
        import threading

        self.pgid, self.period = pgid, period
        self.peak_rss = self.peak_pss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            _, rss, pss = group_memory(self.pgid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def same_row(got: dict, want: dict) -> bool:
    keys = ("class", "class_name", "exit", "block", "macs")
    return (
        all(got.get(k) == want[k] for k in keys)
        and abs(got.get("confidence", -1) - want["confidence"]) <= 1e-4
    )


async def fault_load(url: str, mix: list, clients: int, seconds: float, proc, drain: float):
    """`clients` clients cycle through `mix` for `seconds`, then SIGTERM to the server while
    they keep sending (each stops at its first refused connection). Returns (records, stop)."""
    records: list[dict] = []
    stop: dict = {}
    signalled = asyncio.Event()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(offset: int) -> None:
            i = offset
            while True:
                kind, name, request, want = mix[i % len(mix)]
                i += clients
                start = time.monotonic()
                record = {"kind": kind, "name": name, "start": start}
                try:
                    answer = await client.post("/predict", **request)
                except httpx.TransportError as err:
                    record.update(end=time.monotonic(), error=type(err).__name__)
                    records.append(record)
                    if signalled.is_set():
                        return  # the server stopped accepting
                    continue
                record.update(end=time.monotonic(), status=answer.status_code)
                if kind == "good" and answer.status_code == 200:
                    record["right"] = same_row(answer.json(), want)
                elif answer.status_code != 200:
                    record["detail"] = answer.json().get("detail", "")[:120]
                records.append(record)

        async def controller() -> None:
            await asyncio.sleep(seconds)
            stop["signal"] = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            signalled.set()
            try:
                stop["rc"] = await asyncio.to_thread(proc.wait, drain + 60)
            except subprocess.TimeoutExpired:
                stop["rc"] = None
            stop["exited"] = time.monotonic()
            while group_memory(proc.pid)[0] and time.monotonic() < stop["signal"] + drain + 60:
                await asyncio.sleep(0.05)
            stop["gone"] = time.monotonic()
            stop["left"] = group_memory(proc.pid)[0]

        tasks = [asyncio.create_task(worker(k)) for k in range(clients)]
        await controller()
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
    return records, stop


def faults(args: argparse.Namespace) -> dict:
    run = args.faults
    torch.set_num_threads(args.threads)
    pngs = digit_pngs(run, 60)
    session = cpu_session(run, budget=args.budget)
    expected = offline_rows(session, pngs)
    thresholds, how = session.plan.thresholds, session.plan.how
    del session
    mix = fault_mix(pngs, expected)
    log_file = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and block the server
    extra = (f"drain_timeout={args.drain_timeout}",)
    proc, url = start_server(run, thresholds, args, extra=extra, stderr=log_file)
    try:
        warm = asyncio.run(load(url, pngs, 1, 5, 30))  # warm-up: the model's first batches
        assert warm["failures"] == 0, warm
        time.sleep(1.0)
        idle = [group_memory(proc.pid) for _ in range(10) if time.sleep(0.1) is None]
        idle_rss = max(s[1] for s in idle)
        idle_pss = max(s[2] for s in idle)
        with MemorySampler(proc.pid) as sampler:
            records, stop = asyncio.run(
                fault_load(url, mix, args.clients, args.duration, proc, args.drain_timeout)
            )
    finally:
        if proc.poll() is None or group_memory(proc.pid)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    log_file.seek(0)
    server_log = log_file.read()
    t_signal = stop["signal"]
    before = [r for r in records if r["end"] < t_signal]
    in_flight = [r for r in records if r["start"] < t_signal <= r["end"]]
    after = [r for r in records if r["start"] >= t_signal]
    good = [r for r in before if r["kind"] == "good"]
    bad = [r for r in before if r["kind"] != "good"]
    latencies = [1000 * (r["end"] - r["start"]) for r in good]
    by_name: dict[str, dict] = {}
    for r in bad:
        entry = by_name.setdefault(
            r["name"], {"sent": 0, "statuses": {}, "detail": r.get("detail")}
        )
        entry["sent"] += 1
        key = str(r.get("status", r.get("error")))
        entry["statuses"][key] = entry["statuses"].get(key, 0) + 1
    return {
        "run": run.name,
        "thresholds": how,
        "clients": args.clients,
        "duration_s": args.duration,
        "drain_timeout_s": args.drain_timeout,
        "load": {
            "requests": len(before),
            "good": len(good),
            "good_200_right": sum(r.get("status") == 200 and r.get("right", False) for r in good),
            "good_failed": [r for r in good if not (r.get("status") == 200 and r.get("right"))][:5],
            "bad": len(bad),
            "bad_4xx": sum(400 <= r.get("status", 0) < 500 for r in bad),
            "bad_by_kind": by_name,
            "good_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
            "good_p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
        },
        "memory": {
            "idle_rss_mb": idle_rss / 2**20,
            "peak_rss_mb": sampler.peak_rss / 2**20,
            "rss_ratio": sampler.peak_rss / idle_rss,
            "idle_pss_mb": idle_pss / 2**20,
            "peak_pss_mb": sampler.peak_pss / 2**20,
            "pss_ratio": sampler.peak_pss / idle_pss,
            "processes_idle": idle[-1][0],
            "samples": sampler.samples,
        },
        "stop": {
            "in_flight": len(in_flight),
            "in_flight_answered": sum("status" in r for r in in_flight),
            "in_flight_statuses": sorted(
                {r.get("status", r.get("error")) for r in in_flight}, key=str
            ),
            "sent_after_signal": len(after),
            "after_signal_outcomes": sorted({str(r.get("status", r.get("error"))) for r in after}),
            "rc": stop["rc"],
            "exit_s": stop["exited"] - t_signal,
            "all_gone_s": stop["gone"] - t_signal,
            "processes_left": stop["left"],
            "traceback_in_log": "Traceback" in server_log,
        },
        "server_log_tail": server_log[-1500:],
    }


def faults_markdown(r: dict, command: str, when: str) -> str:
    load_, mem, stop = r["load"], r["memory"], r["stop"]
    ok = {
        "good 200 + right answer": load_["good_200_right"] == load_["good"],
        "bad 4xx": load_["bad_4xx"] == load_["bad"],
        "peak RSS < 2x idle": mem["rss_ratio"] < 2,
        "in flight answered": stop["in_flight_answered"] == stop["in_flight"],
        "exit 0, all gone within drain_timeout": stop["rc"] == 0
        and stop["all_gone_s"] <= r["drain_timeout_s"]
        and stop["processes_left"] == 0,
        "no traceback": not stop["traceback_in_log"],
    }
    lines = [
        "# Serving under hostile load, then SIGTERM (cpu, loopback)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine().split(', ')[0]}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; load average at the end {os.getloadavg()[0]:.1f}; the clients "
        "run on the same machine",
        f"- date: {when}",
        f"- run: {r['run']} ({r['thresholds']}); {r['clients']} clients for {r['duration_s']} s, "
        "per 10 requests 6 good digits (multipart / JSON), 2 malformed, 2 huge-pixel PNGs; "
        f"drain_timeout={r['drain_timeout_s']} s",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {name} | {'pass' if passed else '**FAIL**'} |" for name, passed in ok.items()),
        "",
        f"- load: {load_['requests']} requests answered before the signal; good "
        f"{load_['good_200_right']}/{load_['good']} 200 with the right answer (p50 "
        f"{load_['good_p50_ms'] or 0:.0f} ms, p95 {load_['good_p95_ms'] or 0:.0f} ms); bad "
        f"{load_['bad_4xx']}/{load_['bad']} 4xx",
        f"- memory of the server's process group ({mem['processes_idle']} processes): RSS idle "
        f"{mem['idle_rss_mb']:.0f} MB, peak {mem['peak_rss_mb']:.0f} MB "
        f"(**{mem['rss_ratio']:.2f}x**); PSS idle {mem['idle_pss_mb']:.0f} MB, peak "
        f"{mem['peak_pss_mb']:.0f} MB ({mem['pss_ratio']:.2f}x); {mem['samples']} samples",
        f"- SIGTERM with {stop['in_flight']} requests in flight: {stop['in_flight_answered']} "
        f"answered ({', '.join(map(str, stop['in_flight_statuses']))}); main process exit "
        f"{stop['exit_s']:.2f} s after the signal (rc {stop['rc']}), every process gone after "
        f"{stop['all_gone_s']:.2f} s; {stop['sent_after_signal']} requests sent after the "
        f"signal: {', '.join(stop['after_signal_outcomes']) or 'none'}",
        "",
        "| bad request | sent | answers | first reason |",
        "|---|---|---|---|",
        *(
            f"| {name} | {e['sent']} | {e['statuses']} | {e['detail']} |"
            for name, e in sorted(load_["bad_by_kind"].items())
        ),
        "",
    ]
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
    parser.add_argument("--out", type=Path, default=None,
                        help="results stem (default results/bench_serve[_faults]_cpu)")  # fmt: skip
    parser.add_argument("--faults", type=Path, help="a run folder: the hostile-load check instead")
    parser.add_argument("--duration", type=float, default=60.0, help="--faults: seconds of load")
    parser.add_argument("--clients", type=int, default=16, help="--faults: concurrent clients")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="--faults: the server's")
    args = parser.parse_args()
    program = "-m experiments.bench_serve" if __spec__ is not None else sys.argv[0]
    command = "python " + " ".join([program, *sys.argv[1:]])
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.faults is not None:
        out = args.out or RESULTS / "bench_serve_faults_cpu"
        result = faults(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": command, "date": when, "machine": machine(), **result}
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        out.with_suffix(".md").write_text(faults_markdown(result, command, when))
        print(faults_markdown(result, command, when))
        return
    args.out = args.out or RESULTS / "bench_serve_cpu"
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
