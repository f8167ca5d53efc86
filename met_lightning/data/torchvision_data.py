"""Any torchvision classification dataset by name (`data=torchvision data.name=FashionMNIST`).

`DATASETS` is the one table of what the DataModule knows about each name: torchvision's class,
how it spells its official splits (`train=True/False`, `split="train"/"val"/"test"`), the number
of classes, the files it needs under `data.root`, and the host it downloads from. The splits:

- official train / val / test where torchvision has them;
- no official val: a seeded per-class `data.val_fraction` of the train split validates;
- no official test (EuroSAT, Caltech101): a seeded per-class `data.test_fraction` tests;
- few-shot, on any dataset: `data.train_per_class` / `data.val_per_class` images per class, or
  `data.train_size` / `data.val_size` in all (VTAB-1K: 800 / 200, class-balanced), drawn with
  `data.seed` from the train / val pools above (disjoint); the test split is kept whole.

Reading: torchvision's classes read the real formats (download=False unless `data.download`),
except the Debian layout of Fashion-MNIST / MNIST / KMNIST (the four `.gz` idx files directly in
`data.root`: `apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/
fashion-mnist/), read here by `read_idx`, which checks the magic number and the sizes, and
CIFAR-10 / -100, read by `cifar.read_split` (no code runs from a pickle, no md5 needed; their
archive already in `data.root` is unpacked there without the network). Images
keep their stored size and mode: arrays (MNIST family, CIFAR, SVHN, STL10) as uint8 tensors (grey
stays one channel and is replicated on the device, as the image-mode rule of `transforms` says),
PIL images through `transforms.to_input_mode`.
"""

from __future__ import annotations

import difflib
import gzip
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import utils as download_utils
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from met_lightning.data import cifar
from met_lightning.data.base import ImageClassificationDataModule, check_fractions
from met_lightning.data.images import LabelledImages, TensorImageDataset, stratified_indices
from met_lightning.data.transforms import to_input_mode
from met_lightning.errors import ConfigError, DataError
from met_lightning.paths import host_reachable
from met_lightning.spec import InputSpec

log = logging.getLogger(__name__)

# The four idx files of the MNIST family, torchvision's raw names (the Debian layout adds .gz).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# the Debian layout: the four files, gzip-compressed, directly in one folder
IDX_GZ = tuple(f"{name}.gz" for pair in IDX_FILES.values() for name in pair)
IDX_UBYTE = 0x08  # the idx type code of unsigned bytes
# Seconds the download host may take to accept a connection before we call the machine offline.
PROBE_TIMEOUT = 3.0
APT_HINT = (
    "or `apt-get install dataset-fashion-mnist` and data.root=/usr/share/datasets/fashion-mnist"
)


@dataclass(frozen=True)
class TvDataset:
    """One torchvision dataset: `cls` (the class name in torchvision.datasets), the keyword
    arguments of its official splits (None: no such split), its classes, the paths (relative to
    data.root) that must exist for download=False, the URL whose host a download needs."""

    cls: str
    num_classes: int
    train: dict[str, Any]
    val: dict[str, Any] | None
    test: dict[str, Any] | None
    files: tuple[str, ...]
    url: str
    extra: dict[str, Any] = field(default_factory=dict)  # constructor arguments of every split
    idx_layout: bool = False  # also read from the Debian layout (four .gz idx files in root)


_SPLIT = {"split": "train"}, {"split": "val"}, {"split": "test"}


def _train_test(cls: str, num_classes: int, files: Sequence[str], url: str, **extra: Any):
    """A dataset with an official train and test split and no val split: `train=True/False`
    (`flag=True`) or `split="train"/"test"`."""
    flag = extra.pop("flag", False)
    train, test = ({"train": True}, {"train": False}) if flag else (_SPLIT[0], _SPLIT[2])
    return TvDataset(cls, num_classes, train, None, test, tuple(files), url, **extra)


def _cifar(cls: str, url: str) -> TvDataset:
    fmt = cifar.FORMATS[cls]
    files = [f"{fmt.folder}/{n}" for n in (*fmt.splits["train"], *fmt.splits["test"], fmt.meta)]
    return _train_test(cls, fmt.num_classes, files, url, flag=True)


def _mnist_like(cls: str, url: str) -> TvDataset:
    files = [f"{cls}/raw/{name}" for pair in IDX_FILES.values() for name in pair]
    return _train_test(cls, 10, files, url, flag=True, idx_layout=True)


DATASETS: dict[str, TvDataset] = {
    "MNIST": _mnist_like("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "FashionMNIST": _mnist_like(
        "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    ),
    "KMNIST": _mnist_like("KMNIST", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
    # EMNIST "balanced" (47 classes); torchvision gives its images as stored (transposed)
    "EMNIST": _train_test(
        "EMNIST", 47,
        [f"EMNIST/raw/emnist-balanced-{s}-{k}-ubyte"
         for s in ("train", "test") for k in ("images-idx3", "labels-idx1")],
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip", flag=True,
        extra={"split": "balanced"},
    ),
    # read by `cifar.read_split` (a safe unpickler), not by torchvision's pickle.load
    "CIFAR10": _cifar("CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "CIFAR100": _cifar("CIFAR100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "SVHN": _train_test(
        "SVHN", 10, ("train_32x32.mat", "test_32x32.mat"),
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
    ),
    "STL10": _train_test(
        "STL10", 10,
        [f"stl10_binary/{n}" for n in
         ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")],
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    ),
    "Flowers102": TvDataset(
        "Flowers102", 102, *_SPLIT,
        ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
    ),
    "DTD": TvDataset(
        "DTD", 47, *_SPLIT, ("dtd/dtd/images", "dtd/dtd/labels"),
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
    ),
    "EuroSAT": TvDataset(
        "EuroSAT", 10, {}, None, None, ("eurosat/2750",),
        "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
    ),
    "OxfordIIITPet": TvDataset(
        "OxfordIIITPet", 37, {"split": "trainval"}, None, _SPLIT[2],
        ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations"),
        "https://thor.robots.ox.ac.uk/datasets/pets/images.tar.gz",
    ),
    "Food101": _train_test(
        "Food101", 101, ("food-101/images", "food-101/meta"),
        "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
    ),
    "GTSRB": _train_test(
        "GTSRB", 43,
        ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"),
        "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/",
    ),
    "FGVCAircraft": TvDataset(
        "FGVCAircraft", 100, *_SPLIT, ("fgvc-aircraft-2013b/data",),
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
    ),
    "Country211": TvDataset(
        "Country211", 211, _SPLIT[0], {"split": "valid"}, _SPLIT[2],
        ("country211/train", "country211/valid", "country211/test"),
        "https://openaipublic.azureedge.net/clip/data/country211.tgz",
    ),
    "Caltech101": TvDataset(
        "Caltech101", 101, {}, None, None, ("caltech101/101_ObjectCategories",),
        "https://drive.google.com/file/d/137RyRjvTBkBiIfeYBNZBtViDHQ6_Ewsp",
    ),
}  # fmt: skip
SPLITS = ("train", "val", "test")


def _braced(paths: Sequence[str]) -> str:
    """`a/{x,y}` for paths that share a folder, else the paths joined by commas."""
    folders = {p.rsplit("/", 1)[0] if "/" in p else "" for p in paths}
    if len(paths) > 1 and len(folders) == 1 and "" not in folders:
        return f"{folders.pop()}/{{{','.join(p.rsplit('/', 1)[1] for p in paths)}}}"
    return ", ".join(paths)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def lookup(name: str) -> TvDataset:
    """The table entry of `name` (case, `-` and `_` ignored: fashion_mnist is FashionMNIST); else
    a ConfigError listing the known names, with a did-you-mean."""
    by_key = {_key(known): entry for known, entry in DATASETS.items()}
    if (entry := by_key.get(_key(str(name)))) is not None:
        return entry
    close = difflib.get_close_matches(_key(str(name)), list(by_key), n=1, cutoff=0.6)
    hint = f" Did you mean {by_key[close[0]].cls}?" if close else ""
    raise ConfigError(
        f"data.name={name!r} is not a torchvision dataset this DataModule knows.{hint} "
        f"Known: {', '.join(DATASETS)}"
    )


# ---------------------------------------------------------------------- idx files
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an idx file (gzip-compressed if its name ends in .gz) with `ndim`
    dimensions; a DataError naming the file for a bad gzip stream, magic number or size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"idx file {path} cannot be read ({type(err).__name__}: {err})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or raw[3] != ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(
            f"idx file {path}: magic number {magic}, expected 0000080{ndim} (unsigned bytes, "
            f"{ndim} dimension(s)): not an idx{ndim}-ubyte file"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"idx file {path}: the header says {'x'.join(map(str, dims))} = {expected} bytes of "
            f"data, the file holds {len(raw) - header}: truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def has_idx_layout(folder: Path) -> bool:
    """Whether `folder` holds the Debian layout's four `.gz` idx files."""
    return all((folder / name).is_file() for name in IDX_GZ)


def read_idx_split(folder: Path, split: str, num_classes: int) -> tuple[torch.Tensor, ...]:
    """uint8 images [N, 1, H, W] and int64 labels [N] of the Debian layout's `split`."""
    images_name, labels_name = (f"{name}.gz" for name in IDX_FILES[split])
    images = read_idx(folder / images_name, 3)
    labels = read_idx(folder / labels_name, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{folder / images_name} holds {len(images)} images but {folder / labels_name} "
            f"{len(labels)} labels"
        )
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{folder / labels_name}: labels outside 0..{num_classes - 1}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)


# ---------------------------------------------------------------------- torchvision datasets
def dataset_labels(dataset: Dataset) -> np.ndarray:
    """int64 labels of a torchvision dataset without decoding its images."""
    for attr in ("targets", "labels", "_labels", "y"):
        if (value := getattr(dataset, attr, None)) is not None:
            return np.asarray(value, dtype=np.int64).reshape(-1)
    samples = getattr(dataset, "_samples", None) or getattr(dataset, "samples", None)
    if samples is not None:
        return np.asarray([label for _, label in samples], dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def dataset_array(dataset: Dataset) -> torch.Tensor | None:
    """uint8 images [N, C, H, W] of a dataset held as one array (`.data`: MNIST family, CIFAR,
    SVHN, STL10), None for a dataset of files."""
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim not in (3, 4):
        return None
    if data.ndim == 3:
        return data.unsqueeze(1)
    if data.shape[1] not in (1, 3) and data.shape[-1] in (1, 3):  # [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    return data.contiguous()


class TorchvisionImages(LabelledImages):
    """(uint8 image [C, h, w] in the backbone's colour mode, label) of `indices` of a torchvision
    dataset of PIL images, by the image-mode rule (`transforms.to_input_mode`)."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, labels: np.ndarray, spec: InputSpec):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(labels[self.indices])
        self.spec = spec

    def image(self, index: int) -> torch.Tensor:
        where = int(self.indices[index])
        try:
            image = self.dataset[where][0]
        except Exception as err:  # a file of the dataset that cannot be read or decoded
            raise DataError(
                f"{type(self.dataset).__name__} (root {getattr(self.dataset, 'root', '?')}): "
                f"sample {where} cannot be read ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(image, Image.Image):
            raise DataError(f"{type(self.dataset).__name__} gave a {type(image).__name__}")
        return pil_to_tensor(to_input_mode(image, self.spec))


# ---------------------------------------------------------------------- few-shot draws
def _per_class_counts(
    per_class: int | None, total: int | None, num_classes: int, seed: int
) -> np.ndarray | None:
    """How many images each class gives: `per_class` each, or `total` spread evenly (the
    remainder to classes drawn by `seed`); None: all."""
    if per_class is not None:
        return np.full(num_classes, per_class)
    if total is None:
        return None
    counts = np.full(num_classes, total // num_classes)
    extra = np.random.default_rng([seed, 7]).permutation(num_classes)[: total % num_classes]
    counts[extra] += 1
    return counts


def draw_per_class(
    pool: np.ndarray, labels: np.ndarray, counts: np.ndarray, seed: int, key: str, split: str
) -> np.ndarray:
    """Sorted indices: `counts[c]` of `pool`'s images of each class c, drawn with `seed`; a
    ConfigError naming `key` if a class has fewer."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label, count in enumerate(counts):
        members = pool[labels[pool] == label]
        if len(members) < count:
            raise ConfigError(
                f"{key}: class {label} has {len(members)} images in the {split} pool, fewer than "
                f"the {count} asked; lower {key}"
            )
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _count(key: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ConfigError(f"data.{key}={value!r} must be a positive integer or null (all)")
    return int(value)


class TorchvisionDataModule(ImageClassificationDataModule):
    """A torchvision classification dataset by `name` (see the module docstring for the splits).

    `root`: torchvision's root (the folder holding e.g. FashionMNIST/raw/), or, for the MNIST
    family, a folder with the four `.gz` idx files. `download`: fetch what is missing in
    prepare_data (offline: a one-line DataError).
    """

    def __init__(
        self,
        name: str,
        root: str,
        download: bool = False,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_per_class: int | None = None,
        val_per_class: int | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        **kwargs,
    ) -> None:
        self.entry = lookup(name)
        if num_classes is not None and int(num_classes) != self.entry.num_classes:
            raise ConfigError(
                f"data.num_classes={num_classes}, but {self.entry.cls} has "
                f"{self.entry.num_classes} classes; set data.num_classes=null"
            )
        super().__init__(num_classes=self.entry.num_classes, **kwargs)
        self.name = self.entry.cls
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction, True)
        # few-shot draws: split -> (the option's key, images per class [num_classes] or None: all)
        self.draws: dict[str, tuple[str, np.ndarray | None]] = {}
        for split, per_class, size in (
            ("train", _count("train_per_class", train_per_class), _count("train_size", train_size)),
            ("val", _count("val_per_class", val_per_class), _count("val_size", val_size)),
        ):
            if per_class is not None and size is not None:
                raise ConfigError(
                    f"data.{split}_per_class and data.{split}_size are both set: give one "
                    f"(per class, or in all, class-balanced)"
                )
            if size is not None and size < self.num_classes:
                raise ConfigError(
                    f"data.{split}_size={size} is fewer than the {self.num_classes} classes of "
                    f"{self.name}: every class needs at least one image"
                )
            key = f"data.{split}_per_class" if per_class else f"data.{split}_size"
            self.draws[split] = key, _per_class_counts(per_class, size, self.num_classes, self.seed)
        names = getattr(getattr(tvd, self.entry.cls), "classes", None)
        if isinstance(names, list | tuple) and len(names) == self.num_classes:
            self.class_names = list(names)

    # ------------------------------------------------------------------ files
    @property
    def idx_folder(self) -> Path | None:
        """`root` when it holds the Debian layout (the four .gz idx files), else None."""
        return self.root if self.entry.idx_layout and has_idx_layout(self.root) else None

    @property
    def archive(self) -> Path | None:
        """CIFAR's archive when it is already in `root`: prepare_data unpacks it there, offline
        (no md5 needed: the files are read by the safe reader)."""
        path = self.root / Path(urlparse(self.entry.url).path).name
        return path if self.entry.cls in cifar.FORMATS and path.is_file() else None

    def _missing(self) -> list[str]:
        if self.idx_folder is not None:
            return []
        return [f for f in self.entry.files if not (self.root / f).exists()]

    def _where(self) -> str:
        text = f"{_braced(self.entry.files)} under data.root={self.root}"
        if self.entry.idx_layout:
            gz = _braced(IDX_GZ)
            text += f" (torchvision's layout), or {gz} directly in it (the Debian layout)"
        return text + (f", {APT_HINT}" if self.entry.cls == "FashionMNIST" else "")

    def _not_found(self) -> DataError:
        return DataError(
            f"{self.name} not found ({len(self._missing())} of {len(self.entry.files)} expected "
            f"paths missing): expected {self._where()}. Set data.download=true to fetch it from "
            f"{self.entry.url}, or put {Path(urlparse(self.entry.url).path).name} in data.root."
        )

    def _probe(self) -> None:
        if not host_reachable(self.entry.url, PROBE_TIMEOUT):
            raise DataError(
                f"cannot download {self.name} from {self.entry.url}: "
                f"{urlparse(self.entry.url).hostname} is not reachable (offline?). Put "
                f"{self._where()}."
            )

    def check_files(self) -> bool:
        """Before the backbone is built: the files are there (False), or prepare_data can extract
        the archive in root or download it (True); else a DataError naming the files."""
        if not self._missing():
            return False
        if self.archive is not None:
            return True
        if not self.download:
            raise self._not_found()
        self._probe()
        return True

    def _construct(self, kwargs: dict[str, Any], download: bool = False) -> Dataset:
        cls = getattr(tvd, self.entry.cls)
        try:
            return cls(str(self.root), download=download, **self.entry.extra, **kwargs)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - torchvision raises many kinds on bad data
            what = f"download {self.entry.url} to" if download else "read"
            raise DataError(
                f"torchvision could not {what} {self.name} ({', '.join(map(str, kwargs.items()))})"
                f" in data.root={self.root} ({type(err).__name__}: {err}); expected "
                f"{self._where()}"
            ) from None

    def prepare_data(self) -> None:
        """Extract the archive in root, or download what is missing when `download` (rank 0)."""
        if not self.check_files():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.archive is not None:
            try:
                download_utils.extract_archive(str(self.archive), str(self.root))
            except Exception as err:  # noqa: BLE001 - tar / gzip errors alike
                raise DataError(
                    f"cannot extract {self.archive} ({type(err).__name__}: {err}): delete it, "
                    f"or put {self._where()}"
                ) from None
            if self._missing():
                raise DataError(f"{self.archive} did not give {_braced(self._missing())}")
            return
        for split in SPLITS:
            if (kwargs := getattr(self.entry, split)) is not None:
                self._construct(kwargs, download=True)

    # ------------------------------------------------------------------ splits
    def _load(self, split: str) -> tuple[Callable, np.ndarray] | None:
        """(make(indices) -> Dataset, labels) of an official split, None if it has none."""
        if (kwargs := getattr(self.entry, split)) is None:
            return None
        if self.idx_folder is not None:
            images, labels = read_idx_split(self.idx_folder, split, self.num_classes)
            return self._tensor_maker(images, labels), labels.numpy()
        if fmt := cifar.FORMATS.get(self.entry.cls):
            images, labels, self.class_names = cifar.read_split(self.root / fmt.folder, split, fmt)
            return self._tensor_maker(images, labels), labels.numpy()
        dataset = self._construct(kwargs)
        labels = dataset_labels(dataset)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"{self.name} {split}: labels outside 0..{self.num_classes - 1}")
        if split == "train":
            names = getattr(dataset, "classes", None)
            if isinstance(names, list | tuple) and len(names) == self.num_classes:
                self.class_names = [str(n) for n in names]
        if (array := dataset_array(dataset)) is not None:
            return self._tensor_maker(array, torch.from_numpy(labels)), labels
        return (lambda idx: TorchvisionImages(dataset, idx, labels, self.input_spec)), labels

    def _tensor_maker(self, images: torch.Tensor, labels: torch.Tensor) -> Callable:
        grey = None
        if self.input_spec.input_size[0] == 1 and images.shape[1] == 3:
            grey = v2.Grayscale(1)  # RGB to luma for a 1-channel backbone
        return lambda idx: TensorImageDataset(images[idx], labels[idx].long(), grey)

    def split_indices(self, labels: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        """{split: (source split, indices)} for train / val / test, from the official splits'
        labels (`labels[split]`, absent where there is none) by the rules of the module."""
        has_val, has_test = "val" in labels, "test" in labels
        parts = stratified_indices(
            labels["train"],
            0.0 if has_val else self.val_fraction,
            0.0 if has_test else self.test_fraction,
            self.seed,
        )
        out = {
            "train": ("train", parts[0]),
            "val": ("val", np.arange(len(labels["val"]))) if has_val else ("train", parts[1]),
            "test": ("test", np.arange(len(labels["test"]))) if has_test else ("train", parts[2]),
        }
        if not has_test and self.test_fraction == 0.0:
            out["test"] = out["val"]
        for offset, (split, (key, counts)) in enumerate(self.draws.items()):  # train, val
            if counts is not None:
                source, pool = out[split]
                seed = self.seed * 2 + offset
                out[split] = source, draw_per_class(pool, labels[source], counts, seed, key, split)
        for split, (_, idx) in out.items():
            if len(idx) == 0:
                raise ConfigError(
                    f"the {split} split of {self.name} is empty: raise data.{split}_fraction"
                )
        return out

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        if self._missing():
            raise self._not_found()
        loaded = {split: value for split in SPLITS if (value := self._load(split)) is not None}
        plan = self.split_indices({split: labels for split, (_, labels) in loaded.items()})
        self.split_sizes = {split: len(idx) for split, (_, idx) in plan.items()}
        log.info("%s: %s", self.name, ", ".join(f"{s} {n}" for s, n in self.split_sizes.items()))
        return tuple(loaded[source][0](idx) for source, idx in plan.values())


def split_arrays(dm: TorchvisionDataModule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images [N, C, H, W], labels [N])} of a set-up DataModule's splits, for
    baselines on the very same images (stored size, no transform; images of one size)."""
    out = {}
    for split, dataset in zip(SPLITS, (dm.train_set, dm.val_set, dm.test_set), strict=True):
        if isinstance(dataset, TensorImageDataset):
            images, labels = dataset.images, dataset.labels
            if dataset.transform is not None:
                images = dataset.transform(images)
        else:
            images = torch.stack([dataset.image(i) for i in range(len(dataset))])
            labels = torch.as_tensor(dataset.labels)
        out[split] = (images.numpy(), labels.numpy())
    return out
