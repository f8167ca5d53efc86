"""Image transforms derived from the backbone's `InputSpec` (shared by DataModules and predict)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from met_lightning.data.base import InputSpec
from met_lightning.errors import ConfigError

# Normalizations used across the PETL literature (`data.normalize`):
#   backbone: the pretrained checkpoint's own mean / std (timm's pretrained config); the default
#   imagenet: (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), e.g. NOAH / VPT on VTAB-1K
#   half:     0.5 / 0.5, i.e. pixels in [-1, 1]
#   none:     pixels in [0, 1]
NORMALIZATIONS = ("backbone", "imagenet", "half", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's default RandomResizedCrop area range.
CROP_SCALE = (0.08, 1.0)

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for a timm interpolation name ('bicubic', 'bilinear', ...)."""
    return INTERPOLATIONS.get(name, InterpolationMode.BICUBIC)


class Clamp01(torch.nn.Module):
    """Clamp to [0, 1] (bicubic resizing overshoots); a module, so workers can pickle it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def to_input_mode(image: Image.Image, spec: InputSpec) -> Image.Image:
    """The PIL image in the colour mode the backbone takes (RGB for 3 channels, L for 1)."""
    mode = "L" if spec.input_size[0] == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def eval_transform(spec: InputSpec, normalize: bool | str = True) -> v2.Compose:
    """PIL image -> float tensor [C, H, W]: resize to the input size, scale to [0, 1], normalize.

    The resize is antialiased, like `lowres_to_tensor`, so a stored small image (e.g. an 8x8 digit
    saved as PNG) gives the same tensor as the in-memory dataset it came from, up to rounding.
    `normalize`: True (= "backbone", the spec's mean / std), False (= "none"), or one of
    `NORMALIZATIONS` (see `resolve_normalization`). A uint8 tensor [C, h, w] is accepted too.
    """
    _, height, width = spec.input_size
    steps: list[torch.nn.Module] = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize(
            (height, width), interpolation=interpolation_mode(spec.interpolation), antialias=True
        ),
        Clamp01(),
    ]
    steps.extend(_normalize_steps(spec, normalize))
    return v2.Compose(steps)


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
    """(mean, std) for the option `normalize` (see `NORMALIZATIONS`), or None for no normalization.

    True / False are accepted as "backbone" / "none" (the original boolean of `eval_transform`).
    """
    if normalize is True:
        normalize = "backbone"
    elif normalize is False:
        normalize = "none"
    check_normalize(normalize)
    channels = spec.input_size[0]
    if normalize == "none":
        return None
    if normalize == "backbone":
        mean, std = tuple(spec.mean), tuple(spec.std)
    elif normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:  # half
        mean, std = (0.5,), (0.5,)
    return _fit_channels(mean, channels), _fit_channels(std, channels)


def _normalize_steps(spec: InputSpec, normalize: bool | str) -> list[torch.nn.Module]:
    stats = resolve_normalization(spec, normalize)
    if stats is None:
        return []
    mean, std = stats
    return [v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(
    spec: InputSpec,
    normalize: bool | str = "backbone",
    augment: bool = False,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> v2.Compose:
    """The training transform: `eval_transform` without `augment`, else timm-like light aug.

    Augmentation = RandomResizedCrop to the input size (area `crop_scale`, timm's default
    0.08..1, aspect 3/4..4/3) + horizontal flip, then scale to [0, 1] and normalize.
    """
    if not augment:
        return eval_transform(spec, normalize)
    _, height, width = spec.input_size
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                (height, width),
                scale=tuple(crop_scale),
                interpolation=interpolation_mode(spec.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            Clamp01(),
            *_normalize_steps(spec, normalize),
        ]
    )
