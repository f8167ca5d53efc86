"""Confidence of an exit's prediction: the score an early-exit threshold is compared with."""

from __future__ import annotations

import torch

from met_lightning.errors import ConfigError

CONFIDENCE_KINDS = ("max_softmax", "margin", "neg_entropy")
DEFAULT_CONFIDENCE = CONFIDENCE_KINDS[0]


def check_confidence(kind: str, key: str = "confidence") -> str:
    """`kind` if it is a known confidence, else a ConfigError naming `key`."""
    if kind not in CONFIDENCE_KINDS:
        raise ConfigError(f"{key}={kind!r} must be one of {list(CONFIDENCE_KINDS)}")
    return kind


def confidence(logits: torch.Tensor, kind: str = DEFAULT_CONFIDENCE) -> torch.Tensor:
    """Confidence of each prediction in `logits` [..., C] -> [...] (higher = more confident).

    max_softmax: the top softmax probability; margin: top-1 minus top-2 probability;
    neg_entropy: minus the entropy of the softmax (0 for a one-hot prediction).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if check_confidence(kind) == "max_softmax":  # a ConfigError if unknown
        return log_probs.max(dim=-1).values.exp()
    if kind == "margin":
        if logits.shape[-1] < 2:
            return torch.ones(logits.shape[:-1], device=logits.device)
        top2 = log_probs.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return (log_probs.exp() * log_probs).sum(dim=-1)  # neg_entropy
