"""Budget inputs: the suggested budget of the "below exit 1" error is accepted when passed back,
and `simulate_exits` takes K-1 thresholds like the engine."""

from __future__ import annotations

import math
import re

import pytest
import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.budget import (
    SplitScores,
    resolve_budget,
    select_for_budget,
    simulate_exits,
)
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.models.multi_exit_vit import MultiExitViT
from tests.helpers import tiny_backbone

INF = math.inf


def _scores(num_exits: int) -> SplitScores:
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (64,))
    logits = torch.randn(64, num_exits, 5)
    return SplitScores.from_logits(logits, labels)


def _suggestion(message: str) -> tuple[int, float]:
    found = re.search(r"at least (\d+) MACs or ([0-9.]+) of the full cost", message)
    assert found, message
    return int(found.group(1)), float(found.group(2))


# the issue's case (exit 1 of the demo model at 7,346,112 of 26,323,584 MACs) and costs whose
# ratio to the full cost falls just above a multiple of 0.001
@pytest.mark.parametrize(
    "exit_macs",
    [
        (7_346_112, 13_000_000, 26_323_584),
        (279_001, 600_000, 1_000_000),
        (279_000, 600_000, 1_000_000),  # exactly 0.279
        (1, 2, 3_000_000),  # tiny fraction: still rounded up to 0.001
        (30, 30, 30),  # exit 1 costs the full model
    ],
)
def test_suggested_budget_is_accepted(exit_macs):
    scores = _scores(len(exit_macs))
    full = exit_macs[-1]
    too_small = exit_macs[0] / full / 2 if exit_macs[0] < full else 0.5 * exit_macs[0] / full
    with pytest.raises(ConfigError, match="below the cost of exit 1") as err:
        select_for_budget(scores, exit_macs, resolve_budget(too_small, full), key="budget")
    macs, fraction = _suggestion(str(err.value))
    assert macs == exit_macs[0]
    assert fraction * full >= exit_macs[0]
    assert fraction <= 1.0
    assert fraction - 0.001 < exit_macs[0] / full  # the smallest 3-decimal fraction that fits
    for suggested in (fraction, macs):  # both suggestions, as predict budget= reads them
        point = select_for_budget(scores, exit_macs, resolve_budget(suggested, full))
        assert point.mean_macs <= resolve_budget(suggested, full) * (1 + 1e-9)


def test_issue_numbers():
    """budget=0.01 on the demo model: the suggested fraction is 0.280, not 0.279."""
    exit_macs = (7_346_112, 13_000_000, 26_323_584)
    with pytest.raises(ConfigError) as err:
        select_for_budget(_scores(3), exit_macs, resolve_budget(0.01, exit_macs[-1]))
    assert _suggestion(str(err.value))[1] == pytest.approx(0.280)


# ---------------------------------------------------------------------- K-1 thresholds
def test_simulate_exits_takes_k_minus_1_thresholds():
    conf = torch.rand(200, 4)
    early = [0.7, 0.5, 0.9]
    expected = simulate_exits(conf, [*early, -INF])
    assert torch.equal(simulate_exits(conf, early), expected)
    assert torch.equal(simulate_exits(conf, [*early, 0.123]), expected)  # the last is ignored


def test_simulate_exits_rejects_what_the_engine_rejects():
    conf = torch.rand(10, 4)
    with pytest.raises(ConfigError, match="give 3 \\(one per early exit\\) or 4"):
        simulate_exits(conf, [0.5, 0.5])
    with pytest.raises(ConfigError, match="NaN"):
        simulate_exits(conf, [0.5, math.nan, 0.5])


def test_simulate_exits_matches_engine_with_k_minus_1():
    torch.manual_seed(0)
    net = MultiExitViT(tiny_backbone(), num_classes=5, exits=[1, 2, 4]).eval()
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        logits = net(images).logits
    scores = SplitScores.from_logits(logits, torch.zeros(16, dtype=torch.long))
    early = [float(scores.confidence[:, 0].median()), float(scores.confidence[:, 1].median())]
    result = EarlyExitEngine(net, early)(images)
    assert torch.equal(result.exit_index, simulate_exits(scores.confidence, early))
