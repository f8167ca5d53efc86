"""Your own images, one folder per class, in one of two layouts (picked automatically):

    split layout                     single layout
    <root>/train/<class>/*.jpg       <root>/<class>/*.jpg
    <root>/val/<class>/*.jpg         (split per class into train / val / test by
    <root>/test/<class>/*.jpg         data.val_fraction / data.test_fraction, fixed by data.seed)

The split layout needs `train` and `val` and / or `test` (without `test`, val also tests; without
`val`, a stratified `val_fraction` of train validates). The classes are the sorted sub-folders of
`train` (of `root`); val / test may not add any. Images are found recursively (extensions in
`IMAGE_EXTENSIONS`, any case; hidden files ignored).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from met_lightning.data.base import ImageClassificationDataModule, check_fractions
from met_lightning.data.images import (
    IMAGE_EXTENSIONS,
    ImageListDataset,
    Sample,
    check_images,
    stratified_indices,
)
from met_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder`."""
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


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
    are read when the module is built; the images by `check_files` (`images.check_images`,
    `skip_bad_images`).
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        skip_bad_images: bool = False,
        **kwargs,
    ) -> None:
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction, True)
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
        val, test = self.root / "val", self.root / "test"
        self.val_dir = val if self.split_layout and val.is_dir() else None
        self.test_dir = test if self.split_layout and test.is_dir() else None
        if self.split_layout and self.val_dir is None and self.test_dir is None:
            raise DataError(
                f"{self.root} has train/ but neither val/ nor test/: add at least one of "
                f"{val} and {test} (class folders like train's)"
            )
        super().__init__(num_classes=len(classes), **kwargs)
        self.class_names = classes
        self.skip_bad_images = bool(skip_bad_images)
        self._splits: list[tuple[list[Sample], str]] | None = None  # (samples, source) per split

    def _scan(self, folder: Path, is_train: bool) -> list[Sample]:
        """(path, label) of every image of `folder`'s class folders, checked."""
        names = class_folders(folder)
        if unknown := sorted(set(names) - set(self.class_names)):
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
        return check_images(samples, str(folder), folder, self.skip_bad_images)

    def check_files(self) -> None:
        """Find the images of every split and check them (kept for setup in `_splits`)."""
        if self._splits is not None:
            return
        everything, source = self._scan(self.train_dir, is_train=True), str(self.train_dir)
        train = (everything, source)
        val, test = (
            (self._scan(d, False), str(d)) if d else None for d in (self.val_dir, self.test_dir)
        )
        if val is None:  # the single layout, or no val/: split train per class
            if self.split_layout:
                log.info(
                    "%s does not exist: validating on a stratified %.0f%% of %s (seed %d)",
                    self.root / "val",
                    100 * self.val_fraction,
                    self.train_dir,
                    self.seed,
                )
            test_fraction = 0.0 if self.split_layout else self.test_fraction
            labels = [label for _, label in everything]
            parts = stratified_indices(labels, self.val_fraction, test_fraction, self.seed)
            train_part, val_part, test_part = ([everything[i] for i in idx] for idx in parts)
            train, val = (train_part, source), (val_part, f"{source} (val part)")
            if not self.split_layout:
                test = (test_part, f"{source} (test part)")
        if test is None or not test[0]:
            if self.split_layout:
                log.info("%s does not exist: testing on %s", self.root / "test", self.val_dir)
            else:
                log.info("data.test_fraction=0: testing on the validation images")
            test = val
        if not val[0]:
            folder = f", or add {self.root / 'val'}/<class>/ folders" if self.split_layout else ""
            raise DataError(
                f"{source} has too few images per class for data.val_fraction="
                f"{self.val_fraction}: the validation split is empty; raise data.val_fraction "
                f"or add images{folder}"
            )
        self._splits = [train, val, test]

    def _build_splits(self) -> tuple[ImageListDataset, ...]:
        self.check_files()
        return tuple(ImageListDataset(s, self.input_spec, source=src) for s, src in self._splits)
