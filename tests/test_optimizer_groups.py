"""Issue 12, item 6: AdamW without weight decay on norms, biases and γ (switchable)."""

from __future__ import annotations

import pytest
import torch

from met_lightning.training.optim import AdamW, param_groups
from tests.step_helpers import build_module


def groups_by_name(optimizer) -> dict[str, tuple[float, set[int]]]:
    return {g["name"]: (g["weight_decay"], {id(p) for p in g["params"]})
            for g in optimizer.param_groups}  # fmt: skip


def test_met_groups_follow_timms_convention(tmp_path):
    module = build_module("met", tmp_path)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, AdamW)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"][0] == 1e-4 and groups["no_decay"][0] == 0.0  # conf/optimizer/adamw
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    expected_exempt = {n for n, p in named.items() if p.ndim <= 1 or n.endswith(".gamma")}
    exempt = {n for n, p in named.items() if id(p) in groups["no_decay"][1]}
    decayed = {n for n, p in named.items() if id(p) in groups["decay"][1]}
    assert exempt == expected_exempt and decayed == set(named) - expected_exempt
    assert any(n.endswith(".gamma") for n in exempt)  # γ [K, r] is 2-D, exempt by name
    assert any(".norms." in n for n in exempt) and any(n.endswith(".bias") for n in exempt)
    assert all(n.endswith(".weight") and named[n].ndim == 2 for n in decayed)
    assert any(".down." in n for n in decayed) and any("heads." in n for n in decayed)


def test_exempt_parameters_do_not_shrink_decayed_ones_do(tmp_path):
    module = build_module("met", tmp_path, "optimizer.lr=0.1", "optimizer.weight_decay=0.5")
    optimizer = module.configure_optimizers()
    groups = groups_by_name(optimizer)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only weight decay moves a parameter
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()
    for n, p in params.items():
        if id(p) in groups["no_decay"][1]:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5), msg=n)


def test_the_switch_puts_every_parameter_under_weight_decay(tmp_path):
    module = build_module("met", tmp_path, "optimizer.decay_norm_bias=true")
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["all"]
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(optimizer.param_groups[0]["params"]) == len(trainable)


def test_param_groups_of_unnamed_parameters_and_plain_groups():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    groups = param_groups([w, b])
    assert [(g["name"], len(g["params"])) for g in groups] == [("decay", 1), ("no_decay", 1)]
    assert groups[1]["weight_decay"] == 0.0
    # user groups pass through unchanged
    optimizer = AdamW([{"params": [w, b]}], lr=1e-3, weight_decay=0.1)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("method", ["linear_probe", "full_finetune"])
def test_every_trainable_parameter_is_in_exactly_one_group(method, tmp_path):
    module = build_module(method, tmp_path)
    optimizer = module.configure_optimizers()
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters() if p.requires_grad)
