"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import logging

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from met_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def cosine_with_warmup(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    warmup_epochs: float = 10,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Linear warm-up over `warmup_epochs` (step s: lr * (s + 1) / warmup), then cosine decay to
    `min_lr_ratio * lr` at `total_steps`."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup >= total_steps:
        msg = "scheduler.warmup_epochs=%s covers the whole run (%d steps): using no warm-up"
        log.warning(msg, warmup_epochs, total_steps)
        warmup = 0
    lrs = {group["lr"] for group in optimizer.param_groups}
    if min_lr_ratio and len(lrs) > 1:  # torch's eta_min is one number for every group
        raise ConfigError(
            f"scheduler.min_lr_ratio={min_lr_ratio} needs one learning rate in every parameter "
            f"group (they have {sorted(lrs)}): set scheduler.min_lr_ratio=0"
        )
    eta_min = min_lr_ratio * max(lrs)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=eta_min)
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, 1 / warmup, 1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
