"""scikit-learn's 8x8 handwritten digits: shipped with scikit-learn, so no download is needed."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from met_lightning.data.base import ImageClassificationDataModule, check_fractions
from met_lightning.data.lowres import LOWRES_MAX
from met_lightning.errors import ConfigError


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train / val / test split, fixed by `seed`."""
    index = np.arange(len(labels))
    trainval, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        trainval, test_size=val_share, stratify=labels[trainval], random_state=seed
    )
    return train, val, test


class DigitsDataModule(ImageClassificationDataModule):
    """1797 images, 10 classes, kept as stored: uint8 [N, 1, 8, 8] with values 0..16; the device
    transform scales, resizes and normalizes them exactly as `lowres.lowres_to_tensor` does."""

    value_max = LOWRES_MAX

    def __init__(
        self, val_fraction: float = 0.2, test_fraction: float = 0.2, num_classes: int = 10, **kwargs
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if num_classes != 10:
            raise ConfigError(f"data.num_classes={num_classes}, but digits has 10 classes")
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        # lowres_to_tensor's resize: bicubic for a bicubic backbone, else bilinear
        self.resize_mode = "bicubic" if self.input_spec.interpolation == "bicubic" else "bilinear"

    def _build_splits(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        digits = load_digits()
        # the values are whole numbers 0..16 stored as float64: uint8 keeps them exactly
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        splits = stratified_split(digits.target, self.val_fraction, self.test_fraction, self.seed)
        return tuple(TensorDataset(images[idx], labels[idx]) for idx in splits)
