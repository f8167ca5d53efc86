"""Warm-up + cosine: the learning rate of every optimizer step, pinned to the closed form; the
warm-up survives `trainer.max_epochs=-1` with `trainer.max_steps`."""

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from met_lightning.config import validate_config
from met_lightning.errors import ConfigError
from met_lightning.training.module import MultiExitClassifier
from met_lightning.training.schedulers import cosine_with_warmup
from tests.helpers import TINY_OVERRIDES, compose_config, tiny_backbone

LR = 0.1


def closed_form(step: int, total: int, warmup: int, min_lr_ratio: float) -> float:
    """The factor of the LambdaLR this scheduler replaced: (step + 1) / warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lrs(total: int, steps_per_epoch: float, warmup_epochs: float, min_lr_ratio: float):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    scheduler = cosine_with_warmup(optimizer, total, steps_per_epoch, warmup_epochs, min_lr_ratio)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    "total, steps_per_epoch, warmup_epochs, min_lr_ratio",
    [(100, 10, 1, 0.0), (1000, 10, 10, 0.0), (57, 3.5, 2, 0.1), (20, 4, 0.25, 0.0),
     (30, 3, 0, 0.05), (12, 4, 10, 0.0), (1, 1, 0, 0.0), (7, 2, 1.6, 0.3)],
)  # fmt: skip
def test_lr_of_every_step_matches_closed_form(total, steps_per_epoch, warmup_epochs, min_lr_ratio):
    warmup = int(round(warmup_epochs * steps_per_epoch))
    warmup = 0 if warmup >= total else warmup  # warm-up over the whole run: none (logged)
    expected = [LR * closed_form(s, total, warmup, min_lr_ratio) for s in range(total)]
    got = lrs(total, steps_per_epoch, warmup_epochs, min_lr_ratio)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_warmup_kept_with_max_epochs_minus_one_and_max_steps(tmp_path):
    """4 batches per epoch, warm-up 1 epoch: steps 0-3 warm up although max_epochs is -1."""
    cfg = compose_config(["method=linear_probe", *TINY_OVERRIDES, "model.net.exits=[-1]"], tmp_path)
    validate_config(cfg)
    torch.manual_seed(0)
    net = instantiate(cfg.model.net)(backbone=tiny_backbone(), num_classes=10)
    module = MultiExitClassifier(
        net,
        instantiate(cfg.model.loss)(num_exits=net.num_exits),
        optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        scheduler=lambda **kw: cosine_with_warmup(**kw, warmup_epochs=1),
    )
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    record = _RecordLR()
    trainer = L.Trainer(
        max_epochs=-1, max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    expected = [LR * closed_form(s, 12, 4, 0.0) for s in range(12)]
    torch.testing.assert_close(record.lrs, expected, rtol=1e-9, atol=1e-12)


def test_parameter_groups_each_follow_their_own_curve():
    def two_groups():
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])

    optimizer = two_groups()
    scheduler = cosine_with_warmup(optimizer, 20, 4, warmup_epochs=1)
    for step in range(20):
        expected = [base * closed_form(step, 20, 4, 0.0) for base in (0.1, 0.01)]
        torch.testing.assert_close([g["lr"] for g in optimizer.param_groups], expected)
        optimizer.step()
        scheduler.step()
    with pytest.raises(ConfigError, match=r"scheduler.min_lr_ratio=0.1 needs one learning rate"):
        cosine_with_warmup(two_groups(), 20, 4, warmup_epochs=1, min_lr_ratio=0.1)
