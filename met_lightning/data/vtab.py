"""VTAB-1K (19 tasks, 1000 training images each) in the list-file layout of NOAH / VPT / PETL repos.

Expected layout (prepared as in NOAH's README, https://github.com/ZhangYuanhan-AI/NOAH):

    <root>/<task>/train800.txt        800 lines "relative/path label"
    <root>/<task>/val200.txt          200 lines
    <root>/<task>/train800val200.txt  the 1000 lines of both
    <root>/<task>/test.txt            the task's full test set
    <root>/<task>/<images...>         paths in the list files are relative to <root>/<task>/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from met_lightning.data.base import ImageClassificationDataModule
from met_lightning.data.images import ImageListDataset, Sample, check_images, listing
from met_lightning.errors import ConfigError, DataError


@dataclass(frozen=True)
class VtabTask:
    name: str  # folder name under the VTAB-1K root
    num_classes: int
    group: str  # natural | specialized | structured


VTAB_TASKS: dict[str, VtabTask] = {
    name: VtabTask(name, num_classes, group)
    for group, tasks in (
        ("natural", {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102}),
        ("natural", {"oxford_iiit_pet": 37, "svhn": 10, "sun397": 397}),
        ("specialized", {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45}),
        ("specialized", {"diabetic_retinopathy": 5}),
        ("structured", {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4}),
        ("structured", {"dsprites_loc": 16, "dsprites_ori": 16}),
        ("structured", {"smallnorb_azi": 18, "smallnorb_ele": 9}),
    )
    for name, num_classes in tasks.items()
}

# List files of (train, val, test) for each `data.split`.
SPLITS = {
    "tune": ("train800.txt", "val200.txt", "val200.txt"),
    "final": ("train800val200.txt", "val200.txt", "test.txt"),
}
PREPARE_HINT = (
    "VTAB-1K must be prepared as in NOAH's README "
    "(https://github.com/ZhangYuanhan-AI/NOAH, section Data Preparation): "
    "<data.root>/<task>/ holds train800.txt, val200.txt, train800val200.txt, test.txt "
    "and the images they list"
)


class Vtab1kDataModule(ImageClassificationDataModule):
    """One VTAB-1K task from its list files.

    `split`: `tune` trains on train800, validates and tests on val200 (hyper-parameter search);
    `final` trains on train800val200, validates on val200 (part of train: monitoring only) and
    tests on test.txt, as the literature (VPT, NOAH, MET) reports.

    No augmentation by default (the VTAB-1K recipe: resize only). `check_files` reads the list
    files of `split` and checks labels and images (`images.check_images`, `skip_bad_images`).
    `class_names` are the label indices as strings (the list files carry no names).
    """

    def __init__(
        self,
        root: str,
        task: str,
        split: str = "final",
        num_classes: int | None = None,
        skip_bad_images: bool = False,
        **kwargs,
    ) -> None:
        if task not in VTAB_TASKS:
            raise ConfigError(
                f"data.task={task!r} is not a VTAB-1K task; valid tasks: {', '.join(VTAB_TASKS)}"
            )
        info = VTAB_TASKS[task]
        if num_classes is not None and int(num_classes) != info.num_classes:
            raise ConfigError(
                f"data.num_classes={num_classes}, but VTAB-1K task {task!r} has "
                f"{info.num_classes} classes; set data.num_classes={info.num_classes} or null"
            )
        if split not in SPLITS:
            raise ConfigError(
                f"data.split={split!r} must be 'tune' (train800 / val200) or 'final' "
                "(train800val200 / test)"
            )
        super().__init__(num_classes=info.num_classes, **kwargs)
        self.root = Path(root).expanduser()
        self.task = task
        self.task_dir = self.root / task
        self.group = info.group
        self.split = split
        self.skip_bad_images = bool(skip_bad_images)
        self._splits: list[tuple[list[Sample], str]] | None = None  # (samples, list file)

    def _samples(self, list_name: str) -> list[Sample]:
        """(absolute image path, label) of every non-empty line `relative/path label` of the list
        file `list_name`, checked: labels, files, images (`check_images`)."""
        path = self.task_dir / list_name
        if not path.is_file():
            raise DataError(f"VTAB-1K list file {path} does not exist. {PREPARE_HINT}.")
        samples: list[Sample] = []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            try:
                relative, label = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}, line {number}: expected 'relative/path label', got {line.strip()!r}"
                ) from None
            if not 0 <= label < self.num_classes:
                raise DataError(
                    f"{path}, line {number}: label {label} is outside 0..{self.num_classes - 1} "
                    f"(the task has {self.num_classes} classes)"
                )
            samples.append((path.parent / relative, label))
        if not samples:
            raise DataError(f"VTAB-1K list file {path} lists no images. {PREPARE_HINT}.")
        if missing := [image for image, _ in samples if not image.is_file()]:
            raise DataError(
                f"{len(missing)} image(s) listed in {path} do not exist: {listing(missing)}. "
                f"{PREPARE_HINT}"
            )
        return check_images(samples, str(path), self.task_dir, self.skip_bad_images)

    def check_files(self) -> None:
        """Read and check the list files of `data.split` and their images (kept for setup)."""
        if self._splits is not None:
            return
        if not self.task_dir.is_dir():
            raise DataError(
                f"VTAB-1K task folder {self.task_dir} does not exist (data.root={self.root}, "
                f"data.task={self.task}). {PREPARE_HINT}."
            )
        names = SPLITS[self.split]
        lists = {name: self._samples(name) for name in dict.fromkeys(names)}
        self._splits = [(lists[name], str(self.task_dir / name)) for name in names]

    def _build_splits(self) -> tuple[ImageListDataset, ...]:
        self.check_files()
        return tuple(ImageListDataset(s, self.input_spec, source=src) for s, src in self._splits)
