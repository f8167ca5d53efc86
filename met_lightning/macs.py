"""Analytic multiply-accumulates (MACs) per image of a multi-exit ViT.

Counts the matrix products (patch embedding, qkv, attention scores and values, projection, MLP,
adapters, heads) as FLOP counters do; norms, softmax and additions are left out (< 1 %).
Attention over `T` live tokens costs `2 T^2 d` whatever the mask, because it is computed densely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from met_lightning.models.backbone import BackboneSpec


@dataclass(frozen=True)
class ExitCosts:
    """MACs per image to reach each exit, and of the plain frozen backbone for reference."""

    to_exit: tuple[int, ...]  # cumulative: patch embed + blocks 1..e_k + adapters + heads 1..k
    backbone: int  # the plain ViT: patch embed + all blocks, one class token, no head

    @property
    def full(self) -> int:
        return self.to_exit[-1]

    def fraction(self, k: int) -> float:
        return self.to_exit[k] / self.full


def block_macs(
    spec: BackboneSpec, num_tokens: int, adapter_rank: int = 0, num_sites: int = 0
) -> int:
    """MACs of one transformer block over `num_tokens` tokens, with its E-adapters."""
    t, d, m = num_tokens, spec.embed_dim, spec.mlp_hidden
    attention = t * d * 3 * d + 2 * t * t * d + t * d * d
    mlp = 2 * t * d * m
    adapters = num_sites * t * 2 * d * adapter_rank
    return attention + mlp + adapters


def patch_embed_macs(spec: BackboneSpec) -> int:
    return spec.num_patches * spec.patch_size**2 * spec.in_chans * spec.embed_dim


def exit_costs(
    spec: BackboneSpec,
    exits: Sequence[int],
    num_classes: int,
    adapter_rank: int = 0,
    num_sites: int = 0,
    separate_cls: bool = True,
) -> ExitCosts:
    """MACs per image to reach each exit of a MultiExitViT (heads 1..k-1 included at exit k)."""
    base_tokens = spec.num_prefix_tokens + spec.num_patches
    total, prev, to_exit = patch_embed_macs(spec), 0, []
    for stage, block in enumerate(exits):
        early = len(exits) - 1 - stage if separate_cls else 0
        per_block = block_macs(spec, base_tokens + early, adapter_rank, num_sites)
        total += (block - prev) * per_block + spec.embed_dim * num_classes
        to_exit.append(total)
        prev = block
    backbone = patch_embed_macs(spec) + spec.depth * block_macs(spec, base_tokens)
    return ExitCosts(tuple(to_exit), backbone)


def model_exit_costs(model) -> ExitCosts:  # noqa: ANN001 - MultiExitViT, avoids an import cycle
    """`exit_costs` for a built MultiExitViT."""
    return exit_costs(
        model.spec, model.exits, model.num_classes, model.rank, len(model.sites), model.separate_cls
    )


def format_macs(macs: float) -> str:
    """Human-readable MACs: '17.58 GMACs', '12.3 MMACs'."""
    for unit, scale in (("GMACs", 1e9), ("MMACs", 1e6), ("KMACs", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f} MACs"
