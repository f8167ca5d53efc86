"""Issue 12, item 4: the loss and the graph regularizer run in fp32 outside autocast."""

from __future__ import annotations

import torch

from met_lightning.losses.multi_exit import (
    MultiExitLoss,
    graph_energy_ratio,
    label_affinity,
    pairwise_sq_dist,
)
from tests.helpers import TINY_OVERRIDES, run_folder, run_task


def tight_features(
    n: int = 8, d: int = 64, spread: float = 3e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes whose members differ by `spread`-sized noise around two random centres:
    G (within-class / all-pairs distance ratio) of about 1e-3... 1e-5."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    centres = torch.randn(2, d, generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def test_tight_class_graph_term_survives_bf16_autocast():
    features, labels = tight_features()
    edges = label_affinity(labels)
    reference = graph_energy_ratio(features.double(), edges).item()
    assert 1e-6 < reference < 1e-2  # the case of the issue: a tight class
    # the premise: the same distances inside bf16 autocast round the within-class ones to 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = pairwise_sq_dist(features)
        assert rounded.dtype == torch.bfloat16
        assert (rounded * edges).sum() == 0

    logits = torch.randn(8, 2, 5, requires_grad=True)
    feats = torch.stack([features, features], dim=1).requires_grad_(True)  # [B, K=2, d]
    loss = MultiExitLoss(num_exits=2, graph_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = loss(logits, feats.bfloat16(), labels)  # a bf16 network's head inputs
    assert parts.total.dtype == parts.graph.dtype == torch.float32
    g = parts.graph[0].item()
    assert g > 0
    # bf16 inputs carry ~3 significant digits: the ratio keeps its order of magnitude
    assert 0.2 * reference < g < 5 * reference, (g, reference)
    parts.total.backward()
    assert feats.grad[:, 0].abs().sum() > 0  # the early exit's features get a gradient


def test_loss_is_fp32_and_equals_the_fp32_loss_for_fp32_inputs():
    features, labels = tight_features()
    logits = torch.randn(8, 2, 5)
    feats = torch.stack([features, features], dim=1)
    loss = MultiExitLoss(num_exits=2, graph_weight=0.5)
    plain = loss(logits, feats, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(logits, feats, labels)
    torch.testing.assert_close(auto.total, plain.total, rtol=0, atol=0)
    torch.testing.assert_close(auto.graph, plain.graph, rtol=0, atol=0)


def test_cpu_bf16_mixed_training_run(tmp_path):
    """A short (in-process) run of the tiny config with trainer.precision=bf16-mixed on the CPU."""
    result = run_task(
        ["debug=fast", *TINY_OVERRIDES, "trainer.precision=bf16-mixed", "logger=csv"],
        tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_folder(tmp_path)
    rows = (folder / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/loss_epoch")
    values = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert values and all(0 < v < 100 for v in values)
    assert (folder / "trainable.safetensors").is_file()
