"""Trainable parameter counts equal the spec's formula; adapters start as the identity."""

import pytest
import torch

from met_lightning.models.adapters import EAdapter
from met_lightning.models.multi_exit_vit import MultiExitViT
from met_lightning.training.module import count_parameters
from tests.helpers import TINY_KWARGS, tiny_backbone


def spec_formula(d, depth, r, exits, num_classes, sites, exit_specific):
    """Spec: per site 2dr + r + d + K r (one gamma if not exit-specific); per exit LN + linear."""
    k = len(exits)
    gammas = k if exit_specific else 1
    adapters = len(sites) * depth * (2 * d * r + r + d + gammas * r)
    heads = k * (2 * d + d * num_classes + num_classes)
    return adapters + heads


@pytest.mark.parametrize(
    "rank, exits, sites, exit_specific, separate_cls",
    [
        (8, [1, 2, 3, 4], ["attn", "mlp"], True, True),
        (4, [2, 4], ["attn", "mlp"], True, True),
        (2, [1, 3, 4], ["mlp"], True, True),
        (8, [2, 4], ["attn"], False, True),
        (16, [2, 4], ["attn", "mlp"], False, False),
        (8, [4], [], False, False),
    ],
)
def test_trainable_count_matches_formula(rank, exits, sites, exit_specific, separate_cls):
    net = MultiExitViT(
        tiny_backbone(),
        7,
        exits,
        adapter=dict(
            rank=rank, exit_specific=exit_specific, separate_cls=separate_cls, sites=sites
        ),
    )
    trainable, total = count_parameters(net)
    d, depth = TINY_KWARGS["embed_dim"], TINY_KWARGS["depth"]
    assert trainable == spec_formula(d, depth, rank, exits, 7, sites, exit_specific)
    backbone_params = sum(p.numel() for p in net.backbone.parameters())
    assert total == trainable + backbone_params
    assert not any(p.requires_grad for p in net.backbone.parameters())


def test_e_adapter_is_identity_at_init_and_scales_per_exit():
    adapter = EAdapter(dim=16, rank=4, num_gammas=3)
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x, torch.tensor([0, 1, 2, 2, 2])), x)
    torch.nn.init.normal_(adapter.up.weight)
    with torch.no_grad():
        adapter.gamma[0] = 0.0  # exit 0's tokens get no adapter update
    out = adapter(x, torch.tensor([0, 1, 2, 2, 2]))
    assert torch.allclose(out[:, 0], x[:, 0] + adapter.up.bias)
    assert not torch.allclose(out[:, 1], x[:, 1])
