"""Batched image preparation on the training device (the DataModules' `on_after_batch_transfer`).

The dataloader workers only decode: they hand over uint8 batches [B, C, h, w] at the images' stored
size (`ImageCollate`). `BatchTransform` then does on the device, for the whole batch at once, what
`transforms.eval_transform` / `transforms.train_transform` did per image in the workers:

- eval: scale to [0, 1], resize to the backbone input (antialiased, the spec's interpolation),
  clamp, repeat a grey level over the backbone's channels, normalize. Equal to `eval_transform`
  (up to float rounding, < 1e-5).
- train with `augment`: RandomResizedCrop (area `crop_scale`, aspect 3/4..4/3, torchvision's
  10 attempts then a centre crop) + horizontal flip with p = 0.5, drawn per sample from a
  `torch.Generator` on the batch's device; the crop and resize are one antialiased resampling,
  written as two batched matrix products (a per-sample [H, h] and [W, w] weight matrix with
  PyTorch's antialiasing kernels), so that every sample has its own box without a host sync.

Images of one batch that differ in size cannot be stacked: `ImageCollate` then resizes each of
them on the CPU (in the worker) to the input size, exactly as `eval_transform` does, and hands
over a float batch in [0, 1]; the device skips the resize for it (eval numbers stay equal) and an
augmentation crops the resized image (the crop's area range is unchanged, its aspect range is
relative to the resized image).

Hot path: no `.item()`, no boolean-mask indexing, no data-dependent Python branching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from met_lightning.data.transforms import CROP_SCALE, interpolation_mode, resolve_normalization
from met_lightning.spec import InputSpec

# torchvision's RandomResizedCrop: aspect-ratio range and number of attempts before a centre crop.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# PyTorch's antialiased bicubic kernel (as PIL's) uses a = -0.5.
BICUBIC_A = -0.5
MODES = ("bicubic", "bilinear", "nearest")


def resize_mode(interpolation: str) -> str:
    """`F.interpolate` mode of a timm interpolation name, as `eval_transform` maps it."""
    return interpolation_mode(interpolation).value


def resize_unit(images: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Float images [B, C, h, w] in [0, 1] -> [B, C, H, W], `size` = (H, W), clamped to [0, 1].

    torchvision's tensor `Resize(antialias=True)` (antialias for bilinear / bicubic only); the
    images are returned as they are when they already have the size.
    """
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
    `torch.Generator` argument breaks a compiled graph; `crops_from_draws` compiles)."""
    return torch.rand(batch, 2 * CROP_ATTEMPTS + 3, generator=generator, device=device)


def sample_crops(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample RandomResizedCrop boxes and flips, as torchvision draws them, on `device`
    (`crops_from_draws` of `crop_draws`)."""
    return crops_from_draws(crop_draws(batch, generator, device), height, width, scale, ratio)


def crops_from_draws(
    draws: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes and flips from uniform `draws` [B, 2 * CROP_ATTEMPTS + 3].

    Returns (top, left, crop height, crop width) as float tensors [B] of whole pixels and `flip`,
    a bool tensor [B]. For each sample: the first of `CROP_ATTEMPTS` (area, aspect) draws whose box
    fits the height x width image, else torchvision's centre-crop fallback.
    """
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[:, :CROP_ATTEMPTS])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * draws[:, CROP_ATTEMPTS : 2 * CROP_ATTEMPTS])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.float32).argmax(dim=1, keepdim=True)  # the first fitting attempt
    found = fits.any(dim=1)
    # torchvision's fallback: a centre crop of the largest box within the aspect range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), float(fb_w))
    crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), float(fb_h))
    extra = draws[:, 2 * CROP_ATTEMPTS :]
    top = torch.where(
        found, torch.floor(extra[:, 0] * (height - crop_h + 1)), float((height - fb_h) // 2)
    )
    left = torch.where(
        found, torch.floor(extra[:, 1] * (width - crop_w + 1)), float((width - fb_w) // 2)
    )
    flip = extra[:, 2] < 0.5
    return top, left, crop_h, crop_w, flip


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
    of `in_size` pixels to `out_size` pixels, per sample (`start`, `length`: float tensors [B]).

    The antialiased resampling of `F.interpolate(..., antialias=True, align_corners=False)` for
    bilinear / bicubic (the kernel widened by the scale when shrinking, weights normalized over
    the pixels inside the box), and PyTorch's 'nearest' otherwise.
    """
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
    """Crop a box per sample and resize it to `size` = (H, W), then flip horizontally where `flip`.

    images: float [B, C, h, w]; top / left / crop_h / crop_w: float tensors [B] of whole pixels;
    flip: bool [B] or None. Returns float [B, C, H, W] (not clamped). Equal, sample by sample, to
    torchvision's `resized_crop(..., antialias=True)` (+ `horizontal_flip`) up to float rounding.
    """
    height, width = (int(s) for s in size)
    rows = resize_weights(top, crop_h, images.shape[-2], height, mode)  # [B, H, h]
    cols = resize_weights(left, crop_w, images.shape[-1], width, mode)  # [B, W, w]
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    out = torch.matmul(images, cols.transpose(1, 2).unsqueeze(1))  # [B, C, h, W]
    return torch.matmul(rows.unsqueeze(1), out)  # [B, C, H, W]


class BatchTransform:
    """uint8 (or [0, 1] float) image batches -> the backbone's normalized float input, batched.

    spec: the backbone's `InputSpec`; normalize: see `transforms.NORMALIZATIONS`; augment: random
    resized crop + flip in `train` mode; value_max: the stored value of a white pixel (255 for
    8-bit images, 16 for scikit-learn's digits); mode: the `F.interpolate` mode (default: the
    spec's interpolation as `eval_transform` maps it).
    """

    def __init__(
        self,
        spec: InputSpec,
        normalize: bool | str = "backbone",
        augment: bool = False,
        crop_scale: tuple[float, float] = CROP_SCALE,
        value_max: float = 255.0,
        mode: str | None = None,
    ) -> None:
        self.channels, height, width = (int(v) for v in spec.input_size)
        self.size = (height, width)
        self.mode = mode or resize_mode(spec.interpolation)
        if self.mode not in MODES:
            raise ValueError(f"resize mode {self.mode!r} is not one of {', '.join(MODES)}")
        self.augment = bool(augment)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.value_max = float(value_max)
        stats = resolve_normalization(spec, normalize)
        self.mean, self.std = (None, None) if stats is None else stats
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

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> float32 in [0, 1]: integers are divided by `value_max` (as torchvision's
        `ToDtype(scale=True)` does for 255); float batches are taken as already in [0, 1]."""
        if images.is_floating_point():
            return images.to(torch.float32)
        return images.to(torch.float32).mul_(1.0 / self.value_max)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat a grey level over the backbone's channels, then normalize: [B, C, H, W]."""
        if images.shape[1] == 1 and self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1)
        if self.mean is None:
            return images.contiguous()
        mean, std = self.stats(images.device)
        return (images - mean) / std

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluation input: [B, C, h, w] -> float32 [B, C', H, W] (= `eval_transform`)."""
        return self.finish(resize_unit(self.to_unit(images), self.size, self.mode))

    def train(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The training input: `eval` without `augment`, else a random resized crop and flip per
        sample drawn from `generator` (on the images' device): [B, C, h, w] -> [B, C', H, W]."""
        if not self.augment:
            return self.eval(images)
        return self.augment_with(images, crop_draws(images.shape[0], generator, images.device))

    def augment_with(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmented input from the uniform `draws` of `crop_draws`: [B, C, h, w] ->
        [B, C', H, W] (generator-free, so `torch.compile(fullgraph=True)` accepts it)."""
        x = self.to_unit(images)
        top, left, crop_h, crop_w, flip = crops_from_draws(
            draws, x.shape[-2], x.shape[-1], self.crop_scale
        )
        x = resized_crop(x, top, left, crop_h, crop_w, self.size, self.mode, flip)
        return self.finish(x.clamp_(0.0, 1.0))


class ImageCollate:
    """Collate (uint8 image [C, h, w], label) samples into (images, labels [B] int64), in a worker.

    Images of one size are stacked as they are: uint8 [B, C, h, w]. Images of different sizes are
    each resized on the CPU to `size` = (H, W) as `eval_transform` does (scaled by `value_max`,
    antialiased `mode` resize, clamped) and stacked as float32 [B, C, H, W] in [0, 1].
    """

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
            resize_unit(
                image.to(torch.float32).mul_(1.0 / self.value_max)[None], self.size, self.mode
            )[0]
            for image in images
        ]
        return torch.stack(resized), labels
