"""Image transforms derived from the backbone's `InputSpec`: per image (DataModules and predict)
and batched on the training device (the DataModules' `on_after_batch_transfer`).

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

On the device: the dataloader workers only decode and hand over uint8 batches [B, C, h, w] at the
stored size (`ImageCollate`); `BatchTransform` does on the device, for the whole batch, what
`eval_transform` / `train_transform` do per image (equal up to float rounding): scale,
antialiased resize, clamp, grey replicated, normalize; with `augment` a RandomResizedCrop + flip
per sample as torchvision draws them, from a `torch.Generator` on the device. The crop and resize
are one resampling, two batched matrix products with per-sample weights, so every sample has its
own box without a host sync (hot path: no `.item()`, no data-dependent branching). Images of one
batch that differ in size are each resized in the worker as `eval_transform` does (a float batch
in [0, 1]); an augmentation then crops the resized image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
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
    if check_normalize(normalize) == "none":
        return None
    fixed = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,), (0.5,))}
    stats = fixed.get(normalize, (spec.mean, spec.std))  # backbone: the checkpoint's
    return tuple(_fit_channels(values, spec.input_size[0]) for values in stats)


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
    the batched `BatchTransform`)."""
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


# torchvision's RandomResizedCrop: aspect-ratio range and number of attempts before a centre crop.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# PyTorch's antialiased bicubic kernel (as PIL's) uses a = -0.5.
BICUBIC_A = -0.5
MODES = ("bicubic", "bilinear", "nearest")


def to_unit(images: torch.Tensor, value_max: float = 255.0) -> torch.Tensor:
    """float32 in [0, 1]: integers divided by `value_max` (white), floats as they are."""
    x = images.to(torch.float32)
    return x if images.is_floating_point() else x.mul_(1.0 / value_max)


def resize_unit(images: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Float images [B, C, h, w] in [0, 1] -> [B, C, H, W] clamped, `size` = (H, W), as
    torchvision's `Resize(antialias=True)`; returned as they are when they have the size."""
    height, width = (int(s) for s in size)
    if tuple(images.shape[-2:]) == (height, width):
        return images
    smooth = mode in ("bilinear", "bicubic")
    images = F.interpolate(
        images,
        size=(height, width),
        mode=mode,
        align_corners=False if smooth else None,
        antialias=smooth,
    )
    return images.clamp_(0.0, 1.0)


def augment_seed(seed: int, rank: int, epoch: int, batch_idx: int) -> int:
    """The generator seed of one training batch: a function of (seed, rank, epoch, batch_idx) only,
    so a resumed run draws the same crops and flips as the uninterrupted one."""
    state = np.random.SeedSequence([int(seed), int(rank), int(epoch), int(batch_idx)])
    high, low = (int(v) for v in state.generate_state(2, np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


def crop_draws(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The uniform draws [B, 2 * CROP_ATTEMPTS + 3] of one batch's crops and flips (eager: a
    generator argument breaks a compiled graph)."""
    return torch.rand(batch, 2 * CROP_ATTEMPTS + 3, generator=generator, device=device)


def sample_crops(
    batch: int, height: int, width: int, generator: torch.Generator, device: torch.device, **kwargs
) -> tuple[torch.Tensor, ...]:
    """`crops_from_draws` (its `scale`, `ratio` keywords) of `crop_draws` on `device`."""
    return crops_from_draws(crop_draws(batch, generator, device), height, width, **kwargs)


def crops_from_draws(
    draws: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes from uniform `draws` [B, 2 * CROP_ATTEMPTS + 3]: (top, left,
    crop height, crop width) float [B] of whole pixels and `flip` bool [B]. Per sample, the first
    of `CROP_ATTEMPTS` (area, aspect) draws whose box fits, else torchvision's centre crop."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[:, :CROP_ATTEMPTS])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * draws[:, CROP_ATTEMPTS : 2 * CROP_ATTEMPTS])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.float32).argmax(dim=1, keepdim=True)  # the first fitting attempt
    found = fits.any(dim=1)
    # torchvision's fallback: a centre crop of the largest box within the aspect range (a side is
    # cut only where the image is wider than max(ratio) or taller than min(ratio) allows)
    fb_w, fb_h = min(width, round(height * max(ratio))), min(height, round(width / min(ratio)))
    crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), float(fb_w))
    crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), float(fb_h))
    extra = draws[:, 2 * CROP_ATTEMPTS :]
    top = torch.where(
        found, torch.floor(extra[:, 0] * (height - crop_h + 1)), float((height - fb_h) // 2)
    )
    left = torch.where(
        found, torch.floor(extra[:, 1] * (width - crop_w + 1)), float((width - fb_w) // 2)
    )
    return top, left, crop_h, crop_w, extra[:, 2] < 0.5


def _kernel(x: torch.Tensor, mode: str) -> torch.Tensor:
    """PyTorch's antialiasing filters (bilinear: triangle; bicubic: cubic with a = -0.5)."""
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, mode: str
) -> torch.Tensor:
    """Weights [B, out_size, in_size] that resample the pixels [start, start + length) of an axis
    of `in_size` pixels to `out_size`, per sample (`start`, `length`: float [B]), as
    `F.interpolate(..., antialias=True, align_corners=False)` does (PyTorch's 'nearest' else)."""
    device = start.device
    scale = (length / out_size)[:, None, None]  # [B, 1, 1] input pixels per output pixel
    out_pos = torch.arange(out_size, device=device, dtype=torch.float32)[None, :, None]
    pixel = torch.arange(in_size, device=device, dtype=torch.float32)[None, None, :]
    rel = pixel - start[:, None, None]  # [B, 1, in] pixel index relative to the box
    inside = (rel >= 0) & (rel < length[:, None, None])
    if mode == "nearest":
        src = torch.minimum(torch.floor(out_pos * scale), length[:, None, None] - 1)
        return ((rel == src) & inside).to(torch.float32)
    center = scale * (out_pos + 0.5)  # [B, out, 1] in box coordinates
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    weights = _kernel((rel + 0.5 - center) * invscale, mode) * inside
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    crop_h: torch.Tensor,
    crop_w: torch.Tensor,
    size: Sequence[int],
    mode: str,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float images [B, C, h, w] -> [B, C, H, W] (not clamped): each sample's box (float [B] of
    whole pixels) resized to `size` = (H, W) and flipped where `flip` (bool [B]), as torchvision's
    `resized_crop(..., antialias=True)` (+ `horizontal_flip`) up to float rounding."""
    height, width = (int(s) for s in size)
    rows = resize_weights(top, crop_h, images.shape[-2], height, mode)  # [B, H, h]
    cols = resize_weights(left, crop_w, images.shape[-1], width, mode)  # [B, W, w]
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    out = torch.matmul(images, cols.transpose(1, 2).unsqueeze(1))  # [B, C, h, W]
    return torch.matmul(rows.unsqueeze(1), out)  # [B, C, H, W]


class BatchTransform:
    """uint8 (or [0, 1] float) image batches -> the backbone's normalized float input.

    value_max: the stored value of a white pixel (16 for scikit-learn's digits); mode: the
    `F.interpolate` mode (default: the spec's interpolation as `eval_transform` maps it).
    """

    def __init__(
        self,
        spec: InputSpec,
        normalize: bool | str = "backbone",
        augment: bool = False,
        value_max: float = 255.0,
        mode: str | None = None,
    ) -> None:
        self.channels, height, width = (int(v) for v in spec.input_size)
        self.size = (height, width)
        self.mode = mode or interpolation_mode(spec.interpolation).value
        if self.mode not in MODES:
            raise ValueError(f"resize mode {self.mode!r} is not one of {', '.join(MODES)}")
        self.augment = bool(augment)
        self.value_max = float(value_max)
        self.mean, self.std = resolve_normalization(spec, normalize) or (None, None)
        # mean / std tensors [1, C, 1, 1] per device, made once (a host-to-device copy syncs)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalization's (mean, std) as float32 [1, C, 1, 1] tensors on `device`."""
        if device not in self._stats:
            self._stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                for v in (self.mean, self.std)
            )
        return self._stats[device]

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat a grey level over the backbone's channels, then normalize: [B, C, H, W]."""
        if images.shape[1] == 1 and self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1)
        if self.mean is None:
            return images.contiguous()
        mean, std = self.stats(images.device)
        return (images - mean) / std

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> float32 [B, C', H, W] (= `eval_transform`)."""
        return self.finish(resize_unit(to_unit(images, self.value_max), self.size, self.mode))

    def train(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`eval` without `augment`, else a random resized crop and flip per sample drawn from
        `generator` (on the images' device)."""
        if not self.augment:
            return self.eval(images)
        return self.augment_with(images, crop_draws(images.shape[0], generator, images.device))

    def augment_with(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmented input from the `draws` of `crop_draws` (generator-free: compiles)."""
        x = to_unit(images, self.value_max)
        top, left, crop_h, crop_w, flip = crops_from_draws(draws, x.shape[-2], x.shape[-1])
        x = resized_crop(x, top, left, crop_h, crop_w, self.size, self.mode, flip)
        return self.finish(x.clamp_(0.0, 1.0))


class ImageCollate:
    """(uint8 image [C, h, w], label) samples -> (images, labels [B] int64), in a worker: uint8
    [B, C, h, w] when of one size, else each resized to `size` = (H, W) as `eval_transform` does:
    float32 [B, C, H, W] in [0, 1]."""

    def __init__(self, size: Sequence[int], mode: str, value_max: float = 255.0) -> None:
        self.size = tuple(int(s) for s in size)
        self.mode = mode
        self.value_max = float(value_max)

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
        images = [image for image, _ in samples]
        labels = torch.as_tensor([int(label) for _, label in samples], dtype=torch.long)
        if len({tuple(image.shape) for image in images}) == 1:
            return torch.stack(images), labels
        resized = [
            resize_unit(to_unit(x[None], self.value_max), self.size, self.mode) for x in images
        ]
        return torch.cat(resized), labels
