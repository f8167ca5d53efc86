"""1-bit adapter projections (Jie et al., "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy") and their packed export.

Each quantized weight matrix is stored as its sign bits plus two numbers::

    W_q = mu + 0.6745 * sigma * sign((W - mu) / sigma)      mu, sigma: mean and std over the matrix

Training keeps the full-precision W ("latent" weights) and uses W_q in the forward pass with a
straight-through gradient. The export stores the signs packed 8 per byte and mu, sigma in fp32;
loading rebuilds W_q with the same function, so predictions are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from met_lightning.errors import CheckpointError

SIGN_SCALE = 0.6745  # the median of |z| for z ~ N(0, 1) (its 75th percentile)
BITS = (1, 32)
# suffixes of the three tensors that replace one quantized weight in an export
PACKED_SUFFIXES = (".signs", ".mu", ".sigma")


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

    def pack(self, name: str) -> dict[str, torch.Tensor]:
        """`{name.signs: uint8 [ceil(n/8)], name.mu: fp32 [1], name.sigma: fp32 [1]}`."""
        bits = np.packbits(self.positive.flatten().cpu().numpy().astype(np.uint8))
        return {
            f"{name}.signs": torch.from_numpy(bits),
            f"{name}.mu": self.mu.reshape(1).cpu(),
            f"{name}.sigma": self.sigma.reshape(1).cpu(),
        }

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> BinaryParts:
        """Inverse of `pack` for a weight of `shape`; CheckpointError if the sizes disagree."""
        signs, mu, sigma = (tensors[name + s] for s in PACKED_SUFFIXES)
        numel = math.prod(shape)
        if signs.dtype != torch.uint8 or signs.numel() != (numel + 7) // 8:
            raise CheckpointError(
                f"{name}: {signs.numel()} packed sign bytes of dtype {signs.dtype} do not fit a "
                f"weight of shape {list(shape)} (expected {(numel + 7) // 8} uint8)"
            )
        bits = np.unpackbits(signs.numpy(), count=numel).reshape(tuple(shape))
        return cls(mu.float().reshape(()), sigma.float().reshape(()), torch.from_numpy(bits > 0))


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
    """`nn.Linear` whose weight is used at `bits` = 32 (as is) or 1 (`binarize`d) precision.

    After `load_binary` the weight holds the exported 1-bit values and is used as is.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 32) -> None:
        super().__init__(in_features, out_features)
        if bits not in BITS:
            raise ValueError(f"bits={bits} must be one of {BITS}")
        self.bits = bits
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


def _trainable(net: nn.Module) -> Iterator[tuple[str, nn.Parameter, QuantLinear | None]]:
    """(name, parameter, its 1-bit layer or None) of every trainable parameter of `net`."""
    binary = binary_weights(net)
    for name, param in net.named_parameters():
        if param.requires_grad:
            yield name, param, binary.get(name)


def export_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors as stored: 1-bit weights packed (`PACKED_SUFFIXES`), the rest as is."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param, layer in _trainable(net):
        if layer is not None:
            tensors.update(layer.binary_parts().pack(name))
        else:
            tensors[name] = param.detach().cpu().contiguous()
    return tensors


def export_state_keys(net: nn.Module) -> list[str]:
    """The names `export_state` stores, without computing the tensors."""
    keys = []
    for name, _, layer in _trainable(net):
        keys += [name + s for s in PACKED_SUFFIXES] if layer is not None else [name]
    return keys


def load_export(net: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `export_state` tensors into `net`; CheckpointError naming `source` if they differ."""
    expected = set(export_state_keys(net))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(
            f"checkpoint {source!r} does not match the network its config builds "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    plain = {}
    for name, param, layer in _trainable(net):
        if layer is not None:
            layer.load_binary(BinaryParts.unpack(tensors, name, param.shape))
            continue
        if tensors[name].shape != param.shape:
            raise CheckpointError(
                f"checkpoint {source!r}: {name} has shape {list(tensors[name].shape)}, the "
                f"network expects {list(param.shape)}"
            )
        plain[name] = tensors[name]
    net.load_state_dict(plain, strict=False)


def storage_bytes(net: nn.Module) -> int:
    """Bytes of the trainable state as `export_state` stores it: a 1-bit weight is its packed
    signs plus fp32 mu and sigma, every other tensor its own bytes (computed, nothing copied)."""
    return sum(
        (math.ceil(p.numel() / 8) + 8) if layer is not None else p.numel() * p.element_size()
        for _, p, layer in _trainable(net)
    )
