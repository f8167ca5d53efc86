"""Turn small grey-level glyph images (digits, demo glyphs) into backbone-ready tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# scikit-learn's digits count "on" pixels in 4x4 blocks of a 32x32 bitmap: values 0..16.
LOWRES_MAX = 16.0


def lowres_to_tensor(
    images: np.ndarray | torch.Tensor,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """`images` [N, h, w] with values 0..16 -> float [N, C, H, W] (`input_size`), the grey level
    repeated over the channels and normalized with the backbone's `mean` / `std`."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / LOWRES_MAX
    if x.ndim != 3:
        raise ValueError(f"expected images [N, h, w], got shape {tuple(x.shape)}")
    channels, height, width = (int(v) for v in input_size)
    x = x.unsqueeze(1)
    if x.shape[-2:] != (height, width):
        mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    x = x.expand(-1, channels, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
