"""Serve a trained MET model over HTTP with LitServe: early exit inside dynamic batches.

    python -m met_lightning.serve checkpoint=RUN budget=0.5 host=127.0.0.1 port=8000

`POST /predict` takes one image per request: a multipart upload (field `file`) or JSON
`{"image": "<base64 of the image file>"}`; it answers `{class, class_name, confidence, exit,
block, macs}` (the row `python -m met_lightning.predict` gives for the same file) and
`batch_size`, the number of requests served in the same batch. LitServe
gathers concurrent requests into batches (`max_batch_size`, `batch_timeout`) and the early-exit
engine drops the images that leave after each exit, so a batch costs what its images' exits cost.

A bad request fails alone: an undecodable image (400), a missing field (422), a wrong content type
(415) or an oversize upload (413) gets its own status and reason while the other requests of its
batch are answered (decode_request marks the bad item, predict runs the good ones, encode_response
returns the error response for the bad one). `GET /health` is LitServe's; `GET /info` carries the
model, exits, thresholds, MACs per exit and budget (LitServe's `model_metadata`).
"""

import base64
import binascii
import io
import json
import logging
import signal
import socket
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from met_lightning.cli import hydra_app, user_task
from met_lightning.config import _typed
from met_lightning.data.images import decode_image
from met_lightning.errors import ConfigError
from met_lightning.inference.analysis import finite
from met_lightning.inference.confidence import check_confidence
from met_lightning.inference.engine import check_precision
from met_lightning.inference.session import Session, check_session_options, open_session

try:  # the [serve] extra
    import litserve as ls
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse, Response
except ImportError:  # pragma: no cover - reported by `check_installed`
    ls = None

log = logging.getLogger(__name__)

API_PATH = "/predict"
ACCEPTED = ("multipart/form-data", "application/json")
USAGE = (
    "send multipart/form-data with the image file in field 'file' "
    '(curl -F file=@image.png URL) or application/json {"image": "<base64 of the file>"}'
)


@dataclass
class ServeSchema:
    checkpoint: str = "???"
    budget: float | None = None
    thresholds: list[float] | None = None
    confidence: str = "max_softmax"
    store: str | None = None
    weights_file: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    batch_timeout: float = 0.005
    device: str = "auto"
    precision: str | None = None
    engine_mode: str = "eager"
    max_upload_mb: float = 10.0
    timeout: float = 30.0
    log_level: str = "warning"


def check_installed() -> None:
    if ls is None:
        raise ConfigError("serving needs LitServe: pip install 'met_lightning[serve]'")


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Rejected:
    """A request that cannot be answered: its HTTP status and the reason."""

    status: int
    reason: str


def request_image(request: Any) -> bytes | Rejected:
    """The image file bytes of a request: JSON (a dict) or a multipart form."""
    if isinstance(request, dict):
        value = request.get("image")
        if value is None:
            return Rejected(422, f"missing field 'image' in the JSON body; {USAGE}")
        if not isinstance(value, str):
            return Rejected(422, "field 'image' must be a base64 string of an image file")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            return Rejected(400, f"field 'image' is not valid base64: {err}")
    upload = request.get("file") if hasattr(request, "get") else None
    if upload is None:
        return Rejected(422, f"missing field 'file' in the multipart form; {USAGE}")
    if isinstance(upload, str):
        return Rejected(422, "field 'file' must be a file upload (curl -F file=@image.png)")
    return upload.file.read()


def decode(request: Any, session: Session) -> torch.Tensor | Rejected:
    """A request as the model's input [C, H, W] (predict's decoding and eval transform)."""
    data = request_image(request)
    if isinstance(data, Rejected):
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            picture = decode_image(image, session.spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return Rejected(400, f"cannot decode the image: {type(err).__name__}: {err}")
    return session.transform(picture)


class RequestGuard:
    """ASGI middleware for `POST /predict`: a wrong content type (415), a body over
    `max_upload_mb` (413) or malformed JSON (400) is answered here with the reason, before
    LitServe sees it."""

    def __init__(self, app: Any, max_upload_mb: float, path: str = API_PATH) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 2**20)
        self.path = path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ACCEPTED:
            shown = media or "none"
            await self.reject(415, f"Content-Type {shown} is not accepted; {USAGE}", scope, send)
            return
        limit = f"the limit is max_upload_mb={self.max_upload_mb:g}"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(413, f"request body of {declared} bytes is too large; {limit}",
                              scope, send)  # fmt: skip
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.reject(413, f"request body over {self.max_bytes} bytes; {limit}",
                                  scope, send)  # fmt: skip
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if media == "application/json":
            try:
                parsed = json.loads(body)
            except ValueError as err:
                await self.reject(400, f"the body is not valid JSON: {err}", scope, send)
                return
            if not isinstance(parsed, dict):
                await self.reject(422, f"the JSON body must be an object; {USAGE}", scope, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def reject(status: int, reason: str, scope: dict, send: Any) -> None:
        async def nothing() -> dict:
            return {"type": "http.disconnect"}

        await JSONResponse({"detail": reason}, status_code=status)(scope, nothing, send)


# ---------------------------------------------------------------------- the API
class EarlyExitAPI(ls.LitAPI if ls is not None else object):
    """LitServe API: decode each request, run the early-exit engine on the batch's good images."""

    def __init__(
        self,
        cfg: dict,
        thresholds: list[float],
        max_batch_size: int = 64,
        batch_timeout: float = 0.005,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.cfg = cfg  # plain dict: the API is pickled into LitServe's worker process
        self.thresholds = list(thresholds)

    def setup(self, device: str) -> None:
        # runs in LitServe's worker process: Ctrl+C is for the main process, which stops the
        # workers itself (otherwise every worker prints a KeyboardInterrupt traceback)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cfg = OmegaConf.create(self.cfg)
        self.session = open_session(cfg, torch.device(device), self.thresholds)

    def decode_request(self, request):  # noqa: ANN001 - unannotated: LitServe passes the parsed body
        return decode(request, self.session)

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
            images = torch.stack([items[i] for i in good])
            images = images.to(self.session.device)  # the engine applies the precision
            rows = self.session.rows(self.session.engine(images))
            for i, row in zip(good, rows, strict=True):
                outputs[i] = {**row, "batch_size": len(items)}
        return outputs[0] if single else outputs

    def encode_response(self, output: Any) -> Response:
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.reason}, status_code=output.status)
        return JSONResponse(output)


# ---------------------------------------------------------------------- server
def server_info(session: Session, cfg: DictConfig) -> dict[str, Any]:
    """What `GET /info` reports under "model"."""
    config = session.config
    return {
        "checkpoint": str(cfg.checkpoint),
        "backbone": config.get("backbone", {}).get("name"),
        "num_classes": session.net.num_classes,
        "class_names": session.class_names,
        "exits": list(session.net.exits),
        "thresholds": [finite(t) for t in session.thresholds],
        "how": session.how,
        "confidence": cfg.confidence,
        "macs_per_exit": list(session.costs.to_exit),
        "budget": cfg.budget,
        "input_size": list(session.spec.input_size),
        "max_batch_size": cfg.max_batch_size,
        "batch_timeout": cfg.batch_timeout,
        "precision": session.precision,
        "macs": "multiply-accumulates per image",
    }


def check_serve_config(cfg: DictConfig) -> None:
    """Everything a user can get wrong, before a network is built."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("give checkpoint=RUN_FOLDER_OR_FILE")
    if cfg.max_batch_size <= 0:
        raise ConfigError(f"max_batch_size={cfg.max_batch_size} must be a positive integer")
    if not cfg.batch_timeout >= 0:
        raise ConfigError(f"batch_timeout={cfg.batch_timeout} must be >= 0 seconds")
    if not cfg.max_upload_mb > 0:
        raise ConfigError(f"max_upload_mb={cfg.max_upload_mb} must be > 0")
    if not cfg.timeout > 0:
        raise ConfigError(f"timeout={cfg.timeout} must be > 0 seconds")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port={cfg.port} must be in 1..65535")
    if cfg.precision is not None:
        check_precision(cfg.precision)
    check_confidence(cfg.confidence)


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


def build_server(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """(LitServer, /info model dict): checks the config, loads the model once to choose the
    thresholds (the worker process loads it again on its device)."""
    check_installed()
    cfg = _typed(OmegaConf.create({"serve": cfg}), "serve", ServeSchema)
    check_serve_config(cfg)
    device = check_session_options(cfg)  # checkpoint, thresholds, precision, device, mode
    if device.type not in ("cpu", "cuda") or (device.index or 0) != 0:
        raise ConfigError(
            f"device={cfg.device}: serve runs on cpu or cuda (the first visible GPU; choose it "
            "with CUDA_VISIBLE_DEVICES)"
        )
    if (
        cfg.precision is not None
        and check_precision(cfg.precision).startswith("16")
        and (device.type == "cpu")
    ):
        raise ConfigError("precision=16 needs a GPU device; use precision=bf16 or 32 on CPU")
    # the worker process opens its own session on `device`; this one only answers /info
    session = open_session(OmegaConf.merge(cfg, {"engine_mode": "eager"}), torch.device("cpu"))
    info = server_info(session, cfg)
    thresholds = session.thresholds
    del session
    api = EarlyExitAPI(
        OmegaConf.to_container(cfg), thresholds, cfg.max_batch_size, cfg.batch_timeout
    )
    server = ls.LitServer(
        api,
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,  # LitServe's first GPU for cuda (pick one with CUDA_VISIBLE_DEVICES)
        timeout=cfg.timeout,
        model_metadata=info,
        middlewares=[(RequestGuard, {"max_upload_mb": cfg.max_upload_mb})],
    )
    return server, info


def serve(cfg: DictConfig) -> None:
    """Check everything, then run the server until interrupted."""
    cfg = _typed(OmegaConf.create({"serve": cfg}), "serve", ServeSchema)
    check_port_free(cfg.host, cfg.port)
    server, info = build_server(cfg)  # checks the rest of the config
    thresholds = ", ".join(map(str, info["thresholds"]))
    print(
        f"serving {cfg.checkpoint} on http://{cfg.host}:{cfg.port}{API_PATH} "
        f"(exits {info['exits']}, thresholds [{thresholds}])",
        flush=True,
    )
    server.run(
        host=cfg.host,
        port=cfg.port,
        num_api_servers=1,
        log_level=cfg.log_level,
        generate_client_file=False,
    )


_task = user_task(serve)


def main() -> None:
    """Console entry point (`met-serve`)."""
    hydra_app("serve", _task)


if __name__ == "__main__":
    main()
