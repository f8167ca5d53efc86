"""One stage sequence (`MultiExitViT.stage`), one early-exit loop (`engine.early_exit`): every
runner (the engine, eager and CUDA graphs; the ONNX Runtime runner) gives the exits, classes and
MACs of the simulation on a run's stored logits."""

import contextlib
import json
import math

import pytest
import torch

from met_lightning.checkpoint import load_trainable
from met_lightning.inference import engine as engine_module
from met_lightning.inference.budget import (
    SplitScores,
    calibrate_thresholds,
    evaluate,
    simulate_exits,
)
from met_lightning.inference.engine import EarlyExitEngine, _tensors, early_exit, take
from met_lightning.inference.logit_store import LogitStore
from met_lightning.macs import model_exit_costs
from met_lightning.models.multi_exit_vit import StreamState
from tests.helpers import run_split
from tests.test_early_exit import random_images, trained_net

INF = math.inf


def closed_form_exits(conf: torch.Tensor, thresholds) -> torch.Tensor:
    """The exit rule without a loop: the first k with conf_k >= T_k (float64), else the last."""
    passes = conf.double() >= torch.tensor(thresholds, dtype=torch.float64)
    passes[:, -1] = True
    return passes.to(torch.uint8).argmax(dim=1)


def test_the_loop_keeps_the_exit_rule():
    """Ties leave, NaN and -inf confidences stay until the last exit, which takes everybody."""
    generator = torch.Generator().manual_seed(0)
    conf = torch.rand(200, 4, generator=generator)
    conf[::7, 1] = float("nan")
    conf[::5, 2] = -INF
    conf[::11] = float("nan")  # answers at the last exit
    thresholds = [0.9, float(conf[3, 1]), -INF, INF]  # a tie at exit 2, all leave at exit 3
    for limits in (thresholds, [INF, INF, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]):
        assert torch.equal(simulate_exits(conf, limits), closed_form_exits(conf, limits))
    assert simulate_exits(conf, thresholds)[3] == (0 if conf[3, 0] >= 0.9 else 1)  # the tie


def test_the_loop_stops_once_everybody_left_and_answers_per_row():
    calls = []

    def stage(k, x):
        calls.append((k, len(x)))
        return x, x[:, k], (x[:, k] * 10, x[:, :2])

    conf = torch.tensor([[0.9, 0.0, 0.0], [0.1, 0.8, 0.0], [0.2, 0.1, 0.3], [0.95, 0.0, 0.0]])
    limits = torch.tensor([0.5, 0.5, -INF], dtype=torch.float64)
    exits, (tens, firsts) = early_exit(stage, conf, limits)
    assert exits.tolist() == [0, 1, 2, 0]
    assert calls == [(0, 4), (1, 2), (2, 1)]  # only the rows still there run each stage
    torch.testing.assert_close(tens, torch.tensor([9.0, 8.0, 3.0, 9.5]))
    assert torch.equal(firsts, conf[:, :2])
    calls.clear()
    early_exit(stage, conf, torch.tensor([0.05, 0.5, -INF], dtype=torch.float64))
    assert calls == [(0, 4)]  # everybody left at exit 1: no later stage runs


def test_take_and_tensors_walk_states_images_and_none():
    state = StreamState(torch.arange(12.0).view(4, 3), None)
    rows = torch.tensor([3, 1])
    assert take(state, rows).early is None and torch.equal(take(state, rows).main, state.main[rows])
    assert torch.equal(take(state.main, rows), state.main[rows])
    assert [t.shape for t in _tensors((state, torch.ones(2), None))] == [(4, 3), (2,)]


class _Side:
    def wait_stream(self, other) -> None:
        pass


class _FakeGraph:
    """torch.cuda.CUDAGraph on a CPU: replay runs the captured stage again on its static inputs
    and copies the result into its static outputs, as a replay refills them."""

    capturing: "_FakeGraph | None" = None

    def __init__(self) -> None:
        self.call = None

    def replay(self) -> None:
        stage, k, static_in, static_out = self.call
        for dst, src in zip(_tensors(static_out), _tensors(stage(k, static_in)), strict=True):
            dst.copy_(src)


@contextlib.contextmanager
def _capture(graph, pool=None):
    _FakeGraph.capturing = graph
    try:
        yield
    finally:
        _FakeGraph.capturing = None


def test_graph_mode_buckets_pads_and_cuts_like_eager(monkeypatch):
    """The CUDA-graph mode's bucketing, static inputs, padding and cutting, on a CPU (CUDA's
    stream and graph calls faked): the same answers as eager, one graph per stage and bucket."""
    cuda = engine_module.torch.cuda
    monkeypatch.setattr(cuda, "Stream", _Side)
    monkeypatch.setattr(cuda, "current_stream", lambda: _Side())
    monkeypatch.setattr(cuda, "stream", lambda side: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(cuda, "graph", _capture)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: None)
    net = trained_net()
    images = random_images(40)
    with torch.no_grad():
        scores = SplitScores.from_logits(net(images).logits, torch.zeros(40, dtype=torch.long))
    thresholds = calibrate_thresholds(scores.confidence, [0.3, 0.3, 0.2, 0.2])
    eager = EarlyExitEngine(net, thresholds)
    graphs = EarlyExitEngine(net, thresholds)

    def recorded(k, x):
        out = eager._scored(k, x)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.call = (eager._scored, k, x, out)
        return out

    graphs._stage = engine_module._StageGraphs(recorded)
    for n in (40, 13, 40):  # the second 40 replays the graphs the first captured
        expected, got = eager(images[:n]), graphs(images[:n])
        for name in got._fields:
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert torch.equal(got.exit_index, simulate_exits(scores.confidence, thresholds))
    assert len(set(got.exit_index.tolist())) == net.num_exits
    keys = set(graphs._stage.graphs)
    assert {(k, size) for k, size, _ in keys} >= {(0, 64), (0, 16)}


def _runner(name: str, run, tmp_path, kind: str):
    """A runner of the run's network: (images [N, C, H, W], thresholds) -> result (tensors)."""
    net, config = load_trainable(run)
    net.eval()
    if name == "engine":
        return lambda images, thresholds: EarlyExitEngine(net, thresholds, kind)(images)
    pytest.importorskip("onnxruntime")
    from met_lightning.export.onnx_export import export_onnx
    from met_lightning.export.ort_runner import OrtEarlyExit

    export_onnx(net, config, tmp_path / "onnx", run, kind)

    def ort(images, thresholds):
        result = OrtEarlyExit(tmp_path / "onnx", thresholds=thresholds)(images.numpy())
        return type(result)(*(torch.from_numpy(a) for a in result))

    return ort


@pytest.mark.parametrize("runner", ["engine", "onnxruntime"])
def test_runner_gives_the_stored_simulations_exits_classes_and_macs(runner, tiny_run, tmp_path):
    """For each budget of the run's budget.json and each stored split: the simulation on the
    stored logits is the reference (it gives the report's mean MACs and accuracy); the runner on
    the split's images gives its exits, classes and MACs exactly."""
    report = json.loads((tiny_run / "budget.json").read_text())
    run = _runner(runner, tiny_run, tmp_path, report["confidence"])
    costs = torch.tensor(model_exit_costs(load_trainable(tiny_run)[0]).to_exit)
    store = LogitStore.load(tiny_run)
    assert report["budgets"]
    answered = set()
    for split, point in {"val": "selected", "test": "evaluated"}.items():
        images, labels = run_split(tiny_run, split)
        assert torch.equal(store[split].labels, labels)
        scores = SplitScores.from_logits(store[split].logits, labels, report["confidence"])
        rows = torch.arange(len(labels))
        for budget in report["budgets"]:
            thresholds = [float(t) for t in budget["selected"]["thresholds"]]
            exits = simulate_exits(scores.confidence, thresholds)
            macs = costs[exits]
            simulated = evaluate(scores, thresholds, costs.tolist())  # as the report was made
            assert simulated.accuracy == budget[point]["accuracy"]
            assert simulated.mean_macs == budget[point]["mean_macs"]
            assert macs.double().mean().item() == pytest.approx(simulated.mean_macs, rel=1e-12)
            got = run(images, thresholds)
            assert torch.equal(got.exit_index, exits), (split, budget["budget"])
            assert torch.equal(got.predictions, scores.predictions[rows, exits])
            assert torch.equal(costs[got.exit_index], macs)
            answered.update(exits.tolist())
    assert answered == set(range(len(costs)))  # every exit answers some image
