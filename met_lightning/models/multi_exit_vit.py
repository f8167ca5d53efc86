"""The multi-exit ViT of MET: frozen timm ViT, E-adapters, a class-token stream and head per exit.

Token layout entering block 1 (``separate_cls=true``, K exits)::

    [c_1, ..., c_{K-1}, c_K, R, P]      c_k: class token of exit k, R: register tokens, P: patches

``c_K`` is the backbone's own class token. ``c_k`` (k < K) lives in blocks ``1..e_k``: after block
``e_k`` head k reads it and it is dropped, so the early class token about to leave is always at
position 0. Queries of ``c_K, R, P`` attend to ``{c_K, R, P}`` only (the plain ViT), the query of
``c_k`` attends to ``{c_k, R, P}``. With ``separate_cls=false`` there are no early tokens and every
exit reads ``c_K``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from met_lightning.errors import ConfigError
from met_lightning.models.adapters import EAdapter
from met_lightning.models.backbone import spec_of

ADAPTER_SITES = ("attn", "mlp")


class MultiExitOutput(NamedTuple):
    logits: torch.Tensor  # [B, K, C]
    features: torch.Tensor  # [B, K, d]: input of each head (after LN_k)


def check_exits(exits: Sequence[int], depth: int, key: str = "model.exits") -> tuple[int, ...]:
    """Validate 1-based exit blocks: non-empty, strictly increasing, in 1..depth, last = depth."""
    exits = tuple(int(e) for e in exits)
    if not exits:
        raise ConfigError(f"{key} is empty; give at least the last block, e.g. {key}=[{depth}]")
    if len(set(exits)) != len(exits):
        raise ConfigError(f"{key}={list(exits)} has duplicate blocks; list each exit once")
    if list(exits) != sorted(exits):
        raise ConfigError(f"{key}={list(exits)} is not sorted; use {key}={sorted(exits)}")
    bad = [e for e in exits if not 1 <= e <= depth]
    if bad:
        raise ConfigError(
            f"{key}={list(exits)}: block(s) {bad} outside 1..{depth} (the backbone has {depth} "
            "blocks; exits are 1-based block indices)"
        )
    if exits[-1] != depth:
        raise ConfigError(
            f"{key}={list(exits)} must end with the last block {depth} (the main exit)"
        )
    return exits


def check_adapter(rank: int, exit_specific: bool, separate_cls: bool, sites: Sequence[str]) -> None:
    """Validate the E-adapter switches (keys under model.adapter)."""
    if int(rank) <= 0:
        raise ConfigError(f"model.adapter.rank={rank} must be a positive integer (default 8)")
    if exit_specific and not separate_cls:
        raise ConfigError(
            "model.adapter.exit_specific=true needs model.adapter.separate_cls=true: without "
            "separate class tokens every exit reads the same token, so there is nothing to scale "
            "per exit. Set model.adapter.exit_specific=false or model.adapter.separate_cls=true."
        )
    unknown = [s for s in sites if s not in ADAPTER_SITES]
    if unknown or len(set(sites)) != len(sites):
        raise ConfigError(
            f"model.adapter.sites={list(sites)}: each site must be one of {list(ADAPTER_SITES)}, "
            "listed once (use [] for no adapters)"
        )


class MultiExitViT(nn.Module):
    """Frozen timm ViT + E-adapters + ``LN_k -> Linear`` head after each exit block."""

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        exits: Sequence[int],
        rank: int = 8,
        exit_specific: bool = True,
        separate_cls: bool = True,
        sites: Sequence[str] = ADAPTER_SITES,
    ) -> None:
        super().__init__()
        self.spec = spec_of(backbone)
        self.exits = check_exits(exits, self.spec.depth)
        check_adapter(rank, exit_specific, separate_cls, sites)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_exits = len(self.exits)
        self.separate_cls = bool(separate_cls)
        self.exit_specific = bool(exit_specific)
        self.rank = int(rank)
        self.sites = tuple(sites)

        dim, depth, k = self.spec.embed_dim, self.spec.depth, self.num_exits
        num_gammas = k if exit_specific else 1
        self.adapters = nn.ModuleDict(
            {s: nn.ModuleList(EAdapter(dim, rank, num_gammas) for _ in range(depth)) for s in sites}
        )
        self.norms = nn.ModuleList(copy.deepcopy(backbone.norm) for _ in range(k))
        for param in self.norms.parameters():
            param.requires_grad_(True)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(k))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        # small per-layout tensors, built once per (layout, device)
        self._mask_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._gamma_index_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, backbone: VisionTransformer, num_classes: int, model: Any) -> MultiExitViT:
        """Build from the `model` config group (exits, adapter.*)."""
        adapter = model.adapter
        return cls(
            backbone,
            num_classes,
            exits=list(model.exits),
            rank=adapter.rank,
            exit_specific=adapter.exit_specific,
            separate_cls=adapter.separate_cls,
            sites=list(adapter.sites),
        )

    # ------------------------------------------------------------------ structure
    def train(self, mode: bool = True) -> MultiExitViT:
        """Train the added modules; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def num_early_tokens(self, stage: int) -> int:
        """Early class tokens alive in stage `stage` (0-based; blocks e_{stage-1}+1..e_stage)."""
        return self.num_exits - 1 - stage if self.separate_cls else 0

    def stage_blocks(self, stage: int) -> range:
        """0-based indices of the blocks run in exit stage `stage`."""
        start = self.exits[stage - 1] if stage > 0 else 0
        return range(start, self.exits[stage])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (everything but the frozen backbone)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ pieces
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, T, d] entering block 1 (layout in module docstring)."""
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        n_early = self.num_early_tokens(0)
        if n_early:
            x = torch.cat([x[:, :1].expand(-1, n_early, -1), x], dim=1)
        return x

    def attention_mask(self, n_early: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Boolean [T, T] mask, True where a query (row) may attend to a key (column)."""
        key = (n_early, num_tokens, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
            mask[n_early:, n_early:] = True  # c_K, R, P: the plain ViT
            early = torch.arange(n_early, device=device)
            mask[early, early] = True  # c_k sees itself ...
            mask[:n_early, n_early + 1 :] = True  # ... and R, P, not c_K nor other c_j
            self._mask_cache[key] = mask
        return mask

    def gamma_index(self, stage: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Exit (0-based) whose gamma scales each token position in `stage`; None if shared."""
        if not self.exit_specific:
            return None
        key = (stage, num_tokens, device)
        index = self._gamma_index_cache.get(key)
        if index is None:
            n_early = self.num_early_tokens(stage)
            index = torch.full((num_tokens,), self.num_exits - 1, dtype=torch.long, device=device)
            index[:n_early] = torch.arange(stage, stage + n_early, device=device)
            self._gamma_index_cache[key] = index
        return index

    def run_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks of exit stage `stage` on tokens x [B, T, d]."""
        n_early = self.num_early_tokens(stage)
        mask = self.attention_mask(n_early, x.shape[1], x.device) if n_early else None
        gamma_index = self.gamma_index(stage, x.shape[1], x.device)
        attn_adapters = self.adapters["attn"] if "attn" in self.adapters else None
        mlp_adapters = self.adapters["mlp"] if "mlp" in self.adapters else None
        for i in self.stage_blocks(stage):
            blk = self.backbone.blocks[i]
            if attn_adapters is not None:
                x = attn_adapters[i](x, gamma_index)
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=mask)))
            if mlp_adapters is not None:
                x = mlp_adapters[i](x, gamma_index)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x

    def exit_features(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Head input of exit `stage`: LN_k of the class token it reads (position 0). [B, d]"""
        return self.norms[stage](x[:, 0])

    def leave(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Drop the class token that exit `stage` has read, if it was an early one."""
        return x[:, 1:] if self.num_early_tokens(stage) else x

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MultiExitOutput:
        """All exits for every image: logits [B, K, C] and head inputs [B, K, d]."""
        x = self.embed(images)
        features = []
        for stage in range(self.num_exits):
            x = self.run_stage(stage, x)
            features.append(self.exit_features(stage, x))
            x = self.leave(stage, x)
        logits = [head(f) for head, f in zip(self.heads, features, strict=True)]
        return MultiExitOutput(torch.stack(logits, dim=1), torch.stack(features, dim=1))
