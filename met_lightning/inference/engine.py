"""The early-exit engine: batched inference that really skips the blocks of images that left.

It runs a MultiExitViT stage by stage; after each exit block it scores the exit's head, lets the
confident images leave and compacts the batch, so the remaining blocks run on fewer images. An
image that leaves at exit k has cost exactly the MACs to exit k (`macs.exit_costs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.confidence import check_confidence, confidence


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


class EarlyExitEngine:
    """Early-exit inference for a MultiExitViT with fixed thresholds on a confidence score.

    `thresholds`: K values (or K-1); an image leaves at the first exit k with
    `confidence_k >= thresholds[k]`. All +inf reproduces the last exit of the full forward, all
    -inf sends every image out at exit 1.
    """

    def __init__(
        self, net: torch.nn.Module, thresholds: Sequence[float], kind: str = "max_softmax"
    ) -> None:
        self.net = net
        self.kind = check_confidence(kind)
        self.thresholds = check_thresholds(thresholds, net.num_exits)
        # float64 so that a float32 confidence compares exactly as in `budget.simulate_exits`
        self._limits = torch.tensor(self.thresholds, dtype=torch.float64)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> EarlyExitResult:
        net = self.net
        batch = images.shape[0]
        device = images.device
        limits = self._limits.to(device)
        last = net.num_exits - 1
        predictions = torch.empty(batch, dtype=torch.long, device=device)
        scores = torch.empty(batch, dtype=torch.float32, device=device)
        exit_index = torch.empty(batch, dtype=torch.long, device=device)
        logits_out: torch.Tensor | None = None

        alive = torch.arange(batch, device=device)  # original positions of the rows of x
        x = net.embed(images)
        for stage in range(net.num_exits):
            x = net.run_stage(stage, x)
            logits = net.heads[stage](net.exit_features(stage, x))
            conf = confidence(logits, self.kind)
            if logits_out is None:
                logits_out = logits.new_empty(batch, logits.shape[-1])
            if stage == last:
                leaving = None
            else:
                leaving = conf.double() >= limits[stage]
                if not bool(leaving.any()):  # nobody leaves: nothing to write or compact
                    x = net.leave(stage, x)
                    continue
            rows = alive if leaving is None else alive[leaving]
            chosen_logits = logits if leaving is None else logits[leaving]
            predictions[rows] = chosen_logits.argmax(dim=-1)
            scores[rows] = (conf if leaving is None else conf[leaving]).float()
            exit_index[rows] = stage
            logits_out[rows] = chosen_logits
            if leaving is None:
                break
            staying = ~leaving
            alive = alive[staying]
            if alive.numel() == 0:
                break
            x = net.leave(stage, x[staying])
        return EarlyExitResult(predictions, scores, exit_index, logits_out)
