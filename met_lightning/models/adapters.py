"""E-adapter: a bottleneck adapter whose projections are shared by all exits, scaled per exit."""

from __future__ import annotations

import torch
from torch import nn


class EAdapter(nn.Module):
    """`E_k(t) = t + W_up (gamma_k * GELU(W_down t + b_down)) + b_up` for a token `t` of stream `k`.

    `W_down` [r, d], `W_up` [d, r] and their biases are shared; `gamma` [num_gammas, r] holds one
    diagonal per exit (`num_gammas = K`) or a single shared one (`num_gammas = 1`).
    Init: `W_up = 0, b_up = 0, gamma = 1`, so the adapter starts as the identity.
    Trainable parameters: `2 d r + r + d + num_gammas r`.
    """

    def __init__(self, dim: int, rank: int, num_gammas: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.ones(num_gammas, rank))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, gamma_index: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]; gamma_index: [T] exit of each token position (None: gamma[0] for all)."""
        h = self.act(self.down(x))  # [B, T, r]
        gamma = self.gamma[0] if gamma_index is None else self.gamma[gamma_index]  # [r] | [T, r]
        return x + self.up(h * gamma)

    def extra_repr(self) -> str:
        return (
            f"dim={self.up.out_features}, rank={self.down.out_features}, gammas={len(self.gamma)}"
        )


def e_adapter_params(dim: int, rank: int, num_gammas: int) -> int:
    """Trainable parameters of one E-adapter site (the spec's `2 d r + r + d + K r`)."""
    return 2 * dim * rank + rank + dim + num_gammas * rank
