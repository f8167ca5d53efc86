"""Tiny datasets in the real on-disk formats: CIFAR-100 pickles, a VTAB-1K task, image folders."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# The fine label names of CIFAR-100 in label order (the `meta` file's `fine_label_names`).
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

VTAB_TASK = "kitti"  # 4 classes
VTAB_COUNTS = {"train800.txt": 8, "val200.txt": 4, "test.txt": 8}


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """`root/cifar-100-python/{train,test,meta}` as the official archive's files load with
    `pickle.load(f, encoding="latin1")` (their Python-2 strings come back as str): uint8 data
    [N, 3072] in channel-major order, balanced fine labels, the fine label names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        "fine_label_names": list(CIFAR100_CLASSES),
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def cifar_file(folder: Path, name: str) -> dict:
    """A CIFAR pickle's contents."""
    with (folder / name).open("rb") as f:
        return pickle.load(f, encoding="latin1")


class _Py2Pickler(pickle._Pickler):
    """Pickles str and bytes as Python 2's byte strings (BINSTRING), as the official CIFAR files
    hold their keys, names and array bytes (they load as str with encoding="latin1")."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _save_py2_string


def py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2 + numpy 1 wrote the official CIFAR files: protocol 2, byte
    strings, arrays rebuilt by `numpy.core.multiarray._reconstruct`."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar100_py2(root: Path, **kwargs) -> Path:
    """`write_cifar100`'s files (same contents) pickled as the official Python-2 files are."""
    folder = write_cifar100(root, **kwargs)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(py2_pickle(cifar_file(folder, name)))
    return folder


def write_image(path: Path, rng: np.random.Generator, size: int = 16, mode: str = "RGB") -> Path:
    """A random image; PNG / JPEG / ... by suffix (grey level with mode='L')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)
    return path


def write_vtab_task(root: Path, task: str = VTAB_TASK, num_classes: int = 4, seed: int = 0):
    """`root/<task>/` with PNG + JPEG images and the four list files (labels cycle over classes).

    Returns the task folder. train800val200.txt is train800 + val200, as in the real data.
    """
    rng = np.random.default_rng(seed)
    task_dir = root / task
    lines: dict[str, list[str]] = {}
    for list_name, count in VTAB_COUNTS.items():
        split = list_name.removesuffix(".txt")
        rows = []
        for i in range(count):
            suffix = ".png" if i % 2 == 0 else ".jpg"
            relative = f"images/{split}/{i:04d}{suffix}"
            write_image(task_dir / relative, rng)
            rows.append(f"{relative} {i % num_classes}")
        lines[list_name] = rows
    lines["train800val200.txt"] = lines["train800.txt"] + lines["val200.txt"]
    for list_name, rows in lines.items():
        (task_dir / list_name).write_text("\n".join(rows) + "\n")
    return task_dir


def write_class_folders(
    folder: Path, classes: list[str], per_class: int, seed: int = 0, suffix: str = ".png"
) -> None:
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            write_image(folder / name / f"{i:03d}{suffix}", rng, size=12)
