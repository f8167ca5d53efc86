"""The MET training objective: weighted per-exit cross-entropy + graph regularization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from met_lightning.errors import ConfigError
from met_lightning.losses.graph import GRAPH_KINDS, GraphRegularizer
from met_lightning.structured import target_config


@dataclass
class LossParts:
    total: torch.Tensor  # scalar
    ce: torch.Tensor  # [K] cross-entropy of each exit
    graph: torch.Tensor  # [K-1] G_k of each early exit (zeros when off)


def check_loss(
    num_exits: int,
    exit_weights: Sequence[float] | None,
    graph: str,
    graph_weight: float,
    teacher_knn: int,
    label_smoothing: float,
) -> None:
    """ConfigError naming the `model.loss` key of an impossible value."""
    if graph not in GRAPH_KINDS:
        raise ConfigError(f"model.loss.graph={graph!r} must be one of {list(GRAPH_KINDS)}")
    if not graph_weight >= 0:
        raise ConfigError(f"model.loss.graph_weight={graph_weight} must be >= 0 (0 turns it off)")
    if teacher_knn < 1:
        raise ConfigError(f"model.loss.teacher_knn={teacher_knn} must be >= 1")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"model.loss.label_smoothing={label_smoothing} must be in [0, 1)")
    if exit_weights is None:
        return
    weights = list(exit_weights)
    if len(weights) != num_exits:
        raise ConfigError(
            f"model.loss.exit_weights has {len(weights)} values for {num_exits} exits "
            "(model.net.exits); give one weight per exit or null"
        )
    if not (all(w >= 0 for w in weights) and sum(weights) > 0):
        raise ConfigError(f"model.loss.exit_weights={weights} must be >= 0 and not all 0")


class MultiExitLoss(nn.Module):
    """`L = sum_k w_k CE(head_k, y) + lambda * sum_{k<K} G_k`."""

    def __init__(
        self,
        num_exits: int,
        exit_weights: Sequence[float] | None = None,
        graph: str = "label",
        graph_weight: float = 0.1,
        teacher_knn: int = 4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_loss(num_exits, exit_weights, graph, graph_weight, teacher_knn, label_smoothing)
        weights = [1.0] * num_exits if exit_weights is None else [float(w) for w in exit_weights]
        self.register_buffer("exit_weights", torch.tensor(weights), persistent=False)
        self.graph_weight = float(graph_weight)
        self.graph = GraphRegularizer(graph, teacher_knn)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
    ) -> LossParts:
        """logits [B, K, C], features [B, K, d] (head inputs), labels [B]. In fp32 outside
        autocast whatever the network's precision (bf16 would round the graph term of a tight
        class to 0 and coarsen the reductions)."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, features = logits.float(), features.float()
            num_exits = logits.shape[1]
            ls, per_exit = self.label_smoothing, logits.unbind(1)
            ce = torch.stack([F.cross_entropy(z, labels, label_smoothing=ls) for z in per_exit])
            total = (self.exit_weights.to(ce.dtype) * ce).sum()
            graph = ce.new_zeros(num_exits - 1)
            if self.graph_weight > 0 and num_exits > 1:
                edges = self.graph.edges(labels, features[:, -1])
                graph = torch.stack([self.graph(f, edges) for f in features.unbind(1)[:-1]])
                total = total + self.graph_weight * graph.sum()
            return LossParts(total=total, ce=ce.detach(), graph=graph.detach())


# model.loss: MultiExitLoss's arguments and defaults; train() adds the number of exits
LossConfig = target_config(MultiExitLoss, partial=True, skip=("num_exits",))
