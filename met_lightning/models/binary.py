"""1-bit adapter projections (Jie et al., "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy").

``W_q = mu + 0.6745 * sigma * sign((W - mu) / sigma)`` (mu, sigma: mean and std over the matrix).
Training keeps the full-precision W and uses W_q with a straight-through gradient; checkpoints
store the signs packed and mu, sigma (`checkpoint.packing`); loading rebuilds W_q with the same
function, so predictions are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIGN_SCALE = 0.6745  # the median of |z| for z ~ N(0, 1) (its 75th percentile)
BITS = (1, 32)


@dataclass(frozen=True)
class BinaryParts:
    """What a 1-bit weight is made of: mean, std (0-d fp32) and where it is >= its mean."""

    mu: torch.Tensor
    sigma: torch.Tensor
    positive: torch.Tensor  # bool, the weight's shape

    @classmethod
    def of(cls, weight: torch.Tensor) -> BinaryParts:
        w = weight.detach().float()
        mu = w.mean()
        # sign((W - mu) / sigma) with sign(0) = +1, so a matrix takes exactly two values (one
        # when sigma = 0: a zero-initialized up-projection stays exactly 0)
        return cls(mu, w.std(unbiased=False), w >= mu)

    def weight(self) -> torch.Tensor:
        """`mu + 0.6745 sigma sign`: the one function both training and loading use."""
        signs = torch.where(self.positive, 1.0, -1.0).to(self.mu.device)
        return self.mu + (SIGN_SCALE * self.sigma) * signs


class _StraightThrough(torch.autograd.Function):
    """Forward: the 1-bit weight. Backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return BinaryParts.of(weight).weight().to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def binarize(weight: torch.Tensor) -> torch.Tensor:
    """The 1-bit version of `weight`, differentiable with a straight-through gradient."""
    return _StraightThrough.apply(weight)


class QuantLinear(nn.Linear):
    """`nn.Linear` whose weight is used at `bits` = 32 (as is) or 1 (`binarize`d) precision;
    after `load_binary` the weight holds the exported 1-bit values and is used as is."""

    def __init__(self, in_features: int, out_features: int, bits: int = 32) -> None:
        super().__init__(in_features, out_features)
        self.bits = bits  # checked by `AdapterConfig`
        self.loaded: BinaryParts | None = None

    def binary_parts(self) -> BinaryParts:
        return self.loaded if self.loaded is not None else BinaryParts.of(self.weight)

    def effective_weight(self) -> torch.Tensor:
        if self.bits == 32 or self.loaded is not None:
            return self.weight
        return binarize(self.weight)

    def load_binary(self, parts: BinaryParts) -> None:
        with torch.no_grad():
            self.weight.copy_(parts.weight())
        self.loaded = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def binary_weights(net: nn.Module) -> dict[str, QuantLinear]:
    """`{parameter name: layer}` of every 1-bit weight in `net`."""
    return {
        f"{name}.weight": m
        for name, m in net.named_modules()
        if isinstance(m, QuantLinear) and m.bits == 1
    }
