"""Serve a trained MET model over HTTP with LitServe: early exit inside dynamic batches.

    python -m met_lightning.serve checkpoint=RUN budget=0.5 host=127.0.0.1 port=8000

`POST /predict` takes one image (multipart field `file`, or JSON `{"image": "<base64>"}`) and
answers predict's row for it plus `batch_size`; `GET /info` describes the model. A bad request
fails alone with its own 4xx (README): `RequestGuard` refuses what it can before LitServe sees it,
`decode_request` the rest. SIGTERM / SIGINT drain the requests in flight (`drain_timeout`), stop
LitServe's worker and queue manager, and exit 0.
"""

import asyncio
import base64
import contextlib
import ctypes
import io
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from met_lightning.cli import hydra_app, user_task
from met_lightning.data.images import decode_image
from met_lightning.errors import ConfigError, MetError
from met_lightning.inference.analysis import finite
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.inference.session import (
    Plan,
    Session,
    SessionOptions,
    calibration_scores,
    open_session,
    resolve,
    typed_options,
)
from met_lightning.inference.slo import (
    ControlConfig,
    Controller,
    Decision,
    OperatingPoint,
    Signals,
    operating_points,
)

try:  # the [serve] extra
    import litserve as ls
    from starlette.datastructures import Headers
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from met_lightning.serve_metrics import (
        ENV,
        LoadBoard,
        ServeMetrics,
        enable_multiprocess,
        metrics_endpoint,
    )
except ImportError:  # pragma: no cover - reported by `build_server`
    ls = None

log = logging.getLogger(__name__)

API_PATH = "/predict"
ACCEPTED = ("multipart/form-data", "application/json")
USAGE = (
    "send multipart/form-data with the image file in field 'file' "
    '(curl -F file=@image.png URL) or application/json {"image": "<base64 of the file>"}'
)


@dataclass
class ServeOptions(SessionOptions):
    """`python -m met_lightning.serve` (conf/serve.yaml); device: cpu or cuda (the first GPU)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # dynamic batching (LitAPI): up to max_batch_size requests, waiting at most batch_timeout s
    max_batch_size: int = 64
    batch_timeout: float = 0.005
    # largest request body accepted (413 above it)
    max_upload_mb: float = 10.0
    # largest image accepted in pixels (width x height), checked on the header before decoding:
    # a 11 KB PNG can decode to 265 MB. A JPEG over it is decoded at 1/2, 1/4 or 1/8 scale,
    # other images get a 413. At least the model's input; the default fits a 4K frame
    max_image_pixels: int = 10_000_000
    # seconds a request may wait for its answer (504 after)
    timeout: float = 30.0
    # on SIGTERM / SIGINT: answer the requests in flight for at most this many seconds (503
    # after). Keep it below the stopper's grace time (docker stop: 10 s, Kubernetes: 30 s)
    drain_timeout: float = 10.0
    # uvicorn log level: critical | error | warning | info | debug
    log_level: str = "warning"
    # LitServe workers: devices (GPUs, cuda:0..devices-1; 1 on cpu) and processes per device.
    # Each worker has its own engine (CUDA graphs, precision) and SLO controller
    devices: int = 1
    workers_per_device: int = 1
    # latency SLO (off: null): p95 target in ms. The server then moves between the points of
    # the run's calibrated budget curve (its logits.safetensors) by load; not with budget= or
    # thresholds= (README, "Latency SLO")
    slo_ms: float | None = None
    # with slo_ms: the points allowed keep val accuracy >= accuracy_floor x the last exit's
    accuracy_floor: float = 0.99
    # with slo_ms: seconds between the controller's decisions
    control_interval: float = 0.5
    # with slo_ms: share of requests also run to the last exit (the accuracy guard)
    guard_share: float = 0.02


ConfigStore.instance().store(name="serve_options", node=ServeOptions)


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Rejected:
    """A request that cannot be answered: its HTTP status and the reason."""

    status: int
    reason: str

    def response(self) -> Any:
        return JSONResponse({"detail": self.reason}, status_code=self.status)


# a JPEG over the pixel limit is decoded at the first of these reductions that fits it
DRAFT_SCALES = (2, 4, 8)


def fit_pixels(image: Image.Image, max_pixels: int) -> Rejected | None:
    """Bound an opened, undecoded image to `max_pixels`: a JPEG is drafted smaller, others 413."""
    width, height = image.size
    if width * height <= max_pixels:
        return None
    fits = [s for s in DRAFT_SCALES if -(-width // s) * -(-height // s) <= max_pixels]
    if fits:  # a no-op but for JPEG (and MPO)
        image.draft(None, (max(1, width // fits[0]), max(1, height // fits[0])))
        if image.size[0] * image.size[1] <= max_pixels:
            return None
    return too_large(width, height, max_pixels)


def too_large(width: int, height: int, max_pixels: int) -> Rejected:
    return Rejected(
        413,
        f"the image is {width}x{height} = {width * height} pixels, over the server's "
        f"max_image_pixels={max_pixels}; send it downscaled (the model sees a small input anyway)",
    )


def decode(request: Any, session: Session, max_pixels: int) -> torch.Tensor | Rejected:
    """A request `RequestGuard` passed (JSON `{"image": base64}` or a form with a file 'file') as
    the model's input [C, H, W], or why not (whatever a decoder raises: 400)."""
    try:
        if isinstance(request, dict):
            try:
                data = base64.b64decode(request["image"], validate=True)
            except ValueError as err:  # binascii.Error too
                return Rejected(400, f"field 'image' is not valid base64: {err}")
        else:
            data = request["file"].file.read()
        with warnings.catch_warnings():  # Pillow's bomb warning: fit_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                refused = fit_pixels(image, max_pixels)
                if refused is not None:
                    return refused
                picture = decode_image(image, session.spec)
        if picture.size[0] * picture.size[1] > max_pixels:  # a format whose header lied
            return too_large(*picture.size, max_pixels)
        return session.transform(picture)
    except Image.DecompressionBombError as err:  # over Pillow's own limit, before fit_pixels
        return Rejected(413, f"{err}; the server's max_image_pixels={max_pixels}")
    except UnidentifiedImageError:  # its message shows an object's address: not for clients
        return Rejected(400, "cannot decode the image: not an image file of a format Pillow reads")
    except Exception as err:
        return Rejected(400, f"cannot decode the image: {type(err).__name__}: {err}")


def replay(body: bytes | None, then: Any = None) -> Any:
    """An ASGI `receive`: `body` once (None: nothing), then `then`'s messages (None: disconnect)."""
    sent = body is None

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return await then() if then is not None else {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class RequestGuard:
    """ASGI middleware for `POST /predict`: refuses what it can before LitServe sees it, with the
    reason (module docstring). Only `{"image": ...}` is passed on, so no other field reaches
    LitServe's queues (pickled: deep nesting would fail there). A request still unanswered when
    a shutdown's drain time is over gets a 503."""

    def __init__(
        self, app: Any, max_upload_mb: float, metrics: ServeMetrics | None = None,
        board: LoadBoard | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 2**20)
        self.metrics = metrics  # requests by status, latency, queue depth
        self.board = board  # what the SLO controllers read

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != API_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        began, status = time.monotonic(), [0]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.board is not None:
            self.board.arrived()
        if self.metrics is not None:
            self.metrics.queue.inc()
        try:
            body = await self.checked_body(scope, receive)
            if isinstance(body, Rejected):
                await body.response()(scope, replay(None), counted)
            elif body is not None:  # None: the client went away
                # the JSON may be rewritten: its length too
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await self.app({**scope, "headers": headers}, replay(body, receive), counted)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when drain_timeout is over: answer, do not leave
            # the client with a dropped connection (nor the log with a traceback)
            if not status[0]:
                stopped = Rejected(503, "the server stopped before answering (drain_timeout)")
                await stopped.response()(scope, replay(None), counted)
        finally:
            latency = time.monotonic() - began
            if self.board is not None:
                self.board.answered(latency)
            if self.metrics is not None:
                self.metrics.queue.dec()
                self.metrics.requests.labels(str(status[0] or "none")).inc()
                self.metrics.latency.observe(latency)

    async def checked_body(self, scope: dict, receive: Any) -> bytes | Rejected | None:
        """The body to pass on, or why it is refused (None: the client went away)."""
        headers = Headers(scope=scope)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ACCEPTED:
            return Rejected(415, f"Content-Type {media or 'none'} is not accepted; {USAGE}")
        limit = f"the limit is max_upload_mb={self.max_upload_mb:g}"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return Rejected(413, f"request body of {declared} bytes is too large; {limit}")
        received, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            received += message.get("body", b"")
            if len(received) > self.max_bytes:
                return Rejected(413, f"request body over {self.max_bytes} bytes; {limit}")
            more = message.get("more_body", False)
        body = bytes(received)
        if media == "application/json":
            return json_body(body)
        return await form_problem(scope, body) or body


def json_body(body: bytes) -> bytes | Rejected:
    """The JSON body to pass on (`{"image": ...}` only), or why it is refused."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        return Rejected(400, "the body is not valid JSON: nested too deep")
    except ValueError as err:  # UnicodeDecodeError too
        return Rejected(400, f"the body is not valid JSON: {err}")
    if not isinstance(parsed, dict):
        return Rejected(422, f"the JSON body must be an object; {USAGE}")
    value = parsed.get("image")
    if value is None:
        return Rejected(422, f"missing field 'image' in the JSON body; {USAGE}")
    if not isinstance(value, str):
        return Rejected(422, "field 'image' must be a base64 string of an image file")
    return body if len(parsed) == 1 else json.dumps({"image": value}).encode()


async def form_problem(scope: dict, body: bytes) -> Rejected | None:
    """Why a multipart body is refused: 400 if it does not parse (the parser's error would be
    LitServe's 500), 422 without a file in field 'file'; None if it is fine."""
    try:  # the parts a request may have (the form is parsed again by LitServe)
        form = await Request(scope, replay(body)).form(max_files=4, max_fields=16)
        await form.close()
    except Exception as err:
        detail = getattr(err, "detail", None) or getattr(err, "message", None) or err
        return Rejected(400, f"the multipart body cannot be parsed: {detail}; {USAGE}")
    upload = form.get("file")
    if upload is None:
        return Rejected(422, f"missing field 'file' in the multipart form; {USAGE}")
    if isinstance(upload, str):
        return Rejected(422, "field 'file' must be a file upload (curl -F file=@image.png)")
    return None


# ---------------------------------------------------------------------- the API
@dataclass(frozen=True)
class SloSetup:
    """What each worker's SLO controller needs (picklable; the board and the queue are shared
    with the workers by inheritance)."""

    points: tuple[OperatingPoint, ...]
    config: ControlConfig
    interval: float  # seconds between decisions
    guard_share: float
    board: Any  # LoadBoard: arrivals, in flight, recent latencies (the HTTP process writes)
    changes: Any  # a queue of the workers' point changes, read into /info


class EarlyExitAPI(ls.LitAPI if ls is not None else object):
    """LitServe API: decode each request, run the early-exit engine on the batch's good images."""

    def __init__(self, plan: Plan, options: DictConfig, slo: SloSetup | None = None) -> None:
        super().__init__(max_batch_size=options.max_batch_size, batch_timeout=options.batch_timeout)
        self.plan = plan  # plain data: the API is pickled into LitServe's worker process
        self.max_pixels = options.max_image_pixels
        self.slo = slo

    def setup(self, device: str) -> None:
        # LitServe's worker: Ctrl+C is for the main process, which stops the workers itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent()
        self.session = open_session(replace(self.plan, device=device))  # the network, built here
        self.metrics = ServeMetrics()  # this worker's, aggregated by /metrics
        self.controller = None
        if self.slo is not None:
            self.controller = Controller(list(self.slo.points), self.slo.config)
            self.session.engine.set_thresholds(self.controller.point.thresholds)
            engine = self.session.engine  # the guard's: every sampled image to the last exit
            never = [math.inf] * len(self.plan.exits)
            self.last_exit = EarlyExitEngine(
                self.session.net, never, engine.kind, engine.precision, engine.mode
            )
            self.sampler = random.Random(os.getpid())
            self.controlled_at, self.arrivals = time.monotonic(), self.slo.board.read(0)[0]
            self.publish(Decision(self.controller.state.index, False, "start"), Signals())

    def decode_request(self, request):  # noqa: ANN001 - unannotated: LitServe passes the parsed body
        return decode(request, self.session, self.max_pixels)

    def batch(self, inputs: list) -> list:
        return inputs  # stacked in predict, once the bad items are set aside

    def unbatch(self, outputs: list) -> list:
        return outputs

    def predict(self, inputs: Any) -> Any:
        """inputs: [C, H, W] tensors and Rejected items -> one row dict or Rejected per item."""
        single = not isinstance(inputs, list)  # max_batch_size=1: LitServe passes one item
        items = [inputs] if single else inputs
        good = [i for i, x in enumerate(items) if isinstance(x, torch.Tensor)]
        outputs = list(items)
        if good:
            extra = {"batch_size": len(items)}
            if self.controller is not None:
                self.control()
                extra["point"] = self.controller.point.label
            images = [items[i] for i in good]
            began = time.perf_counter()
            try:
                rows = self.session.classify(images)
            except Exception:  # not expected for decoded images; then each image runs alone
                log.exception("the engine failed on a batch of %d images; retrying each", len(good))
                rows = [self.row_alone(items[i]) for i in good]
            self.measured(images, rows, time.perf_counter() - began)
            for i, row in zip(good, rows, strict=True):
                outputs[i] = row if isinstance(row, Rejected) else {**row, **extra}
        return outputs[0] if single else outputs

    def measured(self, images: list[torch.Tensor], rows: list, seconds: float) -> None:
        """Metrics of a batch; with an SLO: the cost model and the guard's samples."""
        answered = [(i, r) for i, r in enumerate(rows) if not isinstance(r, Rejected)]
        macs = float(sum(r["macs"] for _, r in answered))
        self.metrics.batch([r["exit"] for _, r in answered], macs, seconds, len(rows))
        if self.controller is None:
            return
        self.controller.measured(macs, seconds)
        sampled = [(i, r) for i, r in answered if self.sampler.random() < self.slo.guard_share]
        if sampled:
            batch = torch.stack([images[i] for i, _ in sampled]).to(self.session.device)
            last = self.last_exit(batch).predictions.tolist()
            agreed = sum(int(r["class"] == c) for (_, r), c in zip(sampled, last, strict=True))
            self.controller.guarded(agreed, len(sampled))
            self.metrics.guard.labels("yes").inc(agreed)
            self.metrics.guard.labels("no").inc(len(sampled) - agreed)

    def control(self) -> None:
        """Every control_interval: read the load board, let the controller decide, apply."""
        now = time.monotonic()
        if now - self.controlled_at < self.slo.interval:
            return
        arrivals, waiting, p95 = self.slo.board.read(max(2 * self.slo.interval, 1.0), now)
        rate = (arrivals - self.arrivals) / (now - self.controlled_at)
        self.controlled_at, self.arrivals = now, arrivals
        signals = Signals(arrival_rate=rate, waiting=max(waiting, 0.0), p95_ms=p95)
        decision = self.controller.step(signals)
        if decision.changed:
            self.session.engine.set_thresholds(self.controller.point.thresholds)
        self.publish(decision, signals)

    def publish(self, decision: Decision, signals: Signals) -> None:
        """Log a decision, set the metrics; a change (or the start) goes to /info too."""
        point, agreement = self.controller.point, self.controller.agreement
        self.metrics.point.set(decision.index)
        self.metrics.point_macs.set(point.mean_macs)
        if agreement is not None:
            self.metrics.agreement.set(agreement)
        record = {
            "time": time.time(), "worker": os.getpid(), "point": point.label,
            "index": decision.index, "reason": decision.reason, "rate": signals.arrival_rate,
            "waiting": signals.waiting, "p95_ms": signals.p95_ms, "agreement": agreement,
            "guard_samples": self.controller.sampled,
        }  # fmt: skip
        if not (decision.changed or decision.reason == "start"):
            log.debug("slo: %s", record)
            return
        log.info("slo: %s", record)
        self.metrics.decisions.labels(decision.reason.split(":")[0]).inc()
        with contextlib.suppress(queue.Full):
            self.slo.changes.put_nowait(record)

    def row_alone(self, image: torch.Tensor) -> dict | Rejected:
        try:
            return self.session.classify([image])[0]
        except Exception as err:
            return Rejected(500, f"the model failed on this image: {type(err).__name__}: {err}")

    def encode_response(self, output: Any) -> Response:
        if isinstance(output, Rejected):
            return output.response()
        try:
            return JSONResponse(output)
        except ValueError as err:  # a non-finite confidence: JSON has no NaN
            return JSONResponse({"detail": f"the answer is not valid JSON: {err}"}, 500)


def die_with_parent() -> None:
    """Linux: SIGKILL this (worker or manager) process when its parent dies: no orphan server."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------- server
def server_info(plan: Plan, options: DictConfig, slo: SloSetup | None = None) -> dict[str, Any]:
    """What `GET /info` reports under "model" (with an SLO: "slo", its points and changes)."""
    info = {
        "checkpoint": run_name(plan.checkpoint),
        "backbone": plan.config["backbone"].get("name"),
        "num_classes": plan.config["num_classes"],
        "class_names": plan.class_names,
        "exits": list(plan.exits),
        "thresholds": [finite(t) for t in plan.thresholds],
        "how": plan.how,
        "confidence": plan.confidence,
        "macs_per_exit": list(plan.macs_per_exit),
        "input_size": list(plan.input_spec.input_size),
        "precision": plan.precision,
        **{key: options[key] for key in ("budget", "max_batch_size", "batch_timeout")},
        "max_image_pixels": options.max_image_pixels,
        "macs": "multiply-accumulates per image",
    }
    if slo is not None:
        info["slo"] = {
            "slo_ms": slo.config.slo_ms, "accuracy_floor": options.accuracy_floor,
            "control_interval": slo.interval, "guard_share": slo.guard_share,
            "points": [{"label": p.label, "thresholds": [finite(t) for t in p.thresholds],
                        "accuracy": p.accuracy, "mean_macs": p.mean_macs,
                        "agreement": p.agreement} for p in slo.points],
            "current": {}, "changes": [],
        }  # fmt: skip
    return info


def run_name(checkpoint: str) -> str:
    """The run folder's name (and the file's, if a file was given): not the host's layout."""
    path = Path(os.path.abspath(checkpoint))
    return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"


# serving keys a user can get wrong (the session's own: `session.resolve`): (valid?, the rule)
SERVE_CHECKS = {
    "max_batch_size": (lambda v: v > 0, "must be a positive integer"),
    "batch_timeout": (lambda v: v >= 0, "must be >= 0 seconds"),
    "max_upload_mb": (lambda v: v > 0, "must be > 0"),
    "timeout": (lambda v: v > 0, "must be > 0 seconds"),
    "drain_timeout": (lambda v: 0 <= v < float("inf"), "must be >= 0 seconds"),
    "port": (lambda v: 0 < v < 65536, "must be in 1..65535"),
    "devices": (lambda v: v > 0, "must be a positive integer"),
    "workers_per_device": (lambda v: v > 0, "must be a positive integer"),
    "slo_ms": (lambda v: v is None or 0 < v < float("inf"), "must be > 0 ms (or null: off)"),
    "accuracy_floor": (
        lambda v: 0 < v <= 1,
        "must be in (0, 1]: the share of the last exit's val accuracy to keep",
    ),  # fmt: skip
    "control_interval": (lambda v: v > 0, "must be > 0 seconds"),
    "guard_share": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def check_port_free(host: str, port: int) -> None:
    """ConfigError if `host:port` cannot be bound (in use, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"port={port} on host={host} cannot be used ({err.strerror}); stop the program "
                "using it or give another port="
            ) from None


def serve_options(cfg: DictConfig) -> DictConfig:
    """`cfg` as `ServeOptions` with the serving keys checked (`SERVE_CHECKS`); ConfigError if
    one is wrong or the [serve] extra is missing."""
    options = typed_options(cfg, ServeOptions, "serve")
    if ls is None:
        raise ConfigError("serving needs LitServe: pip install 'met_lightning[serve]'")
    for key, (valid, rule) in SERVE_CHECKS.items():
        if not valid(options[key]):
            raise ConfigError(f"{key}={options[key]} {rule}")
    chosen = options.budget is not None or options.thresholds is not None
    if options.slo_ms is not None and chosen:
        raise ConfigError("slo_ms= chooses the thresholds by load: give no budget= or thresholds=")
    return options


def build_server(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """(LitServer, /info model dict): every option checked, the session resolved (meta device)."""
    options = serve_options(cfg)
    plan = resolve(options)  # checkpoint, thresholds, confidence, precision, device, mode
    device = torch.device(plan.device)
    if device.type not in ("cpu", "cuda") or (device.index or 0) != 0:
        raise ConfigError(
            f"device={options.device}: serve runs on cpu or cuda (the first visible GPU; choose "
            "it with CUDA_VISIBLE_DEVICES)"
        )
    if options.devices > 1 and device.type != "cuda":
        raise ConfigError(f"devices={options.devices} needs device=cuda; on cpu use "
                          "workers_per_device= for more workers")  # fmt: skip
    if options.precision is not None and plan.precision.startswith("16") and device.type == "cpu":
        raise ConfigError("precision=16 needs a GPU device; use precision=bf16 or 32 on CPU")
    _, height, width = plan.input_spec.input_size
    if not options.max_image_pixels >= height * width:
        raise ConfigError(
            f"max_image_pixels={options.max_image_pixels} is below the model's input of "
            f"{height}x{width} = {height * width} pixels; give at least that (default "
            f"{ServeOptions.max_image_pixels})"
        )
    slo = slo_setup(plan, options) if options.slo_ms is not None else None
    info = server_info(plan, options, slo)
    folder, _ = enable_multiprocess()  # `serve` made it already (and removes it at its end)
    guard = {"max_upload_mb": options.max_upload_mb, "metrics": ServeMetrics(),
             "board": slo.board if slo is not None else None}  # fmt: skip
    server = ls.LitServer(
        EarlyExitAPI(plan, options, slo),
        accelerator=device.type,
        devices=options.devices,  # cuda:0..devices-1 (choose them with CUDA_VISIBLE_DEVICES)
        workers_per_device=options.workers_per_device,
        timeout=options.timeout,
        model_metadata=info,
        middlewares=[(RequestGuard, guard)],
        callbacks=[EndResponseReader()],
    )
    server.app.add_route("/metrics", metrics_endpoint(folder), methods=["GET"])
    if slo is not None:
        read_changes(slo.changes, info["slo"])
    return server, info


def slo_setup(plan: Plan, options: DictConfig) -> SloSetup:
    """The controller's points (the run's calibrated budget curve) and settings."""
    scores = calibration_scores(options, plan.macs_per_exit, plan.exits)
    points = operating_points(scores, plan.macs_per_exit, options.accuracy_floor)
    workers = options.devices * options.workers_per_device
    config = ControlConfig(options.slo_ms, options.max_batch_size, workers=workers)
    changes = mp.get_context("spawn").Queue(maxsize=1000)
    return SloSetup(tuple(points), config, options.control_interval, options.guard_share,
                    LoadBoard(), changes)  # fmt: skip


SLO_CHANGES_KEPT = 50


def read_changes(changes: Any, slo_info: dict) -> None:
    """A thread that moves the workers' point changes into /info's "slo" (the last ones)."""

    def read() -> None:
        while True:
            try:
                record = changes.get(timeout=1.0)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):  # the queue is gone: the server stopped
                return
            slo_info["current"][str(record["worker"])] = record["point"]
            slo_info["changes"] = [*slo_info["changes"], record][-SLO_CHANGES_KEPT:]

    threading.Thread(target=read, name="met-slo-changes", daemon=True).start()


class EndResponseReader(ls.Callback if ls is not None else object):
    """At the server's end: wake the response queue's reader with a sentinel (else it waits 1 s)."""

    def on_server_end(self, *args: Any, litserver: Any = None, **kwargs: Any) -> None:
        if litserver is not None and getattr(litserver, "_transport", None) is not None:
            litserver._transport.close(send_sentinel=True)


def on_stop_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


class _Stopped(Exception):
    """A stop signal while the worker still loads the model."""


def run_server(server: Any, options: DictConfig) -> None:
    """Run `server` (from `build_server`) until SIGINT or SIGTERM, then drain and stop it all.

    Not LitServer.run: its shutdown closes the queues before uvicorn drains and leaves the workers
    running on SIGTERM. Here uvicorn drains first, then the idle worker is killed.
    """
    import uvicorn  # the [serve] extra
    from litserve.utils import configure_logging, is_package_installed

    configure_logging(options.log_level)
    # the multipart parser logs each malformed body it sees: RequestGuard answers them (400)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    uv: uvicorn.Server | None = None
    died: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        if uv is None:
            raise _Stopped
        uv.should_exit = True  # uvicorn's own handler takes over while it serves

    # the manager (forked) and the worker (spawned) inherit the ignored signals: they stop when
    # this process has drained, also when a signal goes to the whole group (Ctrl+C, systemd)
    on_stop_signals(signal.SIG_IGN)
    os.register_at_fork(after_in_child=die_with_parent)
    manager, workers = None, []
    try:
        # as litserve.utils.wrap_litserve_start and LitServer._start_server set a server up
        manager = server._init_manager(1)
        server.app.response_queue_id = 0
        for lit_api in server.litapi_connector:
            workers.extend(server.launch_inference_worker(lit_api))
        server.inference_workers = workers
        on_stop_signals(on_signal)
        server._prepare_app_run(server.app)
        if is_package_installed("mcp"):
            from litserve.mcp import _LitMCPServerConnector  # with the optional mcp package

            server.mcp_server = mcp = _LitMCPServerConnector()
            mcp.connect_mcp_server(server.litapi_connector.get_mcp_tools(), server.app)
        wait_until_ready(server, workers)
        config = uvicorn.Config(server.app, options.host, options.port, log_level=options.log_level,
                                timeout_graceful_shutdown=options.drain_timeout)  # fmt: skip
        uv = uvicorn.Server(config)
        watch_workers(workers, uv, died)
        uv.run()
    except _Stopped:
        pass
    finally:
        on_stop_signals(signal.SIG_IGN)  # stopping: the rest is quick, let it finish
        for worker in workers:  # drained: nothing in flight (LitServe too stops them with a kill)
            worker.kill()
            worker.join()
        if manager is not None:
            manager.shutdown()
        with contextlib.suppress(Exception):  # reap the tracker spawning started: no zombie
            resource_tracker._resource_tracker._stop()
    if died:
        raise RuntimeError(f"the inference worker died ({died[0]}); the server stopped")


def wait_until_ready(server: Any, workers: list) -> None:
    """Block until the worker has loaded the model (a stop signal interrupts)."""
    from litserve.utils import WorkerSetupStatus  # the [serve] extra

    while True:
        status = set(dict(server.workers_setup_status).values())
        if status == {WorkerSetupStatus.READY}:
            return
        if WorkerSetupStatus.ERROR in status or not all(w.is_alive() for w in workers):
            # its cause (a missing backbone file, a damaged checkpoint, ...) is in its log above
            raise MetError("the inference worker failed to load the model: see its error above")
        time.sleep(0.05)


def watch_workers(workers: list, uv: Any, died: list[str]) -> None:
    """A thread that stops the server if a worker dies while serving (nothing would answer)."""

    def watch() -> None:
        while not uv.should_exit:
            for worker in workers:
                if not worker.is_alive():
                    died.append(f"exit code {worker.exitcode}")
                    log.error("the inference worker died (exit code %s)", worker.exitcode)
                    uv.should_exit = True
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, name="met-watch-workers", daemon=True).start()


def serve(cfg: DictConfig) -> None:
    """Check everything, then run the server until SIGINT or SIGTERM (then drain, exit 0)."""
    cfg = serve_options(cfg)
    check_port_free(cfg.host, cfg.port)
    folder, made = enable_multiprocess()  # the metric files of every process of the server
    try:
        server, info = build_server(cfg)  # checks the rest of the config
        thresholds = ", ".join(map(str, info["thresholds"]))
        print(
            f"serving {cfg.checkpoint} on http://{cfg.host}:{cfg.port}{API_PATH} "
            f"(exits {info['exits']}, thresholds [{thresholds}])",
            flush=True,
        )
        run_server(server, cfg)
    finally:  # every worker has exited: remove the folder made here (never the user's)
        if made:
            shutil.rmtree(folder, ignore_errors=True)
            del os.environ[ENV]


_task = user_task(serve)


def main() -> None:
    """Console entry point (`met-serve`)."""
    hydra_app("serve", _task)
    # the server stopped cleanly and its processes are gone: exit 0 now, without the seconds
    # the interpreter takes to tear down torch, timm and Lightning
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
