"""data=torchvision: the dataset table, idx files in both layouts, splits, few-shot draws, the
offline error; on small files written in the real formats (idx, CIFAR-10 pickles)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from met_lightning.data.base import build_datamodule
from met_lightning.data.torchvision_data import (
    DATASETS,
    IDX_FILES,
    TorchvisionDataModule,
    lookup,
    read_idx,
    split_arrays,
)
from met_lightning.errors import ConfigError, DataError
from met_lightning.paths import config_dir
from met_lightning.spec import InputSpec

SPEC = InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
GREY_SPEC = InputSpec((1, 32, 32), (0.5,), (0.5,), "bicubic")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx-ubyte file: magic 0x0000080N, N big-endian int32 sizes, the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # an image knows its label: checks images and labels stay paired
        out[split] = (images, labels.astype(np.uint8))
    return out


def write_idx_folder(folder: Path, arrays: dict, gz: bool) -> Path:
    """The four idx files of `arrays` in `folder` (`.gz`: the Debian layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images_name, labels_name) in IDX_FILES.items():
        for name, array in ((images_name, arrays[split][0]), (labels_name, arrays[split][1])):
            data = idx_bytes(array)
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return folder


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory) -> Path:
    return write_idx_folder(tmp_path_factory.mktemp("debian"), mnist_arrays(600, 200), gz=True)


def make(root: Path, name: str = "FashionMNIST", spec: InputSpec = SPEC, **kwargs):
    return TorchvisionDataModule(name, str(root), input_spec=spec, batch_size=16, **kwargs)


def ready(dm: TorchvisionDataModule) -> TorchvisionDataModule:
    dm.check_files()
    dm.setup()
    return dm


def test_names_are_looked_up_loosely_and_unknown_ones_listed():
    assert lookup("fashion_mnist").cls == "FashionMNIST" and lookup("cifar-10").cls == "CIFAR10"
    with pytest.raises(ConfigError, match=r"data.name='fashoin_mnist'.*Did you mean FashionMNIST"):
        lookup("fashoin_mnist")
    with pytest.raises(ConfigError, match=r"Known: MNIST, FashionMNIST, KMNIST"):
        lookup("imagenet")
    for entry in DATASETS.values():  # every name is a torchvision class
        import torchvision.datasets as tvd

        assert hasattr(tvd, entry.cls), entry.cls


def test_debian_layout_full_split_is_seeded_and_per_class(debian_root):
    dm = ready(make(debian_root, seed=3))
    assert dm.split_sizes == {"train": 540, "val": 60, "test": 200}
    assert dm.class_names[0] == "T-shirt/top" and dm.num_classes == 10
    arrays = split_arrays(dm)
    for split in ("train", "val", "test"):
        images, labels = arrays[split]
        assert images.shape[1:] == (1, 28, 28)  # grey kept as stored, one channel
        assert (images[:, 0, 0, 0] == labels).all()  # images and labels stay paired
    assert np.bincount(arrays["val"][1]).tolist() == [6] * 10
    again = split_arrays(ready(make(debian_root, seed=3)))
    other = split_arrays(ready(make(debian_root, seed=4)))
    assert (again["val"][0] == arrays["val"][0]).all()
    assert not np.array_equal(other["val"][0], arrays["val"][0])


def test_grey_images_follow_the_image_mode_rule(debian_root):
    dm = ready(make(debian_root, seed=0))
    images, _ = next(iter(dm.train_dataloader()))
    batch = dm.prepare_batch(images)
    assert images.dtype == torch.uint8 and batch.shape == (16, 3, 32, 32)
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])
    grey = ready(make(debian_root, spec=GREY_SPEC, seed=0))
    assert grey.prepare_batch(next(iter(grey.train_dataloader()))[0]).shape == (16, 1, 32, 32)


def test_few_shot_per_class_and_vtab_sizes(debian_root):
    dm = ready(make(debian_root, seed=1, train_per_class=8, val_per_class=2))
    arrays = split_arrays(dm)
    assert np.bincount(arrays["train"][1]).tolist() == [8] * 10
    assert np.bincount(arrays["val"][1]).tolist() == [2] * 10
    assert len(arrays["test"][1]) == 200  # the test split stays whole
    vtab = ready(make(debian_root, seed=1, train_size=95, val_size=20))
    assert vtab.split_sizes == {"train": 95, "val": 20, "test": 200}
    counts = np.bincount(split_arrays(vtab)["train"][1])
    assert counts.sum() == 95 and set(counts.tolist()) == {9, 10}


def test_impossible_and_conflicting_counts_name_the_key(debian_root):
    with pytest.raises(ConfigError, match=r"data.train_per_class: class 0 has 54 images"):
        ready(make(debian_root, train_per_class=100))
    with pytest.raises(ConfigError, match=r"data.val_per_class and data.val_size are both set"):
        make(debian_root, val_per_class=2, val_size=20)
    with pytest.raises(ConfigError, match=r"data.train_size=5 is fewer than the 10 classes"):
        make(debian_root, train_size=5)
    with pytest.raises(ConfigError, match=r"data.val_per_class=0 must be a positive integer"):
        make(debian_root, val_per_class=0)
    with pytest.raises(ConfigError, match=r"data.num_classes=7, but FashionMNIST has 10"):
        make(debian_root, num_classes=7)


def test_torchvision_layout_reads_through_torchvision(tmp_path):
    write_idx_folder(tmp_path / "KMNIST" / "raw", mnist_arrays(300, 100, seed=2), gz=False)
    dm = ready(make(tmp_path, "KMNIST", seed=0))
    assert dm.split_sizes == {"train": 270, "val": 30, "test": 100}
    images, labels = split_arrays(dm)["test"]
    assert (images[:, 0, 0, 0] == labels).all()


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:4] + b"\x00\x00\x00\x09" + b[8:], "header says"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic number 00000d03"),
        (lambda b: b[:-5], "truncated or corrupt"),
    ],
)
def test_malformed_idx_is_a_data_error(tmp_path, damage, match):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(idx_bytes(np.zeros((3, 4, 4), np.uint8)))))
    with pytest.raises(DataError, match=match):
        read_idx(path, 3)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot be read \(BadGzipFile"):
        read_idx(path, 3)


def test_mismatched_idx_pair_is_a_data_error(tmp_path):
    arrays = mnist_arrays(50, 20)
    arrays["train"] = (arrays["train"][0], arrays["train"][1][:40])
    write_idx_folder(tmp_path, arrays, gz=True)
    with pytest.raises(DataError, match="50 images but .* 40 labels"):
        ready(make(tmp_path))


def test_offline_error_is_one_line_naming_files_folder_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        make(tmp_path).check_files()
    text = str(err.value)
    assert "\n" not in text
    for part in ("FashionMNIST/raw/{train-images-idx3-ubyte", f"data.root={tmp_path}",
                 "train-images-idx3-ubyte.gz", "data.download=true",
                 "apt-get install dataset-fashion-mnist"):  # fmt: skip
        assert part in text, part
    with pytest.raises(DataError, match=r"cifar-10-batches-py/\{data_batch_1,"):
        make(tmp_path, "CIFAR10").check_files()


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    import met_lightning.data.torchvision_data as module

    monkeypatch.setattr(module, "host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(
        DataError,
        match=r"cannot download SVHN from http://ufldl.stanford.edu/housenumbers/train_32x32.mat: "
        r"ufldl.stanford.edu is not reach",
    ):
        make(tmp_path, "SVHN", download=True).check_files()


def write_cifar10(root: Path, n_per_batch: int = 20) -> None:
    """CIFAR-10's python pickles, small (its batches' and meta file's names and keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = (np.arange(n_per_batch) % 10).tolist()
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_arrays_and_official_test(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    # torchvision checks the real files' md5: accept these small ones
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    dm = ready(make(tmp_path, "cifar10", seed=0, val_fraction=0.2, val_per_class=2))
    assert dm.split_sizes == {"train": 80, "val": 20, "test": 20}
    assert dm.class_names[:2] == ["c0", "c1"]
    images, _ = split_arrays(dm)["train"]
    assert images.shape[1:] == (3, 32, 32)
    grey = ready(make(tmp_path, "CIFAR10", spec=GREY_SPEC, seed=0))
    assert split_arrays(grey)["test"][0].shape[1:] == (1, 32, 32)  # luma for 1 channel


def test_the_experiment_configs_compose_and_build(debian_root):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        root = f"data.root={debian_root}"
        few = compose("train", overrides=["+experiment=fashion_mnist_1k", root])
        full = compose("train", overrides=["+experiment=fashion_mnist", root])
    GlobalHydra.instance().clear()
    assert (few.data.train_size, few.data.val_size, full.data.val_fraction) == (800, 200, 0.1)
    dm = build_datamodule(full.data, SPEC)
    dm.setup()
    assert dm.split_sizes == {"train": 540, "val": 60, "test": 200}


@pytest.mark.skipif(
    not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="the Debian package is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist():
    dm = ready(make(DEBIAN, seed=0, train_size=800, val_size=200))
    assert dm.split_sizes == {"train": 800, "val": 200, "test": 10000}
    assert np.bincount(split_arrays(dm)["test"][1]).tolist() == [1000] * 10
