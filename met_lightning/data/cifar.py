"""The CIFAR-10 / CIFAR-100 python-pickle files, read safely (`data=torchvision data.name=CIFAR100`
and `data=cifar100` read them here, not through torchvision's `pickle.load`).

Files: `<root>/cifar-100-python/{train,test,meta}` or `<root>/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}` of the official archives. The pickles are read by an unpickler that
builds plain data and numpy arrays only, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from met_lightning.errors import DataError


@dataclass(frozen=True)
class CifarFormat:
    """One archive's layout: its folder, the files of each split, the keys of labels and names."""

    name: str
    folder: str
    splits: dict[str, tuple[str, ...]]
    labels: str
    meta: str
    names: str
    num_classes: int


FORMATS = {
    "CIFAR10": CifarFormat(
        "CIFAR-10", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "labels", "batches.meta", "label_names", 10,
    ),
    "CIFAR100": CifarFormat(
        "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
        "fine_labels", "meta", "fine_label_names", 100,
    ),
}  # fmt: skip


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

    def __init__(self, file: BinaryIO, path: Path, what: str) -> None:
        super().__init__(file, encoding="latin1")  # the Python-2 strings of the real files
        self.path, self.what = path, what

    def find_class(self, module: str, name: str) -> object:
        if (found := self.allowed.get((module, name))) is None:
            raise DataError(
                f"{self.what} file {self.path} refers to the Python global {module}.{name}, which "
                f"{self.what} files never do (it could run code): refused. Delete "
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


def _load(path: Path, what: str) -> dict:
    """The dict a CIFAR pickle holds, keys as str (files written with bytes keys too)."""
    with open(path, "rb") as f:
        entry = _CifarUnpickler(f, path, what).load()
    if not isinstance(entry, dict):
        raise TypeError(f"it holds a {type(entry).__name__}, not a dict")
    if _has_object_array(entry):
        raise DataError(
            f"{what} file {path} holds an array of Python objects (dtype object), which "
            f"{what} files never do: refused. Delete {path.parent} and download it again"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """DataError naming `path` for whatever reading it raises (unpickling fails in many ways)."""
    try:
        yield
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"{what} file {path} lacks the key {err}: not a {what} file") from None
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a bad file
        raise DataError(
            f"{what} file {path} cannot be read ({type(err).__name__}: {err}); delete "
            f"{path.parent} and download it again"
        ) from None


def read_split(
    folder: Path, split: str, fmt: CifarFormat = FORMATS["CIFAR100"]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, 3, 32, 32], int64 labels [N] of the `train` / `test` files of `fmt` in
    `folder` (e.g. root/cifar-100-python) and the label names of its meta file, checked."""
    what, rows, labels = fmt.name, [], []
    for name in fmt.splits[split]:
        path = folder / name
        with _reading(path, what):
            entry = _load(path, what)
            data = np.vstack([entry["data"]])  # [N, 3072], channel-major rows
            got = np.asarray(entry[fmt.labels], dtype=np.int64)
            if data.size % 3072:
                raise ValueError(f"cannot reshape 'data' of shape {data.shape} into [N, 3, 32, 32]")
        if data.dtype != np.uint8:
            raise DataError(f"{what} file {path}: 'data' is {data.dtype}, expected uint8")
        data = data.reshape(-1, 3, 32, 32)
        if got.ndim != 1 or len(got) != len(data):
            raise DataError(f"{what} file {path}: {len(data)} images but {got.size} labels")
        if len(got) and not (0 <= got.min() and got.max() < fmt.num_classes):
            raise DataError(f"{what} file {path}: labels outside 0..{fmt.num_classes - 1}")
        rows.append(data)
        labels.append(got)
    meta = folder / fmt.meta
    with _reading(meta, what):
        names = list(_load(meta, what)[fmt.names])
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if len(names) != fmt.num_classes or not all(isinstance(n, str) for n in names):
        raise DataError(f"{what} file {meta}: expected {fmt.num_classes} '{fmt.names}'")
    data = np.ascontiguousarray(np.concatenate(rows))
    return torch.from_numpy(data), torch.from_numpy(np.concatenate(labels)), names
