"""The multi-exit ViT of MET: frozen timm ViT, E-adapters, a class-token stream and head per exit.

Token streams (``separate_cls=true``, K exits)::

    main  [B, T, d]: [c_K, R, P]          c_K: the backbone's class token, R: registers, P: patches
    early [B, E, d]: [c_{s+1}, ..., c_{K-1}]  the early class tokens alive in stage s (E = K-1-s)

``c_k`` (k < K) lives in blocks ``1..e_k``; head k reads it after block ``e_k`` and it is dropped,
so the token about to leave is always ``early[:, 0]``. Semantics (`attention_mask`): ``c_K, R, P``
attend to ``{c_K, R, P}`` (the plain ViT), ``c_k`` to ``{c_k, R, P}``. With
``separate_cls=false`` there are no early tokens and every exit reads ``c_K``.

`token_layout` (same numbers, different speed): ``streams`` runs the main stream unmasked (fused
attention) and the early tokens as a small side stream, fast on a GPU; ``joint`` concatenates
them once per stage and runs the mask (fewer kernel launches, fast on a CPU); ``auto``: streams on
CUDA, joint elsewhere. Between stages the state is the two streams. Both run in `StreamBlock`, a
timm pre-norm `Block` (same submodules and parameter names, timm's `forward` kept) with two more
entry points, `forward_streams` and `forward_joint`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from met_lightning.errors import ConfigError
from met_lightning.models.adapters import AdapterConfig, EAdapter, ParallelAdapter, add_lora
from met_lightning.models.backbone import spec_of
from met_lightning.structured import target_config

# timm ViT modules after the last block: MultiExitViT reads the class token through its own norms
UNUSED_BACKBONE_PARTS = ("norm", "fc_norm", "attn_pool", "head_drop", "head")
# how a stage runs the main and early streams (module docstring); auto: streams on CUDA only
TOKEN_LAYOUTS = ("auto", "streams", "joint")

# An adapter applied to a stream before a sub-layer: (tokens [B, n, d], stream) -> tokens
StreamAdapter = Callable[[torch.Tensor, str], torch.Tensor]


class BlockAdapters(NamedTuple):
    """`attn(tokens, stream)` / `mlp` rewrite a stream ("main", "early", "joint") before the
    attention / MLP (E-adapters); `parallel(tokens)` is added beside the MLP (AdaptFormer)."""

    attn: StreamAdapter | None = None
    mlp: StreamAdapter | None = None
    parallel: nn.Module | None = None


NO_ADAPTERS = BlockAdapters()


class StreamBlock(Block):
    """A timm `Block` that also runs MET's main sequence and early class-token stream."""

    @classmethod
    def from_block(cls, block: Block) -> StreamBlock:
        """The same block (shared submodules and parameters, same names) as a StreamBlock."""
        if isinstance(block, cls):
            return block
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            setattr(new, name, child)
        for name, value in vars(block).items():  # plain attributes (none in timm 1.0 Block)
            if not name.startswith("_"):
                setattr(new, name, value)
        return new

    def _eye(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The identity [n, n], made once per (n, dtype, device): no allocation per call."""
        cache = self.__dict__.setdefault("_eye_cache", {})
        if (n, dtype, device) not in cache:
            cache[n, dtype, device] = torch.eye(n, dtype=dtype, device=device)
        return cache[n, dtype, device]

    def _qkv(self, h: torch.Tensor):
        """h [B, n, d] -> q, k, v [B, heads, n, head_dim] (timm's projection and qk norms) and
        (k, v) as [B, n, heads * head_dim] views (None if a key norm rewrites k)."""
        attn = self.attn
        b, n, _ = h.shape
        flat = attn.qkv(h)  # [B, n, 3 * heads * head_dim]
        qkv = flat.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        width = attn.num_heads * attn.head_dim
        kv = None
        if isinstance(attn.k_norm, nn.Identity):
            kv = (flat[..., width : 2 * width], flat[..., 2 * width :])
        return attn.q_norm(q), attn.k_norm(k), v, kv

    def _out(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Attention output o [B, heads, n, head_dim] -> sub-layer output [B, n, d]."""
        attn = self.attn
        b, _, n, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, n, attn.attn_dim))
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        return self.drop_path1(self.ls1(attn.proj_drop(attn.proj(o))))

    def _attend_main(self, q, k, v) -> torch.Tensor:
        attn = self.attn
        if attn.fused_attn:
            p = attn.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        return attn.attn_drop(scores.softmax(dim=-1)) @ v

    def _attend_early(self, q_e, k_e, v_e, k, v, kv=None) -> torch.Tensor:
        """Early queries q_e [B, H, E, hd] over keys {own, R, P} -> [B, H, E, hd].

        `kv`: the main keys and values as [B, T, d] views (None when a key norm rewrites them);
        then the products run per image over all heads with a block-diagonal query [B, H*E, d]
        (H times the tiny early work) instead of copying the strided K and V per (image, head).
        """
        attn = self.attn
        q_e = q_e * attn.scale
        b, h, e, hd = q_e.shape
        if kv is not None:
            keys, values = kv  # [B, T, d] each, strided views
            eye = self._eye(h, q_e.dtype, q_e.device)
            q_bd = (q_e.unsqueeze(3) * eye[:, None, :, None]).reshape(b, h * e, h * hd)
            scores = (q_bd @ keys.transpose(-2, -1)).view(b, h, e, -1)  # [B, H, E, T]
        else:
            scores = q_e @ k.transpose(-2, -1)  # [B, H, E, T]
        own = (q_e * k_e).sum(dim=-1, keepdim=True)  # [B, H, E, 1]
        scores = torch.cat([own.to(scores.dtype), scores[..., 1:]], dim=-1)
        probs = attn.attn_drop(scores.softmax(dim=-1))
        if kv is not None:
            out = (probs.reshape(b, h * e, -1).to(values.dtype) @ values).view(b, h, e, h, hd)
            out = torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2)  # [B, H, E, hd]
        else:
            out = probs @ v
        # sum_j p_j v_j with v_0 := v_e:  p @ v - p_0 v_cK + p_0 v_e
        own_p = probs[..., :1]
        return out + own_p * (v_e - v[:, :, :1])

    def forward_streams(
        self, x: torch.Tensor, e: torch.Tensor | None, adapters: BlockAdapters = NO_ADAPTERS
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on main tokens x [B, T, d] (``c_K, R, P``) and early tokens e [B, E, d] (or
        None). x runs unmasked, flash-eligible attention; e attends to the main keys / values of
        ``R, P`` and to its own (the ``c_K`` column replaced by the token's own score and value),
        reading the main keys and values in place as strided views of the qkv projection: nothing
        of size T is copied. Nothing in the main path reads e."""
        adapt_attn, adapt_mlp, parallel = adapters
        if adapt_attn is not None:
            x, e = adapt_attn(x, "main"), None if e is None else adapt_attn(e, "early")
        h = self.norm1(x)
        q, k, v, kv = self._qkv(h)
        x_attn = self._out(self._attend_main(q, k, v), h)
        if e is not None:
            h_e = self.norm1(e)
            q_e, k_e, v_e, _ = self._qkv(h_e)
            e = e + self._out(self._attend_early(q_e, k_e, v_e, k, v, kv), h_e)
        x = x + x_attn
        if adapt_mlp is not None:
            x, e = adapt_mlp(x, "main"), None if e is None else adapt_mlp(e, "early")
        x = x + self._mlp(x, parallel)
        if e is not None:
            e = e + self._mlp(e, parallel)
        return x, e

    def forward_joint(
        self, x: torch.Tensor, mask: torch.Tensor | None, adapters: BlockAdapters = NO_ADAPTERS
    ) -> torch.Tensor:
        """One block on x [B, E + T, d] = [early, main] with the boolean mask [E + T, E + T]
        (True: may attend); the same numbers as `forward_streams`."""
        adapt_attn, adapt_mlp, parallel = adapters
        if adapt_attn is not None:
            x = adapt_attn(x, "joint")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask)))
        if adapt_mlp is not None:
            x = adapt_mlp(x, "joint")
        return x + self._mlp(x, parallel)

    def _mlp(self, x: torch.Tensor, parallel: nn.Module | None) -> torch.Tensor:
        out = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return out + parallel(x) if parallel is not None else out


class StreamState(NamedTuple):
    """The tokens between stages: main [B, T, d] (c_K, R, P) and early [B, E, d] or None."""

    main: torch.Tensor
    early: torch.Tensor | None


class MultiExitOutput(NamedTuple):
    logits: torch.Tensor  # [B, K, C]
    features: torch.Tensor  # [B, K, d]: input of each head (after LN_k)


def check_exits(exits: Sequence[int], depth: int, key: str = "model.net.exits") -> tuple[int, ...]:
    """Validate exit blocks and return them 1-based: non-empty, strictly increasing, in 1..depth,
    the last one = depth. Negative values count from the end as in Python: -1 is the last block.
    """
    given = [int(e) for e in exits]
    if not given:
        raise ConfigError(f"{key} is empty; give at least the last block, e.g. {key}=[{depth}]")
    if bad := [e for e in given if not (1 <= e <= depth or -depth <= e <= -1)]:
        raise ConfigError(
            f"{key}={given}: block(s) {bad} outside 1..{depth} (the backbone has {depth} "
            f"blocks; exits are 1-based block indices, or -1..-{depth} counted from the end)"
        )
    exits = tuple(e if e > 0 else depth + 1 + e for e in given)
    if len(set(exits)) != len(exits):
        raise ConfigError(f"{key}={given} has duplicate blocks; list each exit once")
    if list(exits) != sorted(exits):
        raise ConfigError(f"{key}={given} is not sorted; use {key}={sorted(exits)}")
    if exits[-1] != depth:
        raise ConfigError(f"{key}={given} must end with the last block {depth} (the main exit)")
    return exits


def check_token_layout(layout: str) -> str:
    """`layout` if it is one of TOKEN_LAYOUTS (model.net.token_layout), else a ConfigError."""
    if layout not in TOKEN_LAYOUTS:
        raise ConfigError(
            f"model.net.token_layout={layout!r} must be one of {list(TOKEN_LAYOUTS)} (auto: "
            "streams on CUDA, joint elsewhere; all give the same numbers)"
        )
    return layout


class MultiExitViT(nn.Module):
    """Frozen timm ViT + adapters + ``LN_k -> Linear`` head after each exit block.

    `adapter` (an `AdapterConfig` or its fields): E-adapters, AdaptFormer, LoRA or none (one
    exit and none: a linear probe); `finetune_backbone=True` trains the backbone too. The
    backbone's blocks become `StreamBlock`s (same parameter names).

    Stage API, the one sequence `forward`, the early-exit engine and the ONNX graphs run::

        state = images
        for k in range(net.num_exits):
            state, features, logits = net.stage(k, state)  # logits [B, C]; state None after K
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        exits: Sequence[int] = (3, 6, 9, 12),
        adapter: AdapterConfig | Mapping[str, Any] | None = None,
        finetune_backbone: bool = False,
        token_layout: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(adapter, AdapterConfig):
            adapter = AdapterConfig(**(adapter or {}))
        self.spec = spec_of(backbone)
        self.exits = check_exits(exits, self.spec.depth)
        self.adapter = adapter
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_exits = len(self.exits)
        self.separate_cls = bool(adapter.separate_cls)
        self.exit_specific = bool(adapter.exit_specific)
        self.rank = adapter.rank if adapter.kind != "none" else 0
        self.sites = tuple(adapter.sites)
        self.finetune_backbone = bool(finetune_backbone)
        self.token_layout = token_layout  # checked by the property setter
        for i, blk in enumerate(backbone.blocks):  # same parts and names, one more entry point
            backbone.blocks[i] = StreamBlock.from_block(blk)
        if self.finetune_backbone:
            backbone.requires_grad_(True)
            # parts this network never runs (each exit has its own LN_k and head) stay frozen:
            # DDP with find_unused_parameters=false needs a gradient for every trainable one
            for name in UNUSED_BACKBONE_PARTS:
                part = getattr(backbone, name, None)
                if isinstance(part, nn.Module):
                    part.requires_grad_(False)

        dim, depth, k = self.spec.embed_dim, self.spec.depth, self.num_exits
        # E-adapters, keyed by site, run before the sub-layer; AdaptFormer's run beside the MLP
        self.adapters = nn.ModuleDict()
        self.parallel_adapters: nn.ModuleList | None = None
        if adapter.kind == "e_adapter":
            gammas = k if adapter.exit_specific else 1
            for site in adapter.sites:
                self.adapters[site] = nn.ModuleList(
                    EAdapter(dim, adapter.rank, gammas, adapter.bits) for _ in range(depth)
                )
        elif adapter.kind == "adaptformer" and adapter.sites:
            self.parallel_adapters = nn.ModuleList(
                ParallelAdapter(dim, adapter.rank, adapter.multiplier, adapter.bits)
                for _ in range(depth)
            )
        elif adapter.kind == "lora" and adapter.sites:
            add_lora(backbone.blocks, adapter.rank, adapter.sites, adapter.multiplier)
        self.norms = nn.ModuleList(copy.deepcopy(backbone.norm) for _ in range(k))
        self.norms.requires_grad_(True)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(k))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        # the joint layout's attention masks and gamma indices, per (kind, sizes, device)
        self._joint_cache: dict[tuple, torch.Tensor] = {}

    @property
    def token_layout(self) -> str:
        """How stages run the two token streams: auto | streams | joint (module docstring)."""
        return self._token_layout

    @token_layout.setter
    def token_layout(self, layout: str) -> None:
        self._token_layout = check_token_layout(layout)

    def runs_joint(self, tokens: torch.Tensor) -> bool:
        """Whether a stage on `tokens`' device uses the joint layout."""
        if self._token_layout == "auto":
            return tokens.device.type != "cuda"
        return self._token_layout == "joint"

    # ------------------------------------------------------------------ structure
    def train(self, mode: bool = True) -> MultiExitViT:
        """Train the added modules; a frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.train(mode and self.finetune_backbone)
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

    # ------------------------------------------------------------------ pieces of `stage`
    def embed(self, images: torch.Tensor) -> StreamState:
        """images [B, C, H, W] -> the streams entering block 1 (layout in module docstring)."""
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        n_early = self.num_early_tokens(0)
        early = x[:, :1].expand(-1, n_early, -1) if n_early else None
        return StreamState(x, early)

    def attention_mask(self, n_early: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Boolean [T, T] over ``[c_1..c_{K-1}, c_K, R, P]``: True where a query (row) may attend
        to a key (column)."""
        key = ("mask", n_early, num_tokens, device)
        if key not in self._joint_cache:
            mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
            mask[n_early:, n_early:] = True  # c_K, R, P: the plain ViT
            early = torch.arange(n_early, device=device)
            mask[early, early] = True  # c_k sees itself ...
            mask[:n_early, n_early + 1 :] = True  # ... and R, P, not c_K nor other c_j
            self._joint_cache[key] = mask
        return self._joint_cache[key]

    def gamma_rows(self, stage: int) -> tuple[int, slice]:
        """E-adapter gamma rows of `stage`'s main stream (one exit) and early tokens (one each)."""
        if not self.exit_specific:
            return 0, slice(0, 1)
        return self.num_exits - 1, slice(stage, stage + self.num_early_tokens(stage))

    def gamma_index(self, stage: int, num_tokens: int, device: torch.device) -> int | torch.Tensor:
        """The gamma row of each token of `stage`'s joint sequence ``[early, main]``: long
        [num_tokens]; 0 when gamma is shared."""
        if not self.exit_specific:
            return 0
        key = ("gamma", stage, num_tokens, device)
        if key not in self._joint_cache:
            main_row, early_rows = self.gamma_rows(stage)
            rows = [*range(early_rows.start, early_rows.stop)]
            rows += [main_row] * (num_tokens - len(rows))
            self._joint_cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._joint_cache[key]

    def block_adapters(
        self, block: int, stage: int, joint_rows: int | torch.Tensor | None = None
    ) -> BlockAdapters:
        """The adapters of `block` in exit stage `stage` (`joint_rows`: `gamma_index`'s)."""
        main_rows, early_rows = self.gamma_rows(stage)
        rows = {"main": main_rows, "early": early_rows, "joint": joint_rows}

        def site(name: str) -> StreamAdapter | None:
            if name not in self.adapters:
                return None
            adapter = self.adapters[name][block]
            return lambda tokens, stream: adapter(tokens, rows[stream])

        parallel = self.parallel_adapters
        return BlockAdapters(site("attn"), site("mlp"), parallel[block] if parallel else None)

    def run_stage(self, stage: int, state: StreamState) -> StreamState:
        """Run the blocks of exit stage `stage` on both streams (in `token_layout`)."""
        x, e = state
        if e is not None and self.runs_joint(x):
            n_early = e.shape[1]
            xs = torch.cat([e, x], dim=1)  # once per stage, not per block
            mask = self.attention_mask(n_early, xs.shape[1], xs.device)
            rows = self.gamma_index(stage, xs.shape[1], xs.device)
            for i in self.stage_blocks(stage):
                adapters = self.block_adapters(i, stage, rows)
                xs = self.backbone.blocks[i].forward_joint(xs, mask, adapters)
            return StreamState(xs[:, n_early:], xs[:, :n_early])
        for i in self.stage_blocks(stage):
            x, e = self.backbone.blocks[i].forward_streams(x, e, self.block_adapters(i, stage))
        return StreamState(x, e)

    def leave(self, stage: int, state: StreamState) -> StreamState:
        """Drop the class token that exit `stage` has read, if it was an early one."""
        n_early = self.num_early_tokens(stage)
        if not n_early:
            return state
        return StreamState(state.main, state.early[:, 1:].contiguous() if n_early > 1 else None)

    # ------------------------------------------------------------------ stages
    def stage(self, stage: int, x: torch.Tensor | StreamState) -> tuple:
        """Embed (stage 0; else `x` is the previous stage's state) -> blocks -> LN_k, head k ->
        leave: (next state, None after the last exit; head input [B, d]; logits [B, C])."""
        state = self.run_stage(stage, self.embed(x) if stage == 0 else x)
        token = state.early[:, 0] if self.num_early_tokens(stage) else state.main[:, 0]
        features = self.norms[stage](token)  # LN_k of the class token exit `stage` reads
        after = self.leave(stage, state) if stage < self.num_exits - 1 else None
        return after, features, self.heads[stage](features)

    def forward(self, images: torch.Tensor) -> MultiExitOutput:
        """All exits for every image: logits [B, K, C] and head inputs [B, K, d]."""
        state, features, logits = images, [], []
        for stage in range(self.num_exits):
            state, feature, logit = self.stage(stage, state)
            features.append(feature)
            logits.append(logit)
        return MultiExitOutput(torch.stack(logits, dim=1), torch.stack(features, dim=1))


# model.net: MultiExitViT's arguments and defaults; train() adds the backbone and num_classes
NetConfig = target_config(
    MultiExitViT, partial=True, skip=("backbone", "num_classes"), adapter=AdapterConfig
)
