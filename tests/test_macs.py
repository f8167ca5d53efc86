"""Analytic MACs: the ViT-B/16 reference figure and agreement with torch's FLOP counter."""

import pytest
import torch

from met_lightning.macs import exit_costs, format_macs, model_exit_costs
from met_lightning.models.backbone import describe_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT
from tests.helpers import counted_macs, tiny_backbone


def test_vit_base_reference():
    spec = describe_backbone("vit_base_patch16_224")
    costs = exit_costs(spec, [3, 6, 9, 12], num_classes=100, adapter_rank=8, num_sites=2)
    assert costs.backbone == pytest.approx(17.58e9, rel=0.01)  # the spec's ~17.6 G
    assert costs.to_exit[0] == pytest.approx(0.25 * costs.full, rel=0.03)
    assert costs.full / costs.backbone < 1.02  # exits, early tokens and adapters are cheap


@pytest.mark.parametrize(
    "exits, separate_cls, sites, kind",
    [
        ([1, 3, 4], True, ["attn", "mlp"], "e_adapter"),
        ([2, 4], False, ["mlp"], "e_adapter"),
        ([4], False, ["mlp"], "adaptformer"),
        ([2, 4], True, ["q", "v"], "lora"),
        ([1, 2, 3, 4], False, [], "none"),
    ],
)
def test_matches_flop_counter(exits, separate_cls, sites, kind):
    backbone = tiny_backbone()
    net = MultiExitViT(
        backbone,
        10,
        exits,
        adapter=dict(
            kind=kind,
            exit_specific=separate_cls and kind == "e_adapter",
            separate_cls=separate_cls,
            sites=sites,
        ),
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        counted = counted_macs(net, images) / len(images)  # per image
        plain = counted_macs(backbone, images) / len(images)
    costs = model_exit_costs(net)
    assert costs.full == pytest.approx(counted, rel=0.01)
    if kind != "lora":  # LoRA wraps the backbone's own qkv layers in place
        assert costs.backbone == pytest.approx(plain, rel=0.01)


def test_format():
    assert format_macs(17.58e9) == "17.58 GMACs"
    assert format_macs(7.35e6) == "7.35 MMACs"
