"""Bottleneck adapters: MET's E-adapter and AdaptFormer's parallel adapter.

Both have a down-projection `W_down` [r, d] and an up-projection `W_up` [d, r], zero-initialized
up-projection (the adapter starts as a no-op) and optional 1-bit projections (`bits=1`, see
`models.binary`).
"""

from __future__ import annotations

import torch
from torch import nn

from met_lightning.models.binary import QuantLinear


class _Bottleneck(nn.Module):
    def __init__(self, dim: int, rank: int, bits: int) -> None:
        super().__init__()
        self.down = QuantLinear(dim, rank, bits)
        self.up = QuantLinear(rank, dim, bits)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"dim={self.up.out_features}, rank={self.down.out_features}, bits={self.up.bits}"


class EAdapter(_Bottleneck):
    """`E_k(t) = t + W_up (gamma_k * GELU(W_down t + b_down)) + b_up` for a token `t` of stream `k`.

    `W_down` [r, d], `W_up` [d, r] and their biases are shared; `gamma` [num_gammas, r] holds one
    diagonal per exit (`num_gammas = K`) or a single shared one (`num_gammas = 1`).
    Init: `W_up = 0, b_up = 0, gamma = 1`, so the adapter starts as the identity.
    Trainable parameters: `2 d r + r + d + num_gammas r`.
    """

    def __init__(self, dim: int, rank: int, num_gammas: int, bits: int = 32) -> None:
        super().__init__(dim, rank, bits)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.ones(num_gammas, rank))

    def forward(self, x: torch.Tensor, rows: int | slice | torch.Tensor = 0) -> torch.Tensor:
        """x: [B, T, d] tokens; `rows`: the gamma row (exit) that scales them all (an int: gamma
        [r]) or one row per token position (a slice of T rows or a long [T] index: gamma [T, r]).

        gamma is cast to the bottleneck's dtype, so it never promotes bf16 activations.
        """
        h = self.act(self.down(x))  # [B, T, r]
        return x + self.up(h * self.gamma[rows].to(h.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gammas={len(self.gamma)}"


class ParallelAdapter(_Bottleneck):
    """AdaptFormer's AdaptMLP: `s * (W_up ReLU(W_down x + b_down) + b_up)`, beside the MLP.

    The block becomes `x = x + MLP(LN2(x)) + s * adapter(x)` (Chen et al., 2022; scale s = 0.1,
    no layer norm inside the adapter, zero biases at init, as in their released ViT code).
    Trainable parameters: `2 d r + r + d`.
    """

    def __init__(self, dim: int, rank: int, scale: float = 0.1, bits: int = 32) -> None:
        super().__init__(dim, rank, bits)
        nn.init.zeros_(self.down.bias)
        self.act = nn.ReLU()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
