"""Turn small grey-level glyph images (digits, demo glyphs) into backbone-ready tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from met_lightning.data.transforms import resize_unit

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
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"
    x = resize_unit(x.unsqueeze(1), input_size[1:], mode)  # antialiased, clamped to [0, 1]
    x = x.expand(-1, int(input_size[0]), -1, -1)
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return ((x - mean_t) / std_t).contiguous()
