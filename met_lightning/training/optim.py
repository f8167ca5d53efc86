"""AdamW without weight decay on norms, biases and MET's γ diagonals (timm's convention)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# names (last component) of parameters that never get weight decay, whatever their shape:
# MET's per-exit diagonals γ [K, r], timm's position embedding and class / register tokens
NO_DECAY_NAMES = frozenset({"gamma", "pos_embed", "cls_token", "reg_token"})


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether `param` gets no weight decay: 1-D or scalar (norms, biases, LayerScale) or named
    in NO_DECAY_NAMES."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def param_groups(
    params: Iterable[tuple[str, nn.Parameter]] | Iterable[nn.Parameter],
    decay_norm_bias: bool = False,
) -> list[dict[str, Any]]:
    """(Named) parameters -> non-empty groups "decay" and "no_decay" (weight_decay 0, `no_decay`;
    unnamed ones by shape only), or one group "all" when `decay_norm_bias`. LearningRateMonitor
    logs the group names (lr-AdamW/decay ...)."""
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    if decay_norm_bias:
        return [{"params": [p for _, p in named], "name": "all"}]
    decay = [p for n, p in named if not no_decay(n, p)]
    exempt = [p for n, p in named if no_decay(n, p)]
    groups = [{"params": decay, "name": "decay"},
              {"params": exempt, "name": "no_decay", "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` over `param_groups(params, decay_norm_bias)` for (name, parameter)
    pairs or parameters; groups (dicts) are passed through unchanged."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        decay_norm_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = param_groups(params, decay_norm_bias)
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
