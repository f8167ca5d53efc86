"""The early-exit engine: batched inference that really skips the blocks of images that left.

It runs a MultiExitViT stage by stage; after each exit block it scores the exit's head, lets the
confident images leave and compacts the batch, so the remaining blocks run on fewer images. An
image that leaves at exit k has cost exactly the MACs to exit k (`macs.exit_costs`).

Host syncs: one per early exit (how many leave, to size the compacted batch), none otherwise;
leaving rows are found with a stable argsort on the device, and an exit nobody reaches does not
run its head. `mode="graphs"` (CUDA) replays each stage from CUDA graphs captured per
power-of-two batch bucket, the survivors padded up to their bucket.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.confidence import check_confidence, confidence

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
    predictions: torch.Tensor  # [B] class index
    confidence: torch.Tensor  # [B] confidence of the exit that answered
    exit_index: torch.Tensor  # [B] 0-based exit that answered
    logits: torch.Tensor  # [B, C] logits of that exit


def check_thresholds(thresholds: Sequence[float], num_exits: int, key: str = "thresholds") -> list:
    """One threshold per exit (the last is ignored: everything left leaves there) or per early exit.

    Returns K floats with the last set to -inf.
    """
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
    """A Lightning precision string (32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true);
    None -> 32-true."""
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


def score_stage(net: torch.nn.Module, stage: int, state, kind: str):
    """Run stage `stage` of `net` on `state` -> (state, logits [B, C], confidence [B])."""
    state = net.run_stage(stage, state)
    logits = net.heads[stage](net.exit_features(stage, state))
    return state, logits, confidence(logits, kind)


class _StageGraphs:
    """Per (stage, bucket, dtype) CUDA graphs of `run_stage -> head -> confidence`."""

    def __init__(self, net: torch.nn.Module, kind: str) -> None:
        self.net = net
        self.kind = kind
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def _eager(self, stage: int, state):
        return score_stage(self.net, stage, state, self.kind)

    def _capture(self, stage: int, state, size: int) -> tuple:
        def buffer(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.new_zeros((size, *t.shape[1:]))

        static_in = type(state)(*(buffer(t) for t in state))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocations, kernel selection)
                self._eager(stage, static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self._eager(stage, static_in)
        return graph, static_in, static_out

    def __call__(self, stage: int, state):
        n = state.main.shape[0]
        size = bucket_size(n)
        key = (stage, size, state.main.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(stage, state, size)
        graph, static_in, (out_state, logits, conf) = self.graphs[key]
        for dst, src in zip(static_in, state, strict=True):
            if dst is not None:
                dst[:n].copy_(src)
        graph.replay()
        cut = type(out_state)(*(None if t is None else t[:n] for t in out_state))
        return cut, logits[:n], conf[:n]


class EarlyExitEngine:
    """Early-exit inference for a MultiExitViT with fixed thresholds on a confidence score.

    `thresholds`: K values (or K-1); an image leaves at the first exit k with
    `confidence_k >= thresholds[k]`. All +inf reproduces the last exit of the full forward, all
    -inf sends every image out at exit 1.
    `precision`: Lightning precision string the network runs in (default 32-true; use the one
    the logit store was made in, `LogitStore.precision`, so that calibration and prediction see
    the same numbers). `mode`: ``eager`` or ``graphs`` (CUDA graphs per stage and power-of-two
    batch bucket; CUDA only).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        thresholds: Sequence[float],
        kind: str = "max_softmax",
        precision: str | None = None,
        mode: str = "eager",
    ) -> None:
        self.net = net
        self.kind = check_confidence(kind)
        self.thresholds = check_thresholds(thresholds, net.num_exits)
        self.precision = check_precision(precision)
        self.mode = check_mode(mode, _device_of(net) if mode == "graphs" else None)
        # float64 so that a float32 confidence compares exactly as in `budget.simulate_exits`
        self._limits = torch.tensor(self.thresholds, dtype=torch.float64)
        self._limits_on: dict[torch.device, torch.Tensor] = {}
        self._graphs = _StageGraphs(net, self.kind) if self.mode == "graphs" else None

    def _stage(self, stage: int, state):
        """Run stage `stage` -> (state, logits [B, C], confidence [B])."""
        if self._graphs is not None:
            return self._graphs(stage, state)
        return score_stage(self.net, stage, state, self.kind)

    def limits(self, device: torch.device) -> torch.Tensor:
        if device not in self._limits_on:
            self._limits_on[device] = self._limits.to(device)
        return self._limits_on[device]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> EarlyExitResult:
        """images [B, C, H, W] -> the answer of each image's exit."""
        _, dtype = PRECISIONS[self.precision]
        context = precision_context(self.precision, images.device, self._graphs is None)
        with context:  # 32-true keeps the input's dtype (fp64 nets in tests)
            return self._run(images if dtype == torch.float32 else images.to(dtype))

    def _run(self, images: torch.Tensor) -> EarlyExitResult:
        net = self.net
        batch = images.shape[0]
        device = images.device
        limits = self.limits(device)
        last = net.num_exits - 1
        predictions = torch.empty(batch, dtype=torch.long, device=device)
        scores = torch.empty(batch, dtype=torch.float32, device=device)
        exit_index = torch.empty(batch, dtype=torch.long, device=device)
        logits_out: torch.Tensor | None = None

        def write(rows: torch.Tensor, logits: torch.Tensor, conf: torch.Tensor, k: int) -> None:
            predictions.index_copy_(0, rows, logits.argmax(dim=-1))
            scores.index_copy_(0, rows, conf.float())
            exit_index.index_fill_(0, rows, k)
            logits_out.index_copy_(0, rows, logits.to(logits_out.dtype))

        alive = torch.arange(batch, device=device)  # original positions of the rows of state
        state = net.embed(images)
        for stage in range(net.num_exits):
            state, logits, conf = self._stage(stage, state)
            if logits_out is None:
                logits_out = logits.new_empty(batch, logits.shape[-1])
            if stage == last:
                write(alive, logits, conf, stage)
                break
            leaving = conf.double() >= limits[stage]
            n_leave = int(leaving.sum())  # the one host sync of this exit
            if n_leave == 0:  # nobody leaves: nothing to write or compact
                state = net.leave(stage, state)
                continue
            order = torch.argsort((~leaving).to(torch.uint8), stable=True)  # leaving rows first
            out = order[:n_leave]
            write(alive.index_select(0, out), logits.index_select(0, out),
                  conf.index_select(0, out), stage)  # fmt: skip
            if n_leave == alive.shape[0]:  # everybody left: later blocks and heads never run
                break
            stay = order[n_leave:]
            alive = alive.index_select(0, stay)
            state = net.take(net.leave(stage, state), stay)
        return EarlyExitResult(predictions, scores, exit_index, logits_out)


def _device_of(net: torch.nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def warn_precision_mismatch(store_precision: str | None, precision: str) -> None:
    """Warn when the engine runs in another precision than the logit store was made in."""
    if store_precision is not None and check_precision(store_precision) != precision:
        warnings.warn(
            f"the thresholds were calibrated on logits made in precision {store_precision}, "
            f"but prediction runs in {precision}: confidences may differ slightly, so exits may "
            f"too (pass precision={store_precision} for parity)",
            stacklevel=2,
        )
