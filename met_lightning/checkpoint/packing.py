"""The trainable state as stored: 1-bit weights packed 8 signs per byte, every other tensor as is.

A 1-bit weight (`models.binary.BinaryParts`) is stored as `NAME.signs` (uint8 [ceil(n/8)]),
`NAME.mu` and `NAME.sigma` (fp32 [1]); loading rebuilds the same, bit-identical `BinaryParts`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from met_lightning.errors import CheckpointError
from met_lightning.models.binary import BinaryParts, QuantLinear, binary_weights

# suffixes of the three tensors that replace one quantized weight in an export
PACKED_SUFFIXES = (".signs", ".mu", ".sigma")


def pack(parts: BinaryParts, name: str) -> dict[str, torch.Tensor]:
    """`{name.signs: uint8 [ceil(n/8)], name.mu: fp32 [1], name.sigma: fp32 [1]}`."""
    bits = np.packbits(parts.positive.flatten().cpu().numpy().astype(np.uint8))
    return {
        f"{name}.signs": torch.from_numpy(bits),
        f"{name}.mu": parts.mu.reshape(1).cpu(),
        f"{name}.sigma": parts.sigma.reshape(1).cpu(),
    }


def unpack(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> BinaryParts:
    """Inverse of `pack` for a weight of `shape`; CheckpointError if the sizes disagree."""
    signs, mu, sigma = (tensors[name + s] for s in PACKED_SUFFIXES)
    numel = math.prod(shape)
    if signs.dtype != torch.uint8 or signs.numel() != (numel + 7) // 8:
        raise CheckpointError(
            f"{name}: {signs.numel()} packed sign bytes of dtype {signs.dtype} do not fit a "
            f"weight of shape {list(shape)} (expected {(numel + 7) // 8} uint8)"
        )
    bits = np.unpackbits(signs.numpy(), count=numel).reshape(tuple(shape))
    positive = torch.from_numpy(bits > 0)
    return BinaryParts(mu.float().reshape(()), sigma.float().reshape(()), positive)


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
            tensors.update(pack(layer.binary_parts(), name))
        else:
            tensors[name] = param.detach().cpu().contiguous()
    return tensors


def check_shapes(net: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` unless `tensors` have exactly the names and shapes that
    `export_state(net)` would store (computed from the parameters' shapes: `net` may be on the
    meta device)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    expected: dict[str, tuple[int, ...]] = {}
    for name, param, layer in _trainable(net):
        if layer is None:
            expected[name] = tuple(param.shape)
        else:
            signs = (math.prod(param.shape) + 7) // 8
            expected.update({f"{name}.signs": (signs,), f"{name}.mu": (1,), f"{name}.sigma": (1,)})
    if set(shapes) != set(expected):
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise CheckpointError(
            f"checkpoint {source!r} does not match the network its config builds "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    wrong = [n for n in sorted(expected) if tuple(shapes[n]) != expected[n]]
    if wrong:
        name = wrong[0]
        raise CheckpointError(
            f"checkpoint {source!r}: {name} has shape {list(shapes[name])}, the network its "
            f"config builds expects {list(expected[name])} ({len(wrong)} tensor(s) differ)"
        )


def load_export(net: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `export_state` tensors into `net`; CheckpointError naming `source` if they differ."""
    check_shapes(net, tensors, source)
    plain = {}
    for name, param, layer in _trainable(net):
        if layer is not None:
            layer.load_binary(unpack(tensors, name, param.shape))
        else:
            plain[name] = tensors[name]
    net.load_state_dict(plain, strict=False)


def storage_bytes(net: nn.Module) -> int:
    """Bytes of the trainable state as `export_state` stores it (computed, nothing copied)."""
    return sum(
        (math.ceil(p.numel() / 8) + 8) if layer is not None else p.numel() * p.element_size()
        for _, p, layer in _trainable(net)
    )
