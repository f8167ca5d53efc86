"""Early exit: confidence, MSDNet calibration, logit store, analysis files and the engine."""

import csv
import json
import math

import pytest
import torch
from PIL import Image

from met_lightning.errors import CheckpointError, ConfigError
from met_lightning.inference.analysis import analyze, write_report
from met_lightning.inference.budget import (
    SplitScores,
    calibrate_thresholds,
    evaluate,
    forced_thresholds,
    resolve_budget,
    select_for_budget,
    simulate_exits,
    target_shares,
)
from met_lightning.inference.confidence import CONFIDENCE_KINDS, confidence
from met_lightning.inference.engine import EarlyExitEngine, check_thresholds
from met_lightning.inference.logit_store import LogitStore, SplitLogits
from met_lightning.macs import model_exit_costs
from met_lightning.models.multi_exit_vit import MultiExitViT
from tests.helpers import counted_macs, tiny_backbone

INF = math.inf


def trained_like(net: MultiExitViT, scale: float = 0.05) -> MultiExitViT:
    """Perturb the zero-initialized adapters so every exit computes something different."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    return net.eval()


def trained_net() -> MultiExitViT:
    """The tiny 4-exit network with trained-like weights (exits disagree), in eval mode."""
    return trained_like(MultiExitViT(tiny_backbone(), 10, [1, 2, 3, 4]))


def random_images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def net():
    return trained_net()


@pytest.fixture(scope="module")
def images():
    return random_images(96)


@pytest.fixture(scope="module")
def full(net, images):
    with torch.no_grad():
        return net(images).logits


# ---------------------------------------------------------------------- confidence
def test_confidence_kinds():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).log_softmax(-1)
    probs = logits.softmax(-1)
    assert confidence(logits, "max_softmax").tolist() == pytest.approx(
        probs.max(-1).values.tolist()
    )
    top = probs.sort(-1, descending=True).values
    assert confidence(logits, "margin").tolist() == pytest.approx((top[:, 0] - top[:, 1]).tolist())
    entropy = -(probs * probs.log()).sum(-1)
    assert confidence(logits, "neg_entropy").tolist() == pytest.approx((-entropy).tolist())
    assert confidence(logits, "neg_entropy")[1] == pytest.approx(-math.log(3))  # uniform
    with pytest.raises(ConfigError, match="confidence='top1'"):
        EarlyExitEngine(MultiExitViT(tiny_backbone(), 3, [2, 4]), [INF], "top1")


# ---------------------------------------------------------------------- calibration
def test_target_shares_follow_p_to_the_k():
    assert target_shares(1.0, 4) == pytest.approx([0.25] * 4)
    q = target_shares(0.5, 3)
    assert q == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert target_shares(1e-6, 4)[0] == pytest.approx(1.0, abs=1e-5)
    assert target_shares(1e6, 4)[-1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("p", [0.2, 0.7, 1.0, 1.8])
def test_calibration_gives_the_target_shares(p):
    conf = torch.rand(1000, 4, generator=torch.Generator().manual_seed(0))
    shares = target_shares(p, 4)
    thresholds = calibrate_thresholds(conf, shares)
    assert thresholds[-1] == -INF
    counts = torch.bincount(simulate_exits(conf, thresholds), minlength=4)
    expected = torch.diff(torch.tensor([0, *torch.tensor(shares).cumsum(0).mul(1000).round()]))
    assert counts.tolist() == expected.long().tolist()


def test_simulation_extremes():
    conf = torch.rand(50, 3)
    assert simulate_exits(conf, [INF, INF, INF]).eq(2).all()
    assert simulate_exits(conf, [-INF, INF, INF]).eq(0).all()
    assert simulate_exits(conf, forced_thresholds(1, 3)).eq(1).all()


def test_budget_selection_and_errors():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (400,))
    logits = torch.randn(400, 3, 5)
    logits[torch.arange(400), :, labels] += torch.tensor([0.5, 1.5, 3.0])  # later exits better
    scores = SplitScores.from_logits(logits, labels)
    macs = (10, 20, 30)
    point = select_for_budget(scores, macs, 18.0)
    assert point.mean_macs <= 18.0
    assert point.accuracy >= evaluate(scores, forced_thresholds(0, 3), macs).accuracy
    assert select_for_budget(scores, macs, 10.0).shares == (1.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match=r"below the cost of exit 1 \(10 MACs"):
        select_for_budget(scores, macs, 9.0)
    assert resolve_budget(0.5, 30) == 15 and resolve_budget(25, 30) == 25
    for bad in (0, -1, "lots"):
        with pytest.raises(ConfigError, match="budget"):
            resolve_budget(bad, 30)


# ---------------------------------------------------------------------- engine
@pytest.mark.parametrize("kind", CONFIDENCE_KINDS)
@pytest.mark.parametrize("p", [0.3, 1.0, 3.0])
def test_engine_equals_simulation(net, images, full, kind, p):
    scores = SplitScores.from_logits(full, torch.zeros(len(images), dtype=torch.long), kind)
    thresholds = calibrate_thresholds(scores.confidence, target_shares(p, net.num_exits))
    simulated = simulate_exits(scores.confidence, thresholds)
    assert len(simulated.unique()) == net.num_exits  # every exit is used
    result = EarlyExitEngine(net, thresholds, kind)(images)
    rows = torch.arange(len(images))
    assert torch.equal(result.exit_index, simulated)
    assert torch.equal(result.predictions, full.argmax(-1)[rows, simulated])
    torch.testing.assert_close(result.logits, full[rows, simulated], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.confidence, scores.confidence[rows, simulated])


def test_engine_extremes_equal_full_forward(net, images, full):
    last = EarlyExitEngine(net, [INF] * 4)(images)
    assert last.exit_index.eq(3).all()
    torch.testing.assert_close(last.logits, full[:, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(last.predictions, full[:, -1].argmax(-1))
    first = EarlyExitEngine(net, [-INF] * 3)(images)
    assert first.exit_index.eq(0).all()
    torch.testing.assert_close(first.logits, full[:, 0], atol=1e-5, rtol=1e-5)


def test_engine_without_separate_class_tokens():
    adapter = dict(exit_specific=False, separate_cls=False)
    net = trained_like(MultiExitViT(tiny_backbone(), 7, [2, 4], adapter=adapter))
    images = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        full = net(images).logits
    scores = SplitScores.from_logits(full, torch.zeros(40, dtype=torch.long))
    thresholds = calibrate_thresholds(scores.confidence, [0.5, 0.5])
    result = EarlyExitEngine(net, thresholds)(images)
    assert torch.equal(result.exit_index, simulate_exits(scores.confidence, thresholds))


def test_thresholds_of_the_wrong_length():
    assert check_thresholds([0.5, 0.6, 0.7], 4)[-1] == -INF
    assert check_thresholds([0.5, 0.6, 0.7, 0.9], 4)[-1] == -INF  # the last is ignored
    with pytest.raises(ConfigError, match="thresholds has 2 values, but the model has 4 exits"):
        check_thresholds([0.5, 0.6], 4)


def test_engine_really_skips_compute(net, images, full):
    """FLOPs counted while the engine runs = the analytic MACs of the exits the images took."""
    costs = model_exit_costs(net)
    batch = images[:32]
    for k in range(net.num_exits):
        counted = counted_macs(EarlyExitEngine(net, forced_thresholds(k, 4)), batch) / len(batch)
        assert counted == pytest.approx(costs.to_exit[k], rel=0.01), k
    scores = SplitScores.from_logits(full[:32], torch.zeros(32, dtype=torch.long))
    thresholds = calibrate_thresholds(scores.confidence, [0.5, 0.25, 0.15, 0.1])
    point = evaluate(scores, thresholds, costs.to_exit)
    counted = counted_macs(EarlyExitEngine(net, thresholds), batch) / len(batch)
    assert counted == pytest.approx(point.mean_macs, rel=0.01)
    assert point.mean_macs < 0.6 * costs.full


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_exit_macs_match_flop_counter_on_real_vits(name):
    """ViT-Ti/S at 224 px, exits [3, 6, 9, 12], rank 8, both sites: every exit within 1 %."""
    from met_lightning.models.backbone import create_backbone

    backbone = create_backbone(name)
    for block in backbone.blocks:
        block.attn.fused_attn = False  # the math path: every product is a counted matmul
    net = MultiExitViT(backbone, 100, [3, 6, 9, 12]).eval()
    costs = model_exit_costs(net)
    image = torch.randn(1, 3, 224, 224)
    for k in range(4):
        counted = counted_macs(EarlyExitEngine(net, forced_thresholds(k, 4)), image)
        assert counted == pytest.approx(costs.to_exit[k], rel=0.01), (name, k)
    assert counted_macs(net, image) == pytest.approx(costs.full, rel=0.01)
    assert counted_macs(backbone, image) == pytest.approx(costs.backbone, rel=0.01)


# ---------------------------------------------------------------------- store and analysis
def fake_store(n: int = 300, classes: int = 5) -> LogitStore:
    torch.manual_seed(0)
    splits = {}
    for split in ("val", "test"):
        labels = torch.randint(0, classes, (n,))
        logits = torch.randn(n, 3, classes)
        logits[torch.arange(n), :, labels] += torch.tensor([1.0, 2.0, 3.0])
        splits[split] = SplitLogits(logits, labels)
    return LogitStore(splits, (4, 8, 12), (1_000_000, 2_000_000, 3_000_000))


def test_store_round_trip_and_errors(tmp_path):
    store = fake_store()
    store.save(tmp_path / "logits.safetensors")
    loaded = LogitStore.load(tmp_path)  # a run folder works too
    assert loaded.exits == store.exits and loaded.exit_macs == store.exit_macs
    assert torch.equal(loaded["test"].logits, store["test"].logits)
    assert torch.equal(loaded["val"].labels, store["val"].labels)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CheckpointError, match="no 'train' split"):
        loaded["train"]
    with pytest.raises(CheckpointError, match="does not exist"):
        LogitStore.load(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        LogitStore.load(tmp_path / "bad.safetensors")


def test_analysis_writes_curve_plot_and_report(tmp_path):
    report = analyze(fake_store(), budgets=[0.5, 2_500_000])
    files = write_report(report, tmp_path)
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    assert {"p", "threshold_exit1", "share_exit3", "mean_macs", "accuracy"} <= set(rows[0])
    for row in rows:
        shares = [float(row[f"share_exit{k}"]) for k in (1, 2, 3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        mean = sum(s * m for s, m in zip(shares, (1e6, 2e6, 3e6), strict=True))
        assert float(row["mean_macs"]) == pytest.approx(mean, rel=1e-4)
        assert row["threshold_exit3"] == "-inf"
    with Image.open(files["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    data = json.loads(files["json"].read_text())
    last = data["anytime"][-1]["accuracy"]
    assert data["keep"]["1"]["accuracy"] >= last
    assert data["keep"]["0.99"]["mean_macs"] <= data["keep"]["1"]["mean_macs"] <= 3_000_000
    assert [b["budget_macs"] for b in data["budgets"]] == [1_500_000, 2_500_000]
    for budget in data["budgets"]:
        assert budget["selected"]["mean_macs"] <= budget["budget_macs"]  # on val
    # a budget below exit 1 (1/3 of the full cost) is reported, not fatal; a non-budget is fatal
    assert analyze(fake_store(), budgets=[0.2]).skipped_budgets == [0.2]
    with pytest.raises(ConfigError, match=r"budgets\[0\]"):
        analyze(fake_store(), budgets=[-1])
