"""What the server measures: Prometheus metrics (`GET /metrics`) and the load board its SLO
controller reads.

Metrics go through prometheus_client's multiprocess mode: every process (the HTTP process and
each LitServe worker) writes its values to files in one folder (`PROMETHEUS_MULTIPROC_DIR`, set
before the workers start), and `/metrics` aggregates them. `LoadBoard` is a small shared array
(arrivals, requests in flight, recent latencies) the HTTP process writes and the workers read.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterable
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def enable_multiprocess() -> tuple[str, bool]:
    """Put every process's metric files in the folder `PROMETHEUS_MULTIPROC_DIR` names (unset: a
    new temporary one), from now on in this process and in the workers it starts (they inherit
    the environment). Returns (the folder, whether it was made here: then its maker removes it)."""
    made = not os.environ.get(ENV)
    folder = os.environ[ENV] = os.environ.get(ENV) or tempfile.mkdtemp(prefix="met-metrics-")
    os.makedirs(folder, exist_ok=True)
    values.ValueClass = values.get_value_class()  # chosen at import; metrics made now use it
    return folder, made


def metrics_endpoint(folder: str):  # noqa: ANN201 - a Starlette endpoint
    """`GET /metrics`: the Prometheus text exposition of every process's metrics in `folder`."""
    from starlette.responses import Response  # the [serve] extra, as the server

    async def metrics(request: object) -> Response:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


class ServeMetrics:
    """The server's metrics, made in each process after `enable_multiprocess`."""

    def __init__(self) -> None:
        # registry=None: collected from the files, never from a process's default registry
        counter = partial(Counter, registry=None)
        seconds = partial(Histogram, buckets=LATENCY_BUCKETS, registry=None)
        gauge = partial(Gauge, multiprocess_mode="liveall", registry=None)  # one series per worker
        self.requests = counter("met_requests", "POST /predict requests answered, by HTTP status",
                                ["status"])  # fmt: skip
        self.latency = seconds("met_request_latency_seconds", "end-to-end latency of POST "
                               "/predict in the HTTP process")  # fmt: skip
        self.model_time = seconds("met_batch_model_seconds", "model time of a batch (engine)")
        self.batch_size = Histogram("met_batch_size", "images per batch run by the engine",
                                    buckets=BATCH_BUCKETS, registry=None)  # fmt: skip
        self.answers = counter("met_answers", "answers by exit (1-based)", ["exit"])
        self.macs = counter("met_macs_served", "multiply-accumulates spent on answers")
        self.queue = gauge("met_queue_depth", "requests accepted and not answered yet",
                           multiprocess_mode="livesum")  # fmt: skip
        self.point = gauge("met_operating_point", "the SLO controller's point per worker "
                           "(0: cheapest)")  # fmt: skip
        self.point_macs = gauge("met_operating_point_mean_macs", "val mean MACs per image of "
                                "the current point")  # fmt: skip
        self.agreement = gauge("met_guard_agreement", "sampled agreement with the last exit at "
                               "the current point")  # fmt: skip
        self.guard = counter("met_guard_samples", "guard samples run to the last exit, by "
                             "whether the served answer agreed", ["agreed"])  # fmt: skip
        self.decisions = counter("met_slo_changes", "the controller's point changes, by reason",
                                 ["reason"])  # fmt: skip

    def batch(self, exits: Iterable[int], macs: float, seconds: float, size: int) -> None:
        self.model_time.observe(seconds)
        self.batch_size.observe(size)
        self.macs.inc(macs)
        for k in exits:
            self.answers.labels(str(k)).inc()


# ---------------------------------------------------------------------- the load board
RING = 512  # recent latencies kept


class LoadBoard:
    """Arrivals, requests in flight and recent (finish time, latency) pairs, shared by the HTTP
    process (writes) and the workers (read); monotonic clock seconds (one clock per machine)."""

    def __init__(self) -> None:
        self.array = mp.get_context("spawn").Array("d", 3 + 2 * RING)

    def arrived(self) -> None:
        with self.array.get_lock():
            self.array[0] += 1
            self.array[1] += 1

    def answered(self, latency_s: float) -> None:
        now = time.monotonic()
        with self.array.get_lock():
            self.array[1] -= 1
            slot = int(self.array[2])
            self.array[3 + 2 * slot : 5 + 2 * slot] = [now, latency_s]
            self.array[2] = (slot + 1) % RING

    def read(self, window_s: float, now: float | None = None) -> tuple[float, float, float | None]:
        """(arrivals so far, in flight, p95 in ms of the latencies finished in the window)."""
        now = time.monotonic() if now is None else now
        with self.array.get_lock():
            raw = self.array[:]
        recent = sorted(raw[4 + 2 * i] for i in range(RING) if 0 < now - raw[3 + 2 * i] <= window_s)
        p95 = 1000 * recent[max(math.ceil(0.95 * len(recent)) - 1, 0)] if recent else None
        return raw[0], raw[1], p95
