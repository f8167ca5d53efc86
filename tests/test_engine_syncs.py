"""The engine's host syncs (one per early exit at most), its modes and its precision parity."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from met_lightning.errors import ConfigError
from met_lightning.inference.budget import SplitScores, calibrate_thresholds, simulate_exits
from met_lightning.inference.engine import (
    EarlyExitEngine,
    bucket_size,
    check_precision,
    precision_context,
)
from tests.test_early_exit import random_images, trained_net

aten = torch.ops.aten
# ops that read a device value on the host (or size an output by the data, which does)
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
}


class SyncCounter(TorchDispatchMode):
    """Counts sync-forcing ops; boolean-mask indexing counts too (its size depends on data)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.ops.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.ops.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def net():
    return trained_net()


@pytest.fixture(scope="module")
def images():
    return random_images(64)


def calibrated(net, images, shares, precision="32-true"):
    with torch.no_grad(), precision_context(precision, images.device):
        full = net(images).logits.float()
    scores = SplitScores.from_logits(full, torch.zeros(len(images), dtype=torch.long))
    return full, scores, calibrate_thresholds(scores.confidence, shares)


@pytest.mark.parametrize(
    "shares", [[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.15, 0.1], [0, 0, 0, 1], [1, 0, 0, 0]]
)
def test_at_most_one_sync_per_early_exit(net, images, shares):
    _, scores, thresholds = calibrated(net, images, shares)
    engine = EarlyExitEngine(net, thresholds)
    with SyncCounter() as counter:
        result = engine(images)
    assert len(counter.ops) <= net.num_exits - 1, counter.ops
    assert all(op == "aten._local_scalar_dense.default" for op in counter.ops), counter.ops
    assert torch.equal(result.exit_index, simulate_exits(scores.confidence, thresholds))


def test_heads_of_exits_nobody_reaches_do_not_run(net, images):
    calls = [0] * net.num_exits
    hooks = [
        head.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, head in enumerate(net.heads)
    ]
    try:
        EarlyExitEngine(net, [-float("inf")] * 3)(images)  # everybody leaves at exit 1
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1, 0, 0, 0]


def test_engine_equals_simulation_under_bf16_autocast(net, images):
    """Logits stored under bf16-mixed (as a bf16 trainer's validate/test makes them) and the
    engine run in the same precision give the same exits and predictions."""
    full, scores, thresholds = calibrated(net, images, [0.4, 0.3, 0.2, 0.1], "bf16-mixed")
    result = EarlyExitEngine(net, thresholds, precision="bf16-mixed")(images)
    simulated = simulate_exits(scores.confidence, thresholds)
    rows = torch.arange(len(images))
    assert len(simulated.unique()) == net.num_exits
    assert torch.equal(result.exit_index, simulated)
    assert torch.equal(result.predictions, full.argmax(-1)[rows, simulated])
    torch.testing.assert_close(result.confidence, scores.confidence[rows, simulated])


def test_precision_names_and_errors():
    assert check_precision(None) == "32-true"
    assert check_precision("bf16") == "bf16-mixed"
    assert check_precision(32) == "32-true"
    with pytest.raises(ConfigError, match="precision='fp8' must be one of"):
        check_precision("fp8")


def test_graph_mode_needs_cuda(net):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="engine_mode=graphs replays CUDA graphs and needs"):
        EarlyExitEngine(net, [0.5] * 3, mode="graphs")
    with pytest.raises(ConfigError, match="engine_mode='jit' must be one of"):
        EarlyExitEngine(net, [0.5] * 3, mode="jit")


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 63, 64, 65)] == [1, 2, 4, 4, 8, 64, 64, 128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_graph_mode_equals_eager_and_simulation(precision):
    net = trained_net().cuda()
    images = torch.randn(48, 3, 32, 32, device="cuda")
    full, scores, thresholds = calibrated(net, images, [0.3, 0.3, 0.2, 0.2], precision)
    eager = EarlyExitEngine(net, thresholds, precision=precision)
    graphs = EarlyExitEngine(net, thresholds, precision=precision, mode="graphs")
    for _ in range(2):  # the second call replays the captured graphs
        got = graphs(images)
        ref = eager(images)
        assert torch.equal(got.exit_index, ref.exit_index)
        assert torch.equal(got.predictions, ref.predictions)
    assert torch.equal(got.exit_index.cpu(), simulate_exits(scores.confidence.cpu(), thresholds))
