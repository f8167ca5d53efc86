"""Image transforms derived from the backbone's `InputSpec` (shared by DataModules and predict).

Every image file, in training and in predict, goes through `to_input_mode`, one rule for every
Pillow mode. First to 8 bits (`to_8bit`), by value, never by clipping:

- `L`, `RGB`: unchanged; `1`: 0 / 255; CMYK, YCbCr, LAB, HSV, RGBX, P: Pillow's RGB conversion.
- 16-bit grey (`I;16*`) and `I` (read as 16-bit; outside 0..65535 a ValueError): round(v / 257).
- `F`: read as [0, 1], floor(255 v + 0.5); a value that does not round into 0..255 or NaN is a
  ValueError naming the range.
- Alpha (RGBA, LA, PA, RGBa, La, P or L / RGB / 16-bit with a transparent colour): composited over
  white, round((c a + 255 (255 - a)) / 255). White because such images (icons, cut-outs, scans)
  are made for white pages; dropping the alpha shows whatever hides under it, often black.

Then grey is replicated to RGB, or RGB turned to grey (1-channel backbones) by Pillow's ITU-R 601-2
luma, L = 0.299 R + 0.587 G + 0.114 B, rounded.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from met_lightning.errors import ConfigError
from met_lightning.spec import InputSpec

# `data.normalize`: backbone (the checkpoint's mean / std), imagenet (e.g. NOAH / VPT on VTAB-1K),
# half (0.5 / 0.5: pixels in [-1, 1]), none (pixels in [0, 1]).
NORMALIZATIONS = ("backbone", "imagenet", "half", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's default RandomResizedCrop area range.
CROP_SCALE = (0.08, 1.0)
# Clamp to [0, 1] (bicubic resizing overshoots); a partial, so dataloader workers can pickle it.
CLAMP_01 = v2.Lambda(partial(torch.clamp, min=0.0, max=1.0))


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for a timm interpolation name (bicubic unless bilinear / nearest)."""
    return InterpolationMode(name) if name in ("bilinear", "nearest") else InterpolationMode.BICUBIC


# 16-bit grey modes (and `I`, read as 16-bit values): v8 = round(v / 257)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# grey modes whose alpha is composited in grey
GREY_ALPHA_MODES = ("L", "LA", "La")
# the background that transparent pixels are composited over (white)
ALPHA_BACKGROUND = 255


def over_background(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 `colour` [H, W, C] composited with uint8 `alpha` [H, W, 1] over `ALPHA_BACKGROUND`:
    round((c a + bg (255 - a)) / 255), exact in integers (never halfway)."""
    c, a = colour.astype(np.uint32), alpha.astype(np.uint32)
    return ((c * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _high_bit_to_8bit(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a 16-bit, `I` or `F` image (module docstring), ValueError out of range."""
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.floor(values.astype(np.float64) * 255 + 0.5)
        if not (np.isfinite(scaled).all() and scaled.min() >= 0 and scaled.max() <= 255):
            raise ValueError(
                f"a float image (Pillow mode F) is read as values in [0, 1], but this one holds "
                f"[{np.nanmin(values):g}, {np.nanmax(values):g}]"
                + (" and NaN" if np.isnan(values).any() else "")
                + "; scale it to [0, 1] or save it as 8- or 16-bit"
            )
        return scaled.astype(np.uint8)
    wide = values.astype(np.int64)
    if wide.min() < 0 or wide.max() > 65535:
        raise ValueError(
            f"a 32-bit integer image (Pillow mode {image.mode}) is read as 16-bit values "
            f"0..65535, but this one holds {wide.min()}..{wide.max()}; save it as 8- or 16-bit"
        )
    grey = ((2 * wide + 257) // 514).astype(np.uint8)  # round(v / 257)
    key = image.info.get("transparency")
    if isinstance(key, int):  # a transparent grey level (PNG tRNS)
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        grey = over_background(grey[..., None], alpha[..., None])[..., 0]
    return grey


def to_8bit(image: Image.Image) -> Image.Image:
    """The image as 8-bit `L` or `RGB` by the rule of the module docstring (ValueError for `I` /
    `F` values out of their range)."""
    if image.mode in (*SIXTEEN_BIT_MODES, "F"):
        return Image.fromarray(_high_bit_to_8bit(image))
    if image.mode == "1":
        return image.convert("L")
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("LA" if image.mode in GREY_ALPHA_MODES else "RGBA"))
        flat = over_background(rgba[..., :-1], rgba[..., -1:])
        return Image.fromarray(flat[..., 0] if flat.shape[-1] == 1 else flat)
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("RGB")


def to_input_mode(image: Image.Image, spec: InputSpec) -> Image.Image:
    """The PIL image in the colour mode the backbone takes (RGB for 3 channels, L for 1), by the
    rule of the module docstring (`to_8bit`, then grey replicated / RGB to luma)."""
    mode = "L" if spec.input_size[0] == 1 else "RGB"
    image = to_8bit(image)
    return image if image.mode == mode else image.convert(mode)


def eval_transform(spec: InputSpec, normalize: bool | str = True) -> v2.Compose:
    """PIL image (or uint8 tensor [C, h, w]) -> float [C, H, W]: scale to [0, 1], resize
    (antialiased, like `lowres_to_tensor`), normalize (see `resolve_normalization`)."""
    resize = v2.Resize(
        spec.input_size[1:], interpolation=interpolation_mode(spec.interpolation), antialias=True
    )
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), resize, CLAMP_01]
        + _normalize_steps(spec, normalize)
    )


def check_normalize(normalize: str) -> str:
    """`normalize` if it is one of `NORMALIZATIONS`, else a ConfigError naming `data.normalize`."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"data.normalize={normalize!r} must be one of {', '.join(NORMALIZATIONS)} "
            "(backbone: the checkpoint's mean/std; imagenet: ImageNet mean/std; "
            "half: 0.5/0.5; none: pixels in [0, 1])"
        )
    return normalize


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel statistics for `channels` channels (their mean for a grey-level input)."""
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return tuple(values) * channels
    raise ConfigError(f"cannot use {len(values)} normalization values for {channels} channels")


def resolve_normalization(
    spec: InputSpec, normalize: bool | str = "backbone"
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) for the option `normalize` (see `NORMALIZATIONS`; True / False = "backbone" /
    "none"), or None for no normalization."""
    if isinstance(normalize, bool):
        normalize = "backbone" if normalize else "none"
    stats = {
        "backbone": (tuple(spec.mean), tuple(spec.std)),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "half": ((0.5,), (0.5,)),
    }
    if check_normalize(normalize) == "none":
        return None
    return tuple(_fit_channels(values, spec.input_size[0]) for values in stats[normalize])


def _normalize_steps(spec: InputSpec, normalize: bool | str) -> list[torch.nn.Module]:
    stats = resolve_normalization(spec, normalize)
    return [] if stats is None else [v2.Normalize(mean=list(stats[0]), std=list(stats[1]))]


def train_transform(
    spec: InputSpec,
    normalize: bool | str = "backbone",
    augment: bool = False,
) -> v2.Compose:
    """`eval_transform` without `augment`, else RandomResizedCrop (area `CROP_SCALE`, aspect
    3/4..4/3) + horizontal flip, then scale to [0, 1] and normalize (the per-image reference of
    the batched `device_transforms.BatchTransform`)."""
    if not augment:
        return eval_transform(spec, normalize)
    crop = v2.RandomResizedCrop(
        spec.input_size[1:],
        scale=CROP_SCALE,
        interpolation=interpolation_mode(spec.interpolation),
        antialias=True,
    )
    return v2.Compose(
        [v2.ToImage(), crop, v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
        + [CLAMP_01, *_normalize_steps(spec, normalize)]
    )
