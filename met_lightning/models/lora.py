"""LoRA on the slices of timm's fused `qkv` projection (Hu et al., 2021).

`LoRAQKV` wraps timm's fused `Linear(d, 3d)` and adds `scale * B_s A_s x` to the output slice of
each chosen site `s` in {q, k, v}; `A_s` [r, d] starts Kaiming-uniform and `B_s` [d, r] at zero
(the layer starts unchanged). `scale`: HF peft's `lora_alpha / r`. Parameters per site: `2 d r`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

LORA_SITES = ("q", "k", "v")


class LoRAQKV(nn.Module):
    """`qkv(x) + scale * [B_q A_q x | B_k A_k x | B_v A_v x]` for the chosen slices."""

    def __init__(self, qkv: nn.Linear, rank: int, sites: Sequence[str], scale: float) -> None:
        super().__init__()
        dim = qkv.in_features
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * dim:
            raise ValueError(f"LoRAQKV wraps timm's fused qkv nn.Linear(d, 3d), got {qkv}")
        self.base = qkv
        self.dim = dim
        self.rank = int(rank)
        self.scale = float(scale)
        self.sites = tuple(sites)
        self.lora_a = nn.ParameterDict({s: torch.empty(rank, dim) for s in self.sites})
        self.lora_b = nn.ParameterDict({s: torch.zeros(dim, rank) for s in self.sites})
        for a in self.lora_a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for site in self.sites:
            j = LORA_SITES.index(site)
            delta = (x @ self.lora_a[site].t()) @ self.lora_b[site].t()
            out[..., j * self.dim : (j + 1) * self.dim] += self.scale * delta
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sites={list(self.sites)}, scale={self.scale}"


def add_lora(blocks: nn.ModuleList, rank: int, sites: Sequence[str], scale: float) -> None:
    """Wrap `attn.qkv` of every block in `LoRAQKV` (in place); ValueError, before any change, if
    a block is already wrapped."""
    wrapped = [i for i, blk in enumerate(blocks) if isinstance(blk.attn.qkv, LoRAQKV)]
    if wrapped:
        raise ValueError(
            f"attn.qkv of block(s) {wrapped} is already wrapped in LoRAQKV: this backbone already "
            "carries a LoRA; build the new LoRA network on a fresh backbone (e.g. create_backbone "
            "again, or copy.deepcopy the plain one before wrapping)"
        )
    for blk in blocks:
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, rank, sites, scale)
