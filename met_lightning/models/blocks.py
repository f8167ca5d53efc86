"""MET's transformer block: timm's pre-norm `Block` run on a main sequence and an early stream.

`StreamBlock` is a timm `Block` (same submodules and parameter names, timm's `forward` kept) with
two more entry points (see `MultiExitViT.token_layout`):

- `forward_streams`: main ``x`` [B, T, d] (``c_K, R, P``) runs unmasked, flash-eligible
  attention; the early class tokens ``e`` [B, E, d] attend to the main keys / values of ``R, P``
  and to their own (the ``c_K`` column replaced by the token's own score and value), reading the
  main keys and values in place as strided views of the qkv projection: nothing of size T is
  copied. Nothing in the main path reads ``e``.
- `forward_joint`: the joint sequence ``[early, main]`` with the same semantics as a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

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
        key = (n, dtype, device)
        if key not in cache:
            cache[key] = torch.eye(n, dtype=dtype, device=device)
        return cache[key]

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
        """One block on main tokens x [B, T, d] and early tokens e [B, E, d] (or None)."""
        adapt_attn, adapt_mlp, parallel = adapters
        if adapt_attn is not None:
            x = adapt_attn(x, "main")
            e = adapt_attn(e, "early") if e is not None else None
        h = self.norm1(x)
        q, k, v, kv = self._qkv(h)
        x_attn = self._out(self._attend_main(q, k, v), h)
        if e is not None:
            h_e = self.norm1(e)
            q_e, k_e, v_e, _ = self._qkv(h_e)
            e = e + self._out(self._attend_early(q_e, k_e, v_e, k, v, kv), h_e)
        x = x + x_attn
        if adapt_mlp is not None:
            x = adapt_mlp(x, "main")
            e = adapt_mlp(e, "early") if e is not None else None
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
