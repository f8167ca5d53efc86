"""Issue 12, item 2: `model.compile` — every method's forward + loss + backward compiles as one
graph (fullgraph=True, backend aot_eager on CPU) and gives the eager loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.errors import ConfigCompositionException

from tests.helpers import METHODS, compose_config
from tests.step_helpers import batch, build_module


def loss_and_grads(module, images, labels, compiled: bool):
    module = copy.deepcopy(module)
    net, loss = module.net, module.loss

    def step(images: torch.Tensor, labels: torch.Tensor):
        out = net(images)
        parts = loss(out.logits, out.features, labels)
        return parts.total, parts.ce, parts.graph

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    total, ce, graph = step(images, labels)
    total.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return total.detach(), ce, graph, grads


@pytest.mark.parametrize("method", METHODS)
def test_forward_loss_backward_compile_fullgraph_and_match_eager(method, tmp_path):
    module = build_module(method, tmp_path)
    module.train()
    images, labels = batch()
    eager = loss_and_grads(module, images, labels, compiled=False)
    compiled = loss_and_grads(module, images, labels, compiled=True)
    for a, b in zip(eager[:3], compiled[:3], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert eager[3].keys() == compiled[3].keys()
    for name, grad in eager[3].items():
        torch.testing.assert_close(compiled[3][name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_module_compile_keeps_state_dict_keys_and_engine_stages(tmp_path):
    """nn.Module.compile (what model.compile=true does) keeps the parameter names, so
    checkpoints and export are unchanged; the stages the early-exit engine runs
    (`MultiExitViT.stage`) still run, and compile as one graph each."""
    module = build_module("met", tmp_path)
    keys = list(module.state_dict())
    module.net.compile(backend="aot_eager", fullgraph=True)
    assert list(module.state_dict()) == keys
    images, labels = batch()
    module.eval()
    torch._dynamo.reset()
    stage = torch.compile(module.net.stage, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        logits = module.net(images).logits
        x = images
        for k in range(module.net.num_exits):
            x, _, exit_logits = stage(k, x)
            torch.testing.assert_close(exit_logits, logits[:, k], rtol=1e-5, atol=1e-5)
    assert x is None


def test_compile_switch_in_config(tmp_path):

    assert compose_config([], tmp_path).model.compile is False  # CPU default
    assert compose_config(["trainer=gpu"], tmp_path).model.compile is True
    assert compose_config(["trainer=gpu", "model.compile=false"], tmp_path).model.compile is False
    with pytest.raises(ConfigCompositionException, match="model.compile=sometimes"):
        compose_config(["model.compile=sometimes"], tmp_path)  # the typed model node refuses it


def test_a_compiled_module_trains_and_validates_in_a_trainer(tmp_path):
    from tests.step_helpers import loader, tiny_trainer

    module = build_module("met", tmp_path)
    keys = set(module.state_dict())
    module.compile_network(backend="aot_eager")
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    assert set(saved) == {n for n, p in module.named_parameters() if p.requires_grad} <= keys
