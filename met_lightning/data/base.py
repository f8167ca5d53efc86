"""Base LightningDataModule of every image-classification dataset of the project.

A subclass implements `_build_splits()` (train / val / test datasets). The datasets yield uint8
images [C, h, w] at their stored size, collated as uint8 batches (`transforms.ImageCollate`);
`on_after_batch_transfer` turns each batch, on the trainer's device, into the backbone's normalized
float input [B, C, H, W] (`transforms.BatchTransform`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from met_lightning.data.transforms import (
    BatchTransform,
    ImageCollate,
    augment_seed,
    check_normalize,
)
from met_lightning.errors import ConfigError, MetError
from met_lightning.spec import InputSpec


def check_fractions(val: float, test: float, test_may_be_0: bool = False) -> tuple[float, float]:
    """`data.val_fraction` in (0, 1) and `data.test_fraction` in (0, 1) (or [0, 1)) as floats,
    leaving at least 10 % to train on; else a ConfigError naming the key."""
    for key, value, low in (("val", val, "("), ("test", test, "[" if test_may_be_0 else "(")):
        if not (0.0 <= float(value) < 1.0 and (low == "[" or float(value) > 0.0)):
            raise ConfigError(f"data.{key}_fraction={value} must be in {low}0, 1)")
    if val + test >= 0.9:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val + test} leaves too little to train "
            "on; keep their sum below 0.9"
        )
    return float(val), float(test)


class ImageClassificationDataModule(L.LightningDataModule, ABC):
    """Common options: `input_spec` (an InputSpec or its fields), `num_classes`, `batch_size`,
    `eval_batch_size`, `num_workers`, `pin_memory` (auto | true | false), `seed`, `normalize`
    (`transforms.NORMALIZATIONS`), `augment` (RandomResizedCrop + horizontal flip on the training
    split). Subclasses set `value_max` / `resize_mode` for the `batch_transform` of setup."""

    value_max: float = 255.0  # the stored value of a white pixel
    resize_mode: str | None = None  # None: the spec's interpolation, mapped as eval_transform does

    def __init__(
        self,
        input_spec: InputSpec | Mapping[str, Any],
        num_classes: int,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        seed: int = 0,
        normalize: str = "backbone",
        augment: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("data.batch_size", batch_size), ("data.num_classes", num_classes)):
            if int(value) <= 0:
                raise ConfigError(f"{key}={value} must be a positive integer")
        if eval_batch_size is not None and int(eval_batch_size) <= 0:
            raise ConfigError(f"data.eval_batch_size={eval_batch_size} must be positive or null")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        pin = {"auto": "auto", "true": True, "false": False}.get(str(pin_memory).lower())
        if pin is None or not isinstance(pin_memory, bool | str):
            raise ConfigError(
                f"data.pin_memory={pin_memory!r} must be auto (pin host memory when the trainer "
                "uses a GPU), true or false"
            )
        self.num_classes = int(num_classes)
        self.class_names = [str(i) for i in range(self.num_classes)]  # a subclass may name them
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin
        self.seed = int(seed)
        self.normalize = check_normalize(normalize)
        self.augment = bool(augment)
        self.input_spec = InputSpec.of(input_spec)
        self.train_set = self.val_set = self.test_set = None  # Datasets, made at setup
        self.batch_transform: BatchTransform | None = None  # made at setup
        self._generators: dict[torch.device, torch.Generator] = {}

    def check_files(self) -> None:
        """Cheap checks of the data on disk, run before the backbone is built (DataError); a
        subclass that reads files overrides it and keeps what it read for `setup`."""

    @abstractmethod
    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return (train, val, test) datasets of (image [C, H, W], label) for `self.input_spec`."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set, self.test_set = self._build_splits()
        self.batch_transform = BatchTransform(
            self.input_spec,
            self.normalize,
            self.augment,
            value_max=self.value_max,
            mode=self.resize_mode,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_generators"] = {}  # generators do not pickle; they are reseeded per batch anyway
        return state

    def pins_memory(self) -> bool:
        """`data.pin_memory` resolved: "auto" pins when the attached trainer runs on a GPU."""
        if self.pin_memory != "auto":
            return self.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        transform = self.batch_transform
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pins_memory(),
            persistent_workers=self.num_workers > 0,
            collate_fn=ImageCollate(transform.size, transform.mode, transform.value_max),
        )

    def train_generator(self, device: torch.device, epoch: int, batch_idx: int) -> torch.Generator:
        """The DataModule's generator on `device`, seeded for one training batch from
        (data.seed, global rank, epoch, batch index): the draws survive a resume."""
        device = torch.device(device)
        if (generator := self._generators.get(device)) is None:
            generator = self._generators[device] = torch.Generator(device=device)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        generator.manual_seed(augment_seed(self.seed, rank, epoch, batch_idx))
        return generator

    def prepare_batch(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """uint8 images [B, C, h, w] -> the backbone's float input [B, C, H, W]; in training with
        `augment`, crops and flips from `train_generator` for the trainer's epoch and batch."""
        if self.batch_transform is None:
            raise RuntimeError("call setup() before preparing batches")
        if not (train and self.batch_transform.augment):
            return self.batch_transform.eval(images)
        trainer, epoch, batch_idx = self.trainer, 0, 0
        if trainer is not None:
            epoch = trainer.current_epoch
            # the loop counts a batch as ready right after this hook: this batch's index
            batch_idx = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        generator = self.train_generator(images.device, epoch, batch_idx)
        return self.batch_transform.train(images, generator)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):  # noqa: ANN001, ANN201
        """Lightning hook (train / val / test / predict), on the trainer's device: (uint8 images,
        labels) -> (normalized float images [B, C, H, W], labels); augmentation in training only."""
        train = self.trainer is not None and self.trainer.training
        if isinstance(batch, torch.Tensor):
            return self.prepare_batch(batch, train)
        images, *rest = batch
        return (self.prepare_batch(images, train), *rest)

    @property
    def world_size(self) -> int:
        """Processes sharing the batch (devices × nodes under DDP), 1 outside a Trainer."""
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        """`data.batch_size` is global (the recipe's): each DDP process loads its share."""
        world = self.world_size
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch size and must be divisible "
                f"by the {world} processes (trainer.devices × trainer.num_nodes)"
            )
        return self._loader(self.train_set, self.batch_size // world, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, max(self.eval_batch_size // self.world_size, 1))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, max(self.eval_batch_size // self.world_size, 1))

    def predict_dataloader(self) -> DataLoader:
        """The test split's (images, labels) batches (`trainer.predict(module, datamodule=...)`)."""
        return self.test_dataloader()


def build_datamodule(
    data_cfg,  # noqa: ANN001 - a DictConfig
    input_spec: InputSpec,
) -> ImageClassificationDataModule:
    """`instantiate(cfg.data, input_spec=input_spec)`, then `check_files()`: bad options and data
    fail before the backbone is built; a TypeError / ValueError of the constructor becomes a
    ConfigError naming data.*."""
    try:
        datamodule = instantiate(data_cfg, input_spec=input_spec)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MetError) or not isinstance(cause, TypeError | ValueError):
            raise
        raise ConfigError(
            f"data: {type(cause).__name__}: {cause} (check the data.* values; "
            f"_target_={data_cfg.get('_target_')})"
        ) from err
    datamodule.check_files()
    return datamodule
