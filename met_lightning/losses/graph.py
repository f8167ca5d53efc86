"""Graph regularization of the early-exit features (scale-free Laplacian-energy ratio)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAPH_KINDS = ("label", "teacher")


def pairwise_sq_dist(features: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, B] between the L2-normalized rows of features [B, d]."""
    f = F.normalize(features, dim=-1)
    return (2.0 - 2.0 * f @ f.T).clamp_min(0.0)


def label_affinity(labels: torch.Tensor) -> torch.Tensor:
    """Edges [B, B] (bool) between different samples with the same label."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


def knn_affinity(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric k-nearest-neighbour edges [B, B] (bool) by cosine similarity of teacher [B, d]."""
    n = teacher.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return torch.zeros(n, n, dtype=torch.bool, device=teacher.device)
    t = F.normalize(teacher.detach(), dim=-1)
    sim = t @ t.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.topk(k, dim=1).indices
    edges = torch.zeros(n, n, dtype=torch.bool, device=teacher.device)
    edges.scatter_(1, nearest, True)
    return edges | edges.T


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
        """The batch graph [B, B] shared by all early exits."""
        if self.kind == "label":
            return label_affinity(labels)
        if teacher is None:
            raise ValueError("graph=teacher needs the last exit's features")
        return knn_affinity(teacher, self.teacher_knn)

    def forward(self, features: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return graph_energy_ratio(features, edges)
