"""The frozen timm ViT that MET adapts: creation, weight loading and a cheap architecture probe."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hub_constants
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from met_lightning.errors import BackboneError
from met_lightning.paths import host_reachable

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture facts MET needs, read without allocating weights (meta device)."""

    name: str
    depth: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    in_chans: int
    img_size: int
    num_patches: int
    num_prefix_tokens: int  # class token + register tokens


def _check_supported(model: nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"backbone.name={name!r} builds a {type(model).__name__}, not a timm "
            "VisionTransformer. MET needs a plain ViT (e.g. vit_base_patch16_224.orig_in21k)."
        )
    if model.cls_token is None or model.global_pool != "token":
        raise BackboneError(
            f"backbone.name={name!r} has no class-token readout (global_pool="
            f"{model.global_pool!r}); MET reads class tokens. Pick a ViT with a class token."
        )
    if bad := {type(b).__name__ for b in model.blocks if not isinstance(b, Block)}:
        raise BackboneError(
            f"backbone.name={name!r} uses blocks of type {sorted(bad)}; MET inserts adapters "
            "before attention and MLP of timm's pre-norm `Block` only."
        )


def meta_backbone(name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`timm.create_model(name, **model_kwargs)` on the meta device: no weights allocated."""
    with torch.device("meta"):
        return _create(name, dict(model_kwargs or {}), pretrained=False)


def describe_backbone(name: str, model_kwargs: dict[str, Any] | None = None) -> BackboneSpec:
    """Architecture of `timm.create_model(name, **model_kwargs)`, built on the meta device."""
    return spec_of(meta_backbone(name, model_kwargs), name)


def spec_of(model: VisionTransformer, name: str = "") -> BackboneSpec:
    """Architecture facts of a built timm ViT."""
    _check_supported(model, name)
    patch, block = model.patch_embed, model.blocks[0]
    return BackboneSpec(
        name=name,
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=block.attn.num_heads,
        mlp_hidden=block.mlp.fc1.out_features,
        patch_size=int(patch.patch_size[0]),
        in_chans=int(patch.proj.in_channels),
        img_size=int(patch.img_size[0]),
        num_patches=int(patch.num_patches),
        num_prefix_tokens=int(model.num_prefix_tokens),
    )


def _create(name: str, model_kwargs: dict[str, Any], pretrained: bool, **extra: Any) -> nn.Module:
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=0, **model_kwargs, **extra
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(
                f"backbone.name={name!r} is not a timm model. List ViTs with "
                "`python -c \"import timm; print(timm.list_models('vit_*'))\"`."
            ) from None
        raise
    except TypeError as err:
        raise BackboneError(
            f"backbone.model_kwargs={dict(model_kwargs)} are not accepted by {name!r}: {err}"
        ) from None


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VisionTransformer:
    """A frozen timm ViT without a classifier head, in eval mode, with the weights of
    `weights_file` (a local file) if given, else of the hub if `pretrained`, else random."""
    model_kwargs = dict(model_kwargs or {})
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise BackboneError(
                f"backbone.weights_file={weights_file!r} does not exist. Give the path of a "
                f"local file ({', '.join(WEIGHT_SUFFIXES)}) or set backbone.weights_file=null."
            )
        overlay = dict(file=str(path.resolve()), custom_load=path.suffix == ".npz")
        try:
            model = _create(name, model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        except BackboneError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here is a bad weights file
            raise BackboneError(
                f"backbone.weights_file={weights_file!r} could not be loaded into "
                f"backbone.name={name!r}: {type(err).__name__}: {_first_line(err)}"
            ) from None
    elif pretrained:
        # Offline, huggingface_hub would retry for about a minute before using its cache.
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        offline = offline or not host_reachable(f"https://{HUB_HOST}")
        try:
            with _hub_offline() if offline else nullcontext():
                model = _create(name, model_kwargs, pretrained=True)
        except BackboneError:
            raise
        except Exception as err:  # noqa: BLE001 - network / hub errors come in many types
            reason = (
                f"{HUB_HOST} is not reachable and they are not in the local cache"
                if offline
                else f"{type(err).__name__}: {_first_line(err)}"
            )
            raise BackboneError(
                f"could not get pretrained weights for backbone.name={name!r} from the hub "
                f"({reason}). Either connect to the internet "
                "(weights are cached under HF_HOME / TORCH_HOME), or download them elsewhere and "
                "pass backbone.weights_file=/path/to/weights.(npz|pth|safetensors), or train "
                "from random weights with backbone.pretrained=false."
            ) from None
    else:
        log.warning(
            "backbone %s has random weights (backbone.pretrained=false, no weights_file): "
            "frozen random features transfer poorly.",
            name,
        )
        model = _create(name, model_kwargs, pretrained=False)
    _check_supported(model, name)
    return freeze(model)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Serve hub downloads from the local cache only (huggingface_hub's offline mode)."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients and dropout of every parameter of `model`."""
    return model.requires_grad_(False).eval()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]
