"""What MET trains on the frozen ViT besides the heads, and `AdapterConfig`, their options.

- Bottleneck adapters (MET's E-adapter, AdaptFormer's): `W_down` [r, d], `W_up` [d, r] starting
  at zero (a no-op adapter).
- LoRA on the slices of timm's fused `qkv` projection (Hu et al., 2021): `LoRAQKV` wraps timm's
  fused `Linear(d, 3d)` and adds `scale * B_s A_s x` to the output slice of each chosen site `s`
  in {q, k, v}; `A_s` [r, d] starts Kaiming-uniform and `B_s` [d, r] at zero (the layer starts
  unchanged). `scale`: HF peft's `lora_alpha / r`. Parameters per site: `2 d r`.
- 1-bit bottleneck projections (`bits=1`; Jie et al., "Revisiting the Parameter Efficiency of
  Adapters from the Perspective of Precision Redundancy"): ``W_q = mu + 0.6745 * sigma *
  sign((W - mu) / sigma)`` (mu, sigma: mean and std over the matrix). Training keeps the
  full-precision W and uses W_q with a straight-through gradient; checkpoints store the signs
  packed and mu, sigma (`checkpoint.trainable`); loading rebuilds W_q with the same function, so
  predictions are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from met_lightning.errors import ConfigError

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
    if wrapped := [i for i, blk in enumerate(blocks) if isinstance(blk.attn.qkv, LoRAQKV)]:
        raise ValueError(
            f"attn.qkv of block(s) {wrapped} is already wrapped in LoRAQKV: this backbone already "
            "carries a LoRA; build the new LoRA network on a fresh backbone (e.g. create_backbone "
            "again, or copy.deepcopy the plain one before wrapping)"
        )
    for blk in blocks:
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, rank, sites, scale)


KEY = "model.net.adapter"
# kind -> the sites it can use
ADAPTER_KINDS: dict[str, tuple[str, ...]] = {
    "e_adapter": ("attn", "mlp"),  # MET: before attention / MLP, shared W, per-exit gamma
    "adaptformer": ("mlp",),  # parallel to the MLP
    "lora": LORA_SITES,  # slices of the fused qkv projection
    "none": (),  # heads only (linear probe, multi-exit linear, full fine-tuning)
}
ADAPTFORMER_SCALE = 0.1  # AdaptFormer's s when `scale` is null
LORA_ALPHA = 8.0  # HF peft's default lora_alpha, when `alpha` is null


@dataclass
class AdapterConfig:
    """The parameter-efficient modules of a `MultiExitViT` (`model.net.adapter`), checked when
    made: the one home of these defaults and checks (the config, the network and checkpoints).

    kind: e_adapter (MET) | adaptformer | lora | none (heads only).
    rank: bottleneck width r of the shared W_down / W_up (LoRA: the rank of B A).
    exit_specific: one diagonal gamma_k per exit (false: one gamma shared by all exits).
    separate_cls: a class-token stream per exit (false: every exit reads the main one).
    sites: e_adapter: attn, mlp | adaptformer: mlp | lora: q, k, v | none: [].
    bits: 32 | 1 (1-bit W_down / W_up: mu + 0.6745 sigma sign, packed export).
    scale: AdaptFormer's s (null: 0.1).
    alpha: LoRA's alpha: B A x is scaled by alpha / rank, HF peft's lora_alpha / r (null: 8).
    """

    kind: str = "e_adapter"
    rank: int = 8
    exit_specific: bool = True
    separate_cls: bool = True
    sites: list[str] = field(default_factory=lambda: list(ADAPTER_KINDS["e_adapter"]))
    bits: int = 32
    scale: float | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        self.sites = list(self.sites)
        kind, sites = self.kind, self.sites
        if kind not in ADAPTER_KINDS:
            raise ConfigError(f"{KEY}.kind={kind!r} must be one of {list(ADAPTER_KINDS)}")
        valid = ADAPTER_KINDS[kind]
        if any(s not in valid for s in sites) or len(set(sites)) != len(sites):
            raise ConfigError(
                f"{KEY}.sites={sites}: with {KEY}.kind={kind} each site must be one of "
                f"{list(valid)}, listed once" + (f" (use {KEY}.sites=[])" if kind == "none" else "")
            )
        if kind != "none" and not (isinstance(self.rank, int) and self.rank > 0):
            raise ConfigError(f"{KEY}.rank={self.rank} must be a positive integer (default 8)")
        if self.exit_specific and kind != "e_adapter":
            raise ConfigError(
                f"{KEY}.exit_specific=true needs {KEY}.kind=e_adapter (got {kind}); set "
                f"{KEY}.exit_specific=false"
            )
        if self.exit_specific and not self.separate_cls:
            raise ConfigError(
                f"{KEY}.exit_specific=true needs {KEY}.separate_cls=true: without separate class "
                "tokens every exit reads the same token, so there is nothing to scale per exit. "
                f"Set {KEY}.exit_specific=false or {KEY}.separate_cls=true."
            )
        if self.bits not in BITS:
            raise ConfigError(f"{KEY}.bits={self.bits} must be one of {list(BITS)}")
        if self.bits == 1 and kind not in ("e_adapter", "adaptformer"):
            raise ConfigError(
                f"{KEY}.bits=1 quantizes bottleneck adapters (kind e_adapter or adaptformer), "
                f"not kind={kind}; set {KEY}.bits=32"
            )
        if self.scale is not None and kind == "lora":
            raise ConfigError(
                f"{KEY}.scale={self.scale} does not apply to kind lora: LoRA scales B A x by "
                f"{KEY}.alpha / rank (HF peft's lora_alpha / r, alpha default {LORA_ALPHA:g}); "
                f"set {KEY}.alpha={float(self.scale) * self.rank:g} (= scale x rank "
                f"{self.rank}) and {KEY}.scale=null"
            )
        if self.scale is not None and kind != "adaptformer":
            raise ConfigError(
                f"{KEY}.scale={self.scale} is AdaptFormer's s and applies to kind adaptformer "
                f"only (kind={kind}); set {KEY}.scale=null"
            )
        if self.alpha is not None and kind != "lora":
            raise ConfigError(
                f"{KEY}.alpha={self.alpha} is LoRA's alpha and applies to kind lora only "
                f"(kind={kind}); set {KEY}.alpha=null"
            )
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"{KEY}.alpha={self.alpha} must be > 0: LoRA scales B A x by alpha / rank "
                f"(null = peft's default {LORA_ALPHA:g})"
            )

    @property
    def multiplier(self) -> float:
        """What the adapter's output is scaled by: AdaptFormer's s, LoRA's alpha / rank."""
        if self.kind == "lora":
            return (LORA_ALPHA if self.alpha is None else float(self.alpha)) / self.rank
        return ADAPTFORMER_SCALE if self.scale is None else float(self.scale)


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

    `W`s and biases are shared; `gamma` [num_gammas, r]: one diagonal per exit or one shared.
    Starts as the identity (gamma = 1). Trainable parameters: `2 d r + r + d + num_gammas r`.
    """

    def __init__(self, dim: int, rank: int, num_gammas: int, bits: int = 32) -> None:
        super().__init__(dim, rank, bits)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.ones(num_gammas, rank))

    def forward(self, x: torch.Tensor, rows: int | slice | torch.Tensor = 0) -> torch.Tensor:
        """x [B, T, d]; `rows`: the gamma row (exit) of all tokens (int) or one per token (a
        slice or long [T]). gamma is cast to the bottleneck's dtype: it never promotes bf16."""
        h = self.act(self.down(x))  # [B, T, r]
        return x + self.up(h * self.gamma[rows].to(h.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gammas={len(self.gamma)}"


class ParallelAdapter(_Bottleneck):
    """AdaptFormer's AdaptMLP (Chen et al., 2022, as in their ViT code: no layer norm, zero
    biases): `x = x + MLP(LN2(x)) + s * (W_up ReLU(W_down x + b_down) + b_up)`; `2 d r + r + d`
    trainable parameters."""

    def __init__(self, dim: int, rank: int, scale: float = 0.1, bits: int = 32) -> None:
        super().__init__(dim, rank, bits)
        nn.init.zeros_(self.down.bias)
        self.act = nn.ReLU()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
