"""Issue 12, item 5: every method trains under DDP with find_unused_parameters=false (every
trainable parameter gets a gradient), and a divergence on one process stops every process."""

from __future__ import annotations

import pytest

from tests.helpers import METHODS, TINY_OVERRIDES, run_folder
from tests.reliability.faults import run_side_by_side, with_repo_on_path
from tests.step_helpers import batch, build_module


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, tmp_path):
    module = build_module(method, tmp_path)
    module.train()
    images, labels = batch()
    out = module.net(images)
    module.loss(out.logits, out.features, labels).total.backward()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert missing == [], f"{method}: trainable but unused (DDP would fail): {missing[:5]}"
    if method == "full_finetune":  # the backbone's own final norm is not run: frozen
        assert not any(p.requires_grad for p in module.net.backbone.norm.parameters())
        assert any(n.startswith("net.backbone.blocks.") for n, _ in trainable)


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "scheduler.warmup_epochs=0", "logger=none",
       "callbacks.budget_analysis=null", *TINY_OVERRIDES]  # fmt: skip


def test_ddp_full_finetune_trains_and_a_one_rank_divergence_stops_both(tmp_path):
    """Two 2-process gloo runs side by side: full fine-tuning (the method with unused backbone
    parts) trains under DDP with find_unused_parameters=false; MET with an inf loss on rank 1
    only stops on both processes with the divergence message (no hang in the all-reduce)."""
    runs = {name: tmp_path / name for name in ("ok", "nan")}
    poison = ["+callbacks.poison._target_=tests.step_helpers.PoisonRank",
              "+callbacks.poison.rank=1", "+callbacks.poison.batch=1"]  # fmt: skip
    ok, nan = run_side_by_side(
        [
            (
                [
                    *DDP,
                    "method=full_finetune",
                    "model.net.exits=[-1]",
                    f"hydra.run.dir={runs['ok']}",
                ],
                {},
            ),
            ([*DDP, *poison, f"hydra.run.dir={runs['nan']}"], with_repo_on_path()),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (run_folder(runs["ok"]) / "trainable.safetensors").is_file()

    assert nan.returncode != 0, nan.stderr[-3000:]
    # one message per process (both stopped); split on the message, not on lines: two processes
    # share the pipe, and a write of one may land inside the other's line
    messages = nan.stderr.split("training diverged: the loss is")[1:]
    assert len(messages) == 2, nan.stderr[-3000:]
    # the first bad step, seen by rank 1 only, is in the message of both processes
    assert all("at step 1 (epoch 0, batch 1)" in m for m in messages), messages
    assert not (runs["nan"] / "checkpoints").exists() or not any(
        (runs["nan"] / "checkpoints").iterdir()
    )
