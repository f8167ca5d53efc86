"""The early-exit engine: batched inference that really skips the blocks of images that left.

It runs a MultiExitViT stage by stage; after each exit it lets the confident images leave and
compacts the batch, so an image that leaves at exit k costs exactly the MACs to exit k.
`early_exit` is the one early-exit loop: the engine, the ONNX Runtime runner and
`budget.simulate_exits` (over stored confidences) all run it. One host sync per early exit (how
many leave). `mode="graphs"` (CUDA) replays each stage from CUDA graphs per power-of-two bucket.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, check_confidence, confidence

ENGINE_MODES = ("eager", "graphs")
# Lightning precision strings -> (autocast dtype or None, dtype of the weights and inputs)
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
    "32-true": (None, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "bf16-true": (None, torch.bfloat16),
    "16-true": (None, torch.float16),
    "64-true": (None, torch.float64),
}
_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}


class EarlyExitResult(NamedTuple):
    """The engine's answers (torch tensors; numpy arrays from the ONNX runner)."""

    predictions: torch.Tensor  # [B] class index
    confidence: torch.Tensor  # [B] confidence of the exit that answered
    exit_index: torch.Tensor  # [B] 0-based exit that answered
    logits: torch.Tensor  # [B, C] logits of that exit


def check_thresholds(thresholds: Sequence[float], num_exits: int, key: str = "thresholds") -> list:
    """K floats, the last -inf, from one threshold per exit (the last ignored) or per early exit."""
    values = [float(t) for t in thresholds]
    if len(values) == num_exits - 1:
        values.append(-math.inf)
    if len(values) != num_exits:
        raise ConfigError(
            f"{key} has {len(values)} values, but the model has {num_exits} exits: give "
            f"{num_exits - 1} (one per early exit) or {num_exits} (the last is ignored)"
        )
    if any(math.isnan(t) for t in values):
        raise ConfigError(f"{key}={values} contains NaN")
    values[-1] = -math.inf
    return values


def check_precision(precision: str | int | None, key: str = "precision") -> str:
    """A Lightning precision string of `PRECISIONS` (aliases 32, bf16, 16, 64); None -> 32-true."""
    name = "32-true" if precision is None else str(precision)
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} must be one of {list(PRECISIONS)}")
    return name


def precision_context(
    precision: str, device: torch.device, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """The autocast context of a mixed precision (a no-op context for the -true ones)."""
    autocast_dtype, _ = PRECISIONS[check_precision(precision)]
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=cache_enabled)


def check_mode(mode: str, device: torch.device | None = None, key: str = "engine_mode") -> str:
    """`mode` if known and usable on `device` (graphs need CUDA), else a ConfigError."""
    if mode not in ENGINE_MODES:
        raise ConfigError(f"{key}={mode!r} must be one of {list(ENGINE_MODES)}")
    if mode == "graphs" and (device is None or device.type != "cuda"):
        raise ConfigError(
            f"{key}=graphs replays CUDA graphs and needs a CUDA device (got "
            f"{device.type if device is not None else 'none'}); use {key}=eager"
        )
    return mode


def bucket_size(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    """`fn` on each tensor of x (a tensor, None or a (named) tuple of them), structure kept."""
    if x is None or isinstance(x, torch.Tensor):
        return x if x is None else fn(x)
    parts = [_map(fn, part) for part in x]
    return type(x)(*parts) if hasattr(x, "_fields") else type(x)(parts)


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of x, in the order `_map` visits them."""
    if x is None or isinstance(x, torch.Tensor):
        return [] if x is None else [x]
    return [t for part in x for t in _tensors(part)]


def take(x: Any, rows: torch.Tensor) -> Any:
    """The batch rows `rows` (long [B']) of x (a tensor or a (named) tuple of them), in order."""
    return _map(lambda t: t.index_select(0, rows), x)


def answer(logits: torch.Tensor, kind: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An exit's confidence [B] and answers (class [B], confidence [B] float32, logits [B, C])."""
    conf = confidence(logits, kind)
    return conf, (logits.argmax(dim=-1), conf.float(), logits)


def early_exit(stage: Callable, x: Any, limits: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The early-exit loop: -> (0-based exit of every row [B], each answer [B, ...] there).

    `stage(k, x)` runs exit stage k on the rows still there (x: a tensor or a (named) tuple of
    them, batch first) -> (x for stage k+1, confidence [B'], answers: tensors [B', ...]). A row
    leaves at the first exit k whose confidence reaches `limits[k]` (float64 [K]: every runner
    decides alike), or at the last exit.
    """
    first = _tensors(x)[0]
    batch, device = first.shape[0], first.device
    exit_index = torch.empty(batch, dtype=torch.long, device=device)
    answers: list[torch.Tensor] = []
    alive = torch.arange(batch, device=device)  # the original row of each row of x
    last = len(limits) - 1

    def write(k: int, rows: torch.Tensor, values, picked: torch.Tensor | None = None) -> None:
        exit_index.index_fill_(0, rows, k)
        for out, value in zip(answers, values, strict=True):
            value = value if picked is None else value.index_select(0, picked)
            out.index_copy_(0, rows, value.to(out.dtype))

    for k in range(last + 1):
        x, conf, values = stage(k, x)
        if k == 0:
            answers = [value.new_empty((batch, *value.shape[1:])) for value in values]
        if k == last:  # everybody still there answers here
            write(k, alive, values)
            break
        leaving = conf.double() >= limits[k]
        n_leave = int(leaving.sum())  # the one host sync of this exit
        if n_leave == 0:  # nobody leaves: nothing to write or compact
            continue
        order = torch.argsort((~leaving).to(torch.uint8), stable=True)  # leaving rows first
        write(k, alive.index_select(0, order[:n_leave]), values, order[:n_leave])
        if n_leave == alive.shape[0]:  # everybody left: later stages never run
            break
        stay = order[n_leave:]
        alive = alive.index_select(0, stay)
        x = take(x, stay)
    return exit_index, answers


class _StageGraphs:
    """A stage of `early_exit` replayed from CUDA graphs per (stage, power-of-two bucket, dtype):
    the rows are copied into the bucket's static inputs, the rest is padding."""

    def __init__(self, stage: Callable) -> None:
        self.stage = stage
        self.graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph

    def _capture(self, k: int, x: Any, size: int) -> tuple:
        static_in = _map(lambda t: t.new_zeros((size, *t.shape[1:])), x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocations, kernel selection)
                self.stage(k, static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.stage(k, static_in)
        return graph, static_in, static_out

    def __call__(self, k: int, x: Any):
        first = _tensors(x)[0]
        n, key = first.shape[0], (k, bucket_size(first.shape[0]), first.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(k, x, key[1])
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(_tensors(static_in), _tensors(x), strict=True):
            dst[:n].copy_(src)
        graph.replay()
        return _map(lambda t: t[:n], static_out)


class EarlyExitEngine:
    """Early-exit inference for a MultiExitViT with fixed thresholds on a confidence score.

    `thresholds`: K values (or K-1); an image leaves at the first exit k with `confidence_k >=
    thresholds[k]` (all +inf: the full forward). `precision`: the network's (use the logit
    store's, so calibration and prediction see the same numbers). `mode`: eager or graphs (CUDA).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        thresholds: Sequence[float],
        kind: str = DEFAULT_CONFIDENCE,
        precision: str | None = None,
        mode: str = "eager",
    ) -> None:
        self.net = net
        self.kind = check_confidence(kind)
        self.thresholds = check_thresholds(thresholds, net.num_exits)
        self.precision = check_precision(precision)
        self.mode = check_mode(mode, next(net.parameters(), torch.empty(0)).device)
        self._limits: dict[torch.device, torch.Tensor] = {}  # float64 [K] per device
        self._stage = _StageGraphs(self._scored) if self.mode == "graphs" else self._scored

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Serve with other thresholds from the next batch on (CUDA graphs are kept: the
        thresholds are applied outside them)."""
        self.thresholds = check_thresholds(thresholds, self.net.num_exits)
        self._limits = {}

    def _scored(self, k: int, x: Any):  # a stage of `early_exit`
        after, _, logits = self.net.stage(k, x)
        return after, *answer(logits, self.kind)

    def limits(self, device: torch.device) -> torch.Tensor:
        if device not in self._limits:
            self._limits[device] = torch.tensor(self.thresholds, dtype=torch.float64, device=device)
        return self._limits[device]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> EarlyExitResult:
        """images [B, C, H, W] -> the answer of each image's exit."""
        _, dtype = PRECISIONS[self.precision]
        context = precision_context(self.precision, images.device, self.mode != "graphs")
        with context:  # 32-true keeps the input's dtype (fp64 nets in tests)
            images = images if dtype == torch.float32 else images.to(dtype)
            limits = self.limits(images.device)
            exit_index, (predictions, scores, logits) = early_exit(self._stage, images, limits)
        return EarlyExitResult(predictions, scores, exit_index, logits)
