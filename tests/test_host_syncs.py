"""Issue 12, item 1: a training step (forward, loss, metric updates, logging, backward) makes no
device -> host sync, for every method; divergence is still caught, collectively, at the logging
interval, and never saved."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from met_lightning.errors import TrainingDivergedError
from met_lightning.losses.multi_exit import graph_energy_ratio, label_affinity
from tests.helpers import METHODS
from tests.step_helpers import SyncCounter, build_module, loader, tiny_trainer


class CountSecondStep(L.Callback):
    """Counts sync ops from the start of the second training batch (the first one builds
    caches) to the end of its backward: training_step, self.log, metric updates, backward."""

    def __init__(self) -> None:
        self.counter: SyncCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.counter = SyncCounter()
            self.counter.__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.counter is not None and trainer.fit_loop.epoch_loop.batch_idx == 1:
            self.counter.__exit__(None, None, None)
            self.done = dict(self.counter.counts)


def test_the_counter_sees_the_syncs_it_counts():
    x = torch.tensor([1.0, float("nan"), 3.0])
    with SyncCounter() as counter:
        _ = x[torch.isfinite(x)]  # boolean index
        _ = bool(torch.isfinite(x).all())  # scalar read
        _ = x.nonzero()
    assert counter.counts["index(bool)"] == 1
    assert counter.counts["_local_scalar_dense"] + counter.counts["is_nonzero"] >= 1
    assert counter.counts["nonzero"] >= 1


def test_graph_loss_makes_no_sync_forward_and_backward():
    features = torch.randn(8, 16, requires_grad=True)
    with SyncCounter() as counter:
        g = graph_energy_ratio(features, label_affinity(torch.arange(8) % 3))
        g.backward()
    assert dict(counter.counts) == {}
    assert features.grad is not None and torch.isfinite(g)


@pytest.mark.parametrize("method", METHODS)
def test_training_step_and_backward_make_no_host_sync(method, tmp_path):
    module = build_module(method, tmp_path)
    probe = CountSecondStep()
    trainer = tiny_trainer(tmp_path, callbacks=[probe], limit_train_batches=2, limit_val_batches=0,
                           log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, train_dataloaders=loader())
    assert probe.done == {}, f"{method}: sync ops in one training step + backward: {probe.done}"


class Poison(L.Callback):
    """Makes the loss of batch `batch` of epoch `epoch` infinite (an input of inf)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            batch[0][0, 0, 0, 0] = float("inf")


def test_divergence_is_caught_at_the_logging_interval_with_the_first_bad_step(tmp_path):
    module = build_module("met", tmp_path)
    seen = []

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(batch_idx)

    trainer = tiny_trainer(tmp_path, callbacks=[Poison(0, 1), Steps()], log_every_n_steps=4,
                           limit_val_batches=0, max_epochs=3)  # fmt: skip
    with pytest.raises(TrainingDivergedError) as err:
        trainer.fit(module, train_dataloaders=loader(n=48))  # 6 batches per epoch
    message = str(err.value)
    # recorded at batch 1, read at the 4th batch: the message names the first bad step
    assert message.startswith("training diverged: the loss is nan at step 1 (epoch 0, batch 1)")
    assert "ce per exit [nan, nan], graph per exit [nan]" in message
    assert "Lower optimizer.lr (now 0.001)" in message
    # the module's hook of batch 3 (4th, after the callbacks' hooks) raised: batch 4 never ran
    assert seen == [0, 1, 2, 3]


def test_a_checkpoint_after_an_unchecked_bad_step_is_refused(tmp_path):
    module = build_module("linear_probe", tmp_path)
    module.trainer = tiny_trainer(tmp_path)  # no fit: the record alone must stop the save

    class Parts:
        total = torch.tensor(float("inf"))
        ce = torch.tensor([float("inf")])
        graph = torch.zeros(0)

    module._record_divergence(Parts(), batch_idx=0)
    with pytest.raises(
        TrainingDivergedError, match=r"the loss is inf at step 0 \(epoch 0, batch 0\)"
    ):
        module.on_save_checkpoint({"state_dict": {}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_real_trainer_batches_between_log_intervals_do_not_sync_the_gpu(tmp_path):
    """On a GPU: whole Trainer batches (step, backward, AdamW, progress bar, logger, checkpoint
    callbacks) between logging intervals under torch.cuda.set_sync_debug_mode("error")."""
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from tests.step_helpers import batch

    class SyncDebug(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("error" if batch_idx in (2, 3) else "default")

        def on_train_end(self, trainer, pl_module) -> None:
            torch.cuda.set_sync_debug_mode("default")

    images, labels = batch(48)
    data = DataLoader(TensorDataset(images.cuda(), labels.cuda()), batch_size=8)
    module = build_module("met", tmp_path)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=5,
        log_every_n_steps=5,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[SyncDebug(), RichProgressBar()],
        enable_model_summary=False,
    )
    try:
        trainer.fit(module, train_dataloaders=data)  # a sync in batches 2-3 raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 5
