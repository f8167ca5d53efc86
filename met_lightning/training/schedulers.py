"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def cosine_with_warmup(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    warmup_epochs: float = 10,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from 0 over `warmup_epochs`, then cosine decay to `min_lr_ratio * lr`."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup >= total_steps:
        log.warning(
            "scheduler.warmup_epochs=%s covers the whole run (%d steps): using no warm-up",
            warmup_epochs,
            total_steps,
        )
        warmup = 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
