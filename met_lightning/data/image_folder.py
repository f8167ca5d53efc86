"""Your own images, one folder per class, in one of two layouts (picked automatically):

    split layout                     single layout
    <root>/train/<class>/*.jpg       <root>/<class>/*.jpg
    <root>/val/<class>/*.jpg         (split per class into train / val / test by
    <root>/test/<class>/*.jpg         data.val_fraction / data.test_fraction, fixed by data.seed)

In the split layout `train` is required and at least one of `val` / `test`: without `test`, the
val images also test; without `val`, a stratified `val_fraction` of train validates. The classes
are the sorted sub-folder names of `train` (of `root` in the single layout); a class folder in
val / test that train lacks is an error. Images are found recursively in each class folder
(extensions in `IMAGE_EXTENSIONS`, any case; hidden files are ignored).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from met_lightning.data.base import ImageClassificationDataModule
from met_lightning.data.images import (
    IMAGE_EXTENSIONS,
    ImageListDataset,
    Sample,
    check_headers,
    drop_undecodable,
    stratified_indices,
)
from met_lightning.data.transforms import check_normalize
from met_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder`."""
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, symlinks followed), sorted, hidden ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return found


class ImageFolderDataModule(ImageClassificationDataModule):
    """Class-per-folder image datasets (see the module docstring for the two layouts).

    `num_classes`: null = the number of class folders, else it must equal it. The class folders
    are read when the module is built (`class_names`, `num_classes` are known before setup); the
    image files by `check_files` (before the backbone is built; else at setup), which also checks
    that PIL recognizes every file's header. An image that cannot be decoded all the same raises a
    DataError naming it when loaded. `skip_bad_images` decodes every image instead and drops the
    bad ones (one warning counts and names them).
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        normalize: str = "backbone",
        augment: bool = False,
        skip_bad_images: bool = False,
        **kwargs,
    ) -> None:
        if not 0.0 < float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1)")
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ConfigError(f"data.test_fraction={test_fraction} must be in [0, 1)")
        if val_fraction + test_fraction >= 0.9:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves "
                "too little to train on; keep their sum below 0.9"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.root={root!r} is not a folder. Give a folder of class folders "
                "(<root>/<class>/*.jpg) or of train/ val/ test/ folders of class folders."
            )
        self.split_layout = (self.root / "train").is_dir()
        self.train_dir = self.root / "train" if self.split_layout else self.root
        classes = class_folders(self.train_dir)
        if not classes:
            raise DataError(
                f"{self.train_dir} has no class folders: expected {self.train_dir}/<class>/<images>"
                + ("" if self.split_layout else f" or {self.root}/train/<class>/<images>")
            )
        if num_classes is not None and int(num_classes) != len(classes):
            raise ConfigError(
                f"data.num_classes={num_classes}, but {self.train_dir} has {len(classes)} class "
                f"folders ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); set "
                "data.num_classes=null to use the folders' count"
            )
        self.val_dir = self.test_dir = None
        if self.split_layout:
            val, test = self.root / "val", self.root / "test"
            self.val_dir = val if val.is_dir() else None
            self.test_dir = test if test.is_dir() else None
            if self.val_dir is None and self.test_dir is None:
                raise DataError(
                    f"{self.root} has train/ but neither val/ nor test/: add at least one of "
                    f"{val} and {test} (class folders like train's)"
                )
        super().__init__(num_classes=len(classes), **kwargs)
        self.class_names = classes
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.normalize = check_normalize(normalize)
        self.augment = bool(augment)
        self.skip_bad_images = bool(skip_bad_images)
        self._splits: tuple[tuple[list[Sample], str], ...] | None = None

    def _scan(self, folder: Path, is_train: bool) -> list[Sample]:
        """(path, label) of every image of `folder`'s class folders."""
        names = class_folders(folder)
        unknown = sorted(set(names) - set(self.class_names))
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(unknown)} in {folder} are not in {self.train_dir}; "
                f"the classes are the folders of {self.train_dir}"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        samples: list[Sample] = []
        for name in names:
            files = image_files(folder / name)
            if not files and is_train:
                raise DataError(
                    f"class folder {folder / name} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
                )
            samples.extend((path, index[name]) for path in files)
        if not samples:
            raise DataError(f"{folder} holds no images in its class folders")
        if self.skip_bad_images:
            samples = drop_undecodable(samples, str(folder), root=folder)
        else:
            check_headers(samples, str(folder), root=folder)
        return samples

    def check_files(self) -> None:
        """Find the images of every split and check them (kept for setup)."""
        if self._splits is None:
            self._splits = self._sample_lists()

    def _build_splits(self) -> tuple[ImageListDataset, ImageListDataset, ImageListDataset]:
        self.check_files()
        spec = self.input_spec
        (train, source), (val, val_source), (test, test_source) = self._splits
        return (
            ImageListDataset(train, spec, source=source),
            ImageListDataset(val, spec, source=val_source),
            ImageListDataset(test, spec, source=test_source),
        )

    def _sample_lists(self) -> tuple[tuple[list[Sample], str], ...]:
        """((samples, source) of train, val, test): the images of each split and where from."""
        everything = self._scan(self.train_dir, is_train=True)
        source = str(self.train_dir)
        if self.split_layout:
            train = everything
            val = self._scan(self.val_dir, False) if self.val_dir else None
            test = self._scan(self.test_dir, False) if self.test_dir else None
            if test is None:
                log.info("%s does not exist: testing on %s", self.root / "test", self.val_dir)
                test, test_source = val, str(self.val_dir)
            else:
                test_source = str(self.test_dir)
            if val is None:
                log.info(
                    "%s does not exist: validating on a stratified %.0f%% of %s (seed %d)",
                    self.root / "val",
                    100 * self.val_fraction,
                    self.train_dir,
                    self.seed,
                )
                labels = [label for _, label in everything]
                train_idx, val_idx, _ = stratified_indices(
                    labels, self.val_fraction, 0.0, self.seed
                )
                train = [everything[i] for i in train_idx]
                val, val_source = [everything[i] for i in val_idx], f"{source} (val part)"
            else:
                val_source = str(self.val_dir)
        else:
            labels = [label for _, label in everything]
            parts = stratified_indices(labels, self.val_fraction, self.test_fraction, self.seed)
            train, val, test = ([everything[i] for i in idx] for idx in parts)
            val_source, test_source = f"{source} (val part)", f"{source} (test part)"
            if not test:
                log.info("data.test_fraction=0: testing on the validation images")
                test, test_source = val, val_source
        if not val:
            folder = f", or add {self.root / 'val'}/<class>/ folders" if self.split_layout else ""
            raise DataError(
                f"{source} has too few images per class for data.val_fraction="
                f"{self.val_fraction}: the validation split is empty; raise data.val_fraction "
                f"or add images{folder}"
            )
        return (train, source), (val, val_source), (test, test_source)
