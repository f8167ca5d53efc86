"""The MET training objective: weighted per-exit cross-entropy + graph regularization of the
early-exit features (a scale-free Laplacian-energy ratio)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from met_lightning.errors import ConfigError
from met_lightning.structured import target_config

GRAPH_KINDS = ("label", "teacher")


def pairwise_sq_dist(features: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, B] between the L2-normalized rows of features [B, d]."""
    f = F.normalize(features, dim=-1)
    return (2.0 - 2.0 * f @ f.T).clamp_min(0.0)


def label_affinity(labels: torch.Tensor) -> torch.Tensor:
    """Edges [B, B] (bool) between different samples with the same label."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


def graph_energy_ratio(
    features: torch.Tensor, edges: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Mean squared distance over `edges` / (mean over all pairs i != j + eps): 1 when edges are
    no closer than random pairs, towards 0 when tight; 0 without edges."""
    n = features.shape[0]
    if n < 2:
        return features.float().sum() * 0.0  # stays in the graph: zero gradient, not a missing one
    with torch.autocast(device_type=features.device.type, enabled=False):
        # fp32: in bf16, `f @ f.T` rounds a tight class's distances of ~1e-3 to exactly 0
        dist = pairwise_sq_dist(features.float())
        num_edges = edges.sum()
        # no `if not edges.any()` and no `dist[off_diag]`: a data-dependent branch or boolean
        # indexing would sync with the GPU every step: masked sums instead
        off_diag = 1.0 - torch.eye(n, dtype=dist.dtype, device=dist.device)
        within = (dist * edges).sum() / num_edges.clamp_min(1)
        total = (dist * off_diag).sum() / (n * (n - 1))
        return torch.where(num_edges > 0, within / (total + eps), within * 0.0)


class GraphRegularizer(torch.nn.Module):
    """`G_k` of one early exit: label graph, or k-NN graph of the last exit's (teacher) features."""

    def __init__(self, kind: str = "label", teacher_knn: int = 4) -> None:
        super().__init__()
        self.kind = kind  # checked by `multi_exit.check_loss`
        self.teacher_knn = int(teacher_knn)

    def edges(self, labels: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """The batch graph [B, B] (bool) shared by all early exits: `label_affinity`, or the
        symmetric `teacher_knn` nearest neighbours by cosine similarity of teacher [B, d]."""
        if self.kind == "label":
            return label_affinity(labels)
        if teacher is None:
            raise ValueError("graph=teacher needs the last exit's features")
        n = teacher.shape[0]
        k = min(self.teacher_knn, n - 1)
        edges = torch.zeros(n, n, dtype=torch.bool, device=teacher.device)
        if k <= 0:
            return edges
        t = F.normalize(teacher.detach(), dim=-1)
        sim = t @ t.T
        sim.fill_diagonal_(float("-inf"))
        edges.scatter_(1, sim.topk(k, dim=1).indices, True)
        return edges | edges.T

    def forward(self, features: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return graph_energy_ratio(features, edges)


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
