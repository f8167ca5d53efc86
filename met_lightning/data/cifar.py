"""CIFAR-100 (50 000 train / 10 000 test 32x32 images, 100 classes) from the python-pickle files.

Files: `<root>/cifar-100-python/{train,test,meta}` of the official archive. The pickles are read
by an unpickler that builds plain data and numpy arrays only, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR100
from torchvision.datasets import utils as download_utils
from torchvision.transforms import v2

from met_lightning.data.base import ImageClassificationDataModule
from met_lightning.data.images import LabelledImages
from met_lightning.errors import ConfigError, DataError
from met_lightning.paths import host_reachable

CIFAR100_URL = CIFAR100.url
CIFAR100_MD5 = CIFAR100.tgz_md5
FOLDER = CIFAR100.base_folder  # cifar-100-python
FILES = ("train", "test", "meta")
NUM_CLASSES = 100
# Seconds the download host may take to accept a connection before we call the machine offline.
PROBE_TIMEOUT = 3.0

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


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of Python 3 bytes call it (latin-1 only)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is refused")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    """The globals pickled numpy arrays (numpy 1 and 2 names) and bytes need: none runs code."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray", "_reconstruct"] = reconstruct
        allowed[f"{core}.multiarray", "scalar"] = scalar
        allowed[f"{core}.numeric", "_frombuffer"] = frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global (which a crafted file could
    call) is refused, so reading a data folder cannot run code."""

    allowed = _safe_globals()

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the Python-2 strings of the real files
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise DataError(
                f"CIFAR-100 file {self.path} refers to the Python global {module}.{name}, which "
                "CIFAR-100 files never do (it could run code): refused. Delete "
                f"{self.path.parent} and download it again"
            )
        return found


def _has_object_array(value: object) -> bool:
    """Whether `value` (nested dicts / lists / tuples) holds a numpy array of Python objects."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(v for v in item if not isinstance(v, (int, float, str, bytes)))
    return False


def _load(path: Path) -> dict:
    """The dict a CIFAR-100 pickle holds, keys as str (files written with bytes keys too)."""
    with open(path, "rb") as f:
        entry = _CifarUnpickler(f, path).load()
    if not isinstance(entry, dict):
        raise TypeError(f"it holds a {type(entry).__name__}, not a dict")
    if _has_object_array(entry):
        raise DataError(
            f"CIFAR-100 file {path} holds an array of Python objects (dtype object), which "
            f"CIFAR-100 files never do: refused. Delete {path.parent} and download it again"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """DataError naming `path` for whatever reading it raises (unpickling fails in many ways)."""
    try:
        yield
    except DataError:
        raise
    except KeyError as err:
        raise DataError(
            f"CIFAR-100 file {path} lacks the key {err}: not a CIFAR-100 file (CIFAR-10?)"
        ) from None
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a bad file
        raise DataError(
            f"CIFAR-100 file {path} cannot be read ({type(err).__name__}: {err}); delete "
            f"{path.parent} and download it again"
        ) from None


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, 3, 32, 32], int64 fine labels [N] of the `train` / `test` file in
    `folder` and the fine label names of its `meta` file (in label order), checked."""
    path = folder / split
    with _reading(path):
        entry = _load(path)
        data = np.vstack([entry["data"]])  # [N, 3072], channel-major rows
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        if data.size % 3072:
            raise ValueError(f"cannot reshape 'data' of shape {data.shape} into [N, 3, 32, 32]")
    if data.dtype != np.uint8:
        raise DataError(f"CIFAR-100 file {path}: 'data' is {data.dtype}, expected uint8")
    data = data.reshape(-1, 3, 32, 32)
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"CIFAR-100 file {path}: {len(data)} images but {labels.size} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        raise DataError(f"CIFAR-100 file {path}: fine labels outside 0..{NUM_CLASSES - 1}")
    meta = folder / "meta"
    with _reading(meta):
        names = list(_load(meta)["fine_label_names"])
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if len(names) != NUM_CLASSES or not all(isinstance(n, str) for n in names):
        raise DataError(f"CIFAR-100 file {meta}: expected {NUM_CLASSES} 'fine_label_names'")
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), names


class TensorImageDataset(LabelledImages):
    """(uint8 image [C, h, w], label) from in-memory tensors, through a uint8 -> uint8 `transform`
    if given."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:  # noqa: ANN001
        self.images = images
        self.labels = labels
        self.transform = transform

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


def split_train_val(labels: np.ndarray, val_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Sorted (train, val) indices: `val_size` images, stratified by class, fixed by `seed`."""
    index = np.arange(len(labels))
    try:
        train, val = train_test_split(index, test_size=val_size, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to stratify (only in tiny subsets): plain random
        train, val = train_test_split(index, test_size=val_size, random_state=seed)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


class Cifar100DataModule(ImageClassificationDataModule):
    """CIFAR-100: `val_size` of the 50 000 training images (stratified, fixed by `seed`) validate,
    the 10 000 test images test. The uint8 32x32 images are resized on the device to the
    backbone's input; `augment` adds RandomResizedCrop + horizontal flip on the training split."""

    def __init__(
        self,
        root: str,
        download: bool = False,
        val_size: int = 5000,
        num_classes: int = NUM_CLASSES,
        **kwargs,
    ) -> None:
        if num_classes != NUM_CLASSES:
            raise ConfigError(f"data.num_classes={num_classes}, but CIFAR-100 has 100 classes")
        super().__init__(num_classes=num_classes, **kwargs)
        if int(val_size) <= 0:
            raise ConfigError(f"data.val_size={val_size} must be a positive number of images")
        self.root = Path(root).expanduser()
        self.folder = self.root / FOLDER
        self.archive = self.root / Path(urlparse(CIFAR100_URL).path).name
        self.download = bool(download)
        self.val_size = int(val_size)
        self.class_names = list(CIFAR100_CLASSES)

    def _missing(self) -> list[Path]:
        return [self.folder / name for name in FILES if not (self.folder / name).is_file()]

    def _where(self) -> str:
        return (
            f"{self.folder}/{{{','.join(FILES)}}} (data.root={self.root} is the folder that "
            f"holds {FOLDER}/)"
        )

    def _how(self) -> str:
        return (
            "download the archive elsewhere and extract it so that the files are at "
            f"{self._where()}, or put {self.archive.name} itself in {self.root}"
        )

    def _not_found(self) -> DataError:
        return DataError(
            f"CIFAR-100 not found: missing {', '.join(map(str, self._missing()))}. Put the files "
            f"at {self._where()}, or set data.download=true to fetch {CIFAR100_URL} (the trainer "
            "downloads it in prepare_data)."
        )

    def _probe(self) -> None:
        """DataError within seconds if the download host cannot be reached."""
        if not host_reachable(CIFAR100_URL, PROBE_TIMEOUT):
            raise DataError(
                f"could not download CIFAR-100 from {CIFAR100_URL}: "
                f"{urlparse(CIFAR100_URL).hostname} is not reachable (offline?). "
                f"Either connect to the internet, or {self._how()}."
            )

    def check_files(self) -> None:
        """Before the backbone is built: the files are there, or can be extracted or fetched."""
        if not self._missing() or self.archive.is_file():
            return
        if not self.download:
            raise self._not_found()
        self._probe()

    def prepare_data(self) -> None:
        """Download and extract the archive unless the files are there (rank 0 only); an archive
        in data.root whose md5 matches is extracted without a download."""
        if not self._missing():
            return
        if not download_utils.check_integrity(str(self.archive), CIFAR100_MD5):
            if not self.download and not self.archive.is_file():
                raise self._not_found()
            self._probe()
        try:  # torchvision downloads the archive only if it is not there with the right md5
            download_utils.download_and_extract_archive(
                CIFAR100_URL, download_root=str(self.root), md5=CIFAR100_MD5
            )
        except Exception as err:  # noqa: BLE001 - urllib / md5 / tar errors alike
            raise DataError(
                f"could not download CIFAR-100 from {CIFAR100_URL} "
                f"({type(err).__name__}: {err}). Retry, or {self._how()}."
            ) from None
        if self._missing():
            raise DataError(
                f"the CIFAR-100 archive did not give {', '.join(map(str, self._missing()))}; "
                f"expected {self._where()}"
            )

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        if self._missing():
            raise self._not_found()
        train_images, train_labels, self.class_names = read_split(self.folder, "train")
        test_images, test_labels, _ = read_split(self.folder, "test")
        if self.val_size >= len(train_labels):
            raise ConfigError(
                f"data.val_size={self.val_size} must be smaller than the {len(train_labels)} "
                "training images"
            )
        train_idx, val_idx = split_train_val(train_labels.numpy(), self.val_size, self.seed)
        grey = v2.Grayscale(1) if self.input_spec.input_size[0] == 1 else None  # 1-channel backbone
        return (
            TensorImageDataset(train_images[train_idx], train_labels[train_idx], grey),
            TensorImageDataset(train_images[val_idx], train_labels[val_idx], grey),
            TensorImageDataset(test_images, test_labels, grey),
        )
