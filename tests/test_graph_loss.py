"""Graph regularization: ~1 for random features/labels, ~0 for clustered ones, edge cases."""

import torch

from met_lightning.losses.multi_exit import (
    GraphRegularizer,
    MultiExitLoss,
    graph_energy_ratio,
    label_affinity,
)


def label_graph_loss(features, labels):
    return graph_energy_ratio(features, label_affinity(labels))


def test_random_features_random_labels_near_one():
    torch.manual_seed(0)
    features, labels = torch.randn(512, 64), torch.randint(0, 10, (512,))
    assert abs(label_graph_loss(features, labels).item() - 1.0) < 0.05


def test_clustered_features_near_zero():
    torch.manual_seed(0)
    labels = torch.arange(256) % 8
    centers = torch.randn(8, 64) * 10
    features = centers[labels] + 0.01 * torch.randn(256, 64)
    assert label_graph_loss(features, labels).item() < 0.01


def test_zero_without_same_class_pairs():
    features = torch.randn(6, 8, requires_grad=True)
    loss = label_graph_loss(features, torch.arange(6))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable (zero gradient)
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_gradients_finite_even_for_duplicate_features():
    features = torch.randn(8, 16)
    features[1] = features[0]  # zero distance: sqrt-free formula keeps gradients finite
    features.requires_grad_(True)
    loss = label_graph_loss(features, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


def test_scale_free():
    features, labels = torch.randn(32, 8), torch.arange(32) % 4
    torch.testing.assert_close(
        label_graph_loss(features, labels), label_graph_loss(features * 100, labels)
    )


def test_teacher_graph_follows_teacher_neighbours():
    torch.manual_seed(0)
    groups = torch.arange(64) % 4
    teacher = torch.randn(4, 32)[groups] + 0.01 * torch.randn(64, 32)
    reg = GraphRegularizer("teacher", teacher_knn=3)
    edges = reg.edges(labels=torch.zeros(64, dtype=torch.long), teacher=teacher)
    assert edges.equal(edges.T) and not edges.diagonal().any()
    assert (groups[:, None] == groups[None, :])[edges].all()  # neighbours share the teacher group
    clustered = torch.randn(4, 16)[groups] * 5 + 0.01 * torch.randn(64, 16)
    assert reg(clustered, edges).item() < 0.01
    assert abs(reg(torch.randn(64, 16), edges).item() - 1.0) < 0.2


def test_multi_exit_loss_combines_parts():
    torch.manual_seed(0)
    logits, features = torch.randn(16, 3, 5), torch.randn(16, 3, 8)
    labels = torch.arange(16) % 5
    plain = MultiExitLoss(3, graph_weight=0.0)(logits, features, labels)
    ce = sum(torch.nn.functional.cross_entropy(logits[:, k], labels) for k in range(3))
    torch.testing.assert_close(plain.total, ce)
    assert plain.graph.tolist() == [0.0, 0.0]

    weighted = MultiExitLoss(3, exit_weights=[0.5, 1, 2], graph_weight=0.3)(
        logits, features, labels
    )
    expected = (torch.tensor([0.5, 1, 2]) * weighted.ce).sum() + 0.3 * weighted.graph.sum()
    torch.testing.assert_close(weighted.total, expected)
    assert weighted.graph.shape == (2,) and (weighted.graph > 0).all()
