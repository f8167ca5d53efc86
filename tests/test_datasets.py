"""Real-format datasets (CIFAR-100 pickles through `data=cifar100`'s torchvision DataModule,
VTAB-1K list files, image folders) on tiny files."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import shutil
import socket
import tarfile
import time

import numpy as np
import pytest
import torch

from met_lightning.data import cifar, torchvision_data
from met_lightning.data.base import InputSpec
from met_lightning.data.image_folder import ImageFolderDataModule
from met_lightning.data.images import stratified_indices
from met_lightning.data.torchvision_data import DATASETS, TorchvisionDataModule
from met_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    resolve_normalization,
    train_transform,
)
from met_lightning.data.vtab import VTAB_TASKS, Vtab1kDataModule
from met_lightning.errors import ConfigError, DataError
from tests.data_fixtures import (
    CIFAR100_CLASSES,
    VTAB_TASK,
    cifar_file,
    write_cifar100,
    write_class_folders,
    write_image,
    write_vtab_task,
)

# Distinct statistics, so that "backbone" cannot be confused with the other options.
SPEC = InputSpec((3, 32, 32), (0.1, 0.2, 0.3), (0.2, 0.25, 0.5), "bicubic")
STATS = {
    "backbone": (SPEC.mean, SPEC.std),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5,) * 3, (0.5,) * 3),
    "none": ((0.0,) * 3, (1.0,) * 3),
}


def ready(dm):
    dm.setup()
    return dm


def prepared(dm, dataset, index: int, train: bool = False) -> torch.Tensor:
    """Sample `index` as the model gets it: the uint8 image through the DataModule's batched
    device transform (`on_after_batch_transfer`)."""
    return dm.prepare_batch(dataset[index][0][None], train)[0]


def labels_of(dataset) -> list[int]:
    return [int(y) for y in dataset.targets]


# ---------------------------------------------------------------------------- transforms
def test_normalization_options():
    assert resolve_normalization(SPEC, "none") is None
    assert resolve_normalization(SPEC, False) is None
    assert resolve_normalization(SPEC, True) == (SPEC.mean, SPEC.std)
    for name in ("backbone", "imagenet", "half"):
        assert resolve_normalization(SPEC, name) == STATS[name]
    grey = InputSpec((1, 32, 32), (0.5,), (0.5,))
    mean, std = resolve_normalization(grey, "imagenet")
    assert mean == pytest.approx((np.mean(IMAGENET_MEAN),)) and len(std) == 1
    with pytest.raises(ConfigError, match="data.normalize='imagnet'.*backbone, imagenet"):
        resolve_normalization(SPEC, "imagnet")
    # the original boolean of eval_transform, and augment=False = the eval transform
    x = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    torch.testing.assert_close(eval_transform(SPEC)(x), eval_transform(SPEC, "backbone")(x))
    torch.testing.assert_close(train_transform(SPEC, "half")(x), eval_transform(SPEC, "half")(x))
    augmented = train_transform(SPEC, "none", augment=True)
    out = torch.stack([augmented(x) for _ in range(4)])
    assert out.shape == (4, 3, 32, 32) and 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.equal(out[0], out[1])  # random crops


# ---------------------------------------------------------------------------- CIFAR-100
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    return root


CIFAR100_URL = DATASETS["CIFAR100"].url


def make_cifar(root, **kwargs):
    """`data=cifar100`'s DataModule; val_fraction 1/3: one of each class's 3 training images."""
    kwargs = {"input_spec": SPEC, "val_fraction": 1 / 3, "batch_size": 16, **kwargs}
    return TorchvisionDataModule(name="CIFAR100", root=str(root), **kwargs)


def test_cifar_splits_labels_and_names(cifar_root):
    dm = ready(make_cifar(cifar_root, seed=3))
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [200, 100, 100]
    assert dm.num_classes == 100 and dm.class_names == list(CIFAR100_CLASSES)
    assert dm.class_names[:3] == ["apple", "aquarium_fish", "baby"]
    # stratified: each of the 100 classes (3 images each) gives one image to val
    assert sorted(labels_of(dm.val_set)) == list(range(100))
    assert (
        labels_of(dm.test_set) == cifar_file(cifar_root / "cifar-100-python", "test")["fine_labels"]
    )
    # train + val = the 300 training images, no overlap
    pixels = [{img.numpy().tobytes() for img in ds.images} for ds in (dm.train_set, dm.val_set)]
    assert len(pixels[0] | pixels[1]) == 300 and not pixels[0] & pixels[1]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8  # stored, unscaled
    assert labels.dtype == torch.long


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_reader_gives_the_files_tensors_bit_for_bit(cifar_root, split):
    """torchvision's reader (HWC) gives back the files' channel-major uint8 rows in file order."""
    folder = cifar_root / "cifar-100-python"
    entry = cifar_file(folder, split)
    images, labels, names = cifar.read_split(folder, split)
    expected = torch.from_numpy(entry["data"].reshape(-1, 3, 32, 32))
    assert images.dtype == torch.uint8 and images.is_contiguous()
    assert torch.equal(images, expected)
    assert labels.dtype == torch.int64 and labels.tolist() == entry["fine_labels"]
    assert names == cifar_file(folder, "meta")["fine_label_names"] == list(CIFAR100_CLASSES)
    if split == "test":  # the data module's test split is the file as it is
        dm = ready(make_cifar(cifar_root))
        assert torch.equal(dm.test_set.images, expected) and torch.equal(dm.test_set.labels, labels)


def test_cifar_split_fixed_by_seed(cifar_root):
    a, b, c = (ready(make_cifar(cifar_root, seed=s)) for s in (1, 1, 2))
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)


@pytest.mark.parametrize("normalize", list(STATS))
def test_cifar_normalization(cifar_root, normalize):
    dm = ready(make_cifar(cifar_root, normalize=normalize))
    raw = cifar_file(cifar_root / "cifar-100-python", "test")["data"][0]
    expected = torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255.0
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in STATS[normalize])
    image, label = prepared(dm, dm.test_set, 0), dm.test_set[0][1]
    assert label == 0
    torch.testing.assert_close(image, (expected - mean) / std)


def test_cifar_resizes_and_augments(cifar_root):
    spec = InputSpec((3, 48, 48), (0.5,) * 3, (0.5,) * 3)
    dm = ready(make_cifar(cifar_root, augment=True, input_spec=spec))
    train = dm.prepare_batch(torch.stack([dm.train_set[0][0]] * 2), train=True)
    assert train.shape == (2, 3, 48, 48) == (2, *prepared(dm, dm.test_set, 0).shape)
    assert not torch.equal(train[0], train[1])  # random augmentation
    assert torch.equal(prepared(dm, dm.val_set, 0), prepared(dm, dm.val_set, 0))  # deterministic
    grey = ready(make_cifar(cifar_root, input_spec=InputSpec((1, 32, 32), (0.5,), (0.5,))))
    assert prepared(grey, grey.test_set, 0).shape == (1, 32, 32)


def test_cifar_prepare_data_is_a_no_op_when_files_exist(cifar_root, monkeypatch):
    monkeypatch.setattr(torchvision_data, "host_reachable", pytest.fail)  # no network
    before = sorted((p, p.stat().st_mtime_ns) for p in cifar_root.rglob("*"))
    make_cifar(cifar_root, download=True).prepare_data()
    assert sorted((p, p.stat().st_mtime_ns) for p in cifar_root.rglob("*")) == before


def test_cifar_missing_files_without_download(tmp_path):
    dm = make_cifar(tmp_path, download=False)
    expected = f"cifar-100-python/{{train,test,meta}} under data.root={tmp_path}"
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    assert expected in str(err.value) and "data.download=true" in str(err.value)
    assert "cifar-100-python.tar.gz in data.root" in str(err.value)
    with pytest.raises(DataError, match=re.escape(expected)):
        ready(dm)  # setup without prepare_data


def test_cifar_offline_download_fails_fast(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/cifar-100-python.tar.gz"  # nothing listens on port 9: refused
    monkeypatch.setitem(DATASETS, "CIFAR100", dataclasses.replace(DATASETS["CIFAR100"], url=url))
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        make_cifar(tmp_path, download=True).prepare_data()
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert url in message and "not reachable" in message
    assert f"cifar-100-python/{{train,test,meta}} under data.root={tmp_path}" in message


def test_cifar_download_probe_does_not_hang(tmp_path, monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("timed out")  # as a real connect would, long after the probe gave up

    monkeypatch.setattr(socket, "create_connection", hang)  # e.g. DNS that never answers
    monkeypatch.setattr(torchvision_data, "PROBE_TIMEOUT", 0.3)
    start = time.monotonic()
    with pytest.raises(DataError, match=re.escape(CIFAR100_URL)):
        make_cifar(tmp_path, download=True).prepare_data()
    assert time.monotonic() - start < 3


def test_cifar_download_error_is_a_data_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(torchvision_data, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", broken)
    with pytest.raises(DataError, match="connection reset by peer") as err:
        make_cifar(tmp_path, download=True).prepare_data()
    assert CIFAR100_URL in str(err.value)


def test_cifar_extracts_a_local_archive_offline(tmp_path, cifar_root, monkeypatch):
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_root / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(torchvision_data, "host_reachable", pytest.fail)
    dm = make_cifar(tmp_path, download=False)
    dm.prepare_data()
    assert len(ready(dm).test_set) == 100
    archive.write_bytes(archive.read_bytes()[:200])  # truncated: a DataError naming it
    shutil.rmtree(tmp_path / "cifar-100-python")
    with pytest.raises(DataError, match=f"cannot extract {re.escape(str(archive))}.*delete it"):
        make_cifar(tmp_path).prepare_data()


BAD_FILES = {  # case -> (file, what it holds, the message)
    "not a pickle": ("test", b"not a pickle", "cannot be read"),
    "a list": ("test", [1, 2], "cannot be read"),
    "no labels": ("test", {"data": np.zeros((10, 3072), np.uint8)}, "lacks the key 'fine_labels'"),
    "rows of 100": (
        "test", {"data": np.zeros((10, 100), np.uint8), "fine_labels": [0] * 10}, "reshape"
    ),
    "float": ("test", {"data": np.zeros((10, 3072), np.float32), "fine_labels": [0] * 10}, "uint8"),
    "label 100": (
        "test", {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [100]}, "outside 0..99"
    ),
    "meta not a pickle": ("meta", b"\x80\x02garbage", "cannot be read"),
    "10 names": ("meta", {"fine_label_names": ["a"] * 10}, "expected 100"),
}  # fmt: skip


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_cifar_corrupt_file(tmp_path, bad):
    name, content, message = BAD_FILES[bad]
    path = write_cifar100(tmp_path, n_train=120, n_test=10) / name
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        ready(make_cifar(tmp_path))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(normalize="imagnet"), "data.normalize"),
        (dict(val_size=0), "data.val_size"),
        (dict(val_fraction=0), "data.val_fraction"),
        (dict(num_classes=10), "data.num_classes"),
        (dict(batch_size=0), "data.batch_size"),
    ],
)
def test_cifar_bad_options(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_cifar(tmp_path, **kwargs)


def test_cifar_val_size_too_large(cifar_root):
    with pytest.raises(
        ConfigError,
        match=r"data.val_size: class .* 1 images in the val pool, fewer than the 2 asked; "
        r"lower data.val_size",
    ):
        ready(make_cifar(cifar_root, val_size=101))  # the pool: one image of each class


# ---------------------------------------------------------------------------- VTAB-1K
@pytest.fixture()
def vtab_root(tmp_path):
    write_vtab_task(tmp_path)
    return tmp_path


def make_vtab(root, **kwargs):
    return Vtab1kDataModule(
        root=str(root), **{"input_spec": SPEC, "task": VTAB_TASK, "batch_size": 4, **kwargs}
    )


def test_vtab_task_table():
    assert len(VTAB_TASKS) == 19
    groups = [t.group for t in VTAB_TASKS.values()]
    assert [groups.count(g) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    classes = {name: t.num_classes for name, t in VTAB_TASKS.items()}
    assert classes["cifar"] == 100 and classes["sun397"] == 397 and classes["dsprites_ori"] == 16
    assert classes["smallnorb_ele"] == 9 and classes["patch_camelyon"] == 2


@pytest.mark.parametrize(
    "split, sizes", [("tune", (8, 4, 4)), ("final", (12, 4, 8))], ids=["tune", "final"]
)
def test_vtab_splits(vtab_root, split, sizes):
    dm = ready(make_vtab(vtab_root, split=split))
    assert dm.num_classes == 4 and dm.class_names == ["0", "1", "2", "3"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == sizes
    assert labels_of(dm.val_set) == [0, 1, 2, 3]
    if split == "tune":
        assert dm.test_set.samples == dm.val_set.samples
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.long  # the files' size
    assert dm.prepare_batch(images).shape == (4, 3, 32, 32)


@pytest.mark.parametrize("normalize", list(STATS))
def test_vtab_normalization(vtab_root, normalize):
    from PIL import Image

    spec = InputSpec((3, 16, 16), SPEC.mean, SPEC.std)  # the files' size: no resize
    dm = ready(make_vtab(vtab_root, normalize=normalize, input_spec=spec))
    path, _ = dm.val_set.samples[0]
    assert path.suffix == ".png"  # lossless: exact pixels
    expected = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255.0
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in STATS[normalize])
    torch.testing.assert_close(prepared(dm, dm.val_set, 0), (expected - mean) / std)
    assert dm.val_set[1][0].shape == (3, 16, 16)  # JPEG


def test_vtab_missing_task_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "dtd"))) as err:
        ready(make_vtab(tmp_path, task="dtd"))
    assert "NOAH" in str(err.value)


def test_vtab_missing_list_file(vtab_root):
    path = vtab_root / VTAB_TASK / "test.txt"
    path.unlink()
    ready(make_vtab(vtab_root, split="tune"))  # tune does not need test.txt
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        ready(make_vtab(vtab_root, split="final"))
    assert "NOAH" in str(err.value)


def test_vtab_label_out_of_range(vtab_root):
    path = vtab_root / VTAB_TASK / "val200.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(maxsplit=1)[0] + " 4"  # kitti has labels 0..3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: label 4 is outside 0..3")):
        ready(make_vtab(vtab_root))


def test_vtab_malformed_line(vtab_root):
    path = vtab_root / VTAB_TASK / "train800.txt"
    path.write_text(path.read_text() + "images/extra.png\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 9")):
        ready(make_vtab(vtab_root, split="tune"))


def test_vtab_missing_image(vtab_root):
    image = vtab_root / VTAB_TASK / "images" / "test" / "0003.jpg"
    image.unlink()
    with pytest.raises(DataError, match=re.escape(str(image))) as err:
        ready(make_vtab(vtab_root, split="final"))
    assert "test.txt" in str(err.value)


def test_vtab_undecodable_image_named_at_setup_or_when_loaded(vtab_root):
    """Not an image at all: the header check at setup counts and names it. A truncated image
    (its header is fine): named when it is loaded."""
    image = vtab_root / VTAB_TASK / "images" / "val200" / "0001.jpg"
    image.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    with pytest.raises(DataError, match="1 undecodable image") as err:
        ready(make_vtab(vtab_root, split="tune"))
    assert "images/val200/0001.jpg" in str(err.value) and "skip_bad_images" in str(err.value)
    write_image(image, np.random.default_rng(0))
    png = vtab_root / VTAB_TASK / "images" / "val200" / "0002.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated: setup does not decode
    dm = ready(make_vtab(vtab_root, split="tune"))
    assert prepared(dm, dm.val_set, 0).shape == (3, 32, 32)
    with pytest.raises(DataError, match=re.escape(str(png))) as err:
        dm.val_set[2]
    assert "skip_bad_images" in str(err.value)


def test_vtab_skip_bad_images(vtab_root, caplog):
    folder = vtab_root / VTAB_TASK / "images" / "train800"
    (folder / "0001.jpg").write_bytes(b"garbage")
    png = (folder / "0002.png").read_bytes()
    (folder / "0002.png").write_bytes(png[: len(png) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="met_lightning"):
        dm = ready(make_vtab(vtab_root, split="tune", skip_bad_images=True))
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 undecodable image(s)" in warnings[0] and "train800.txt" in warnings[0]
    assert "images/train800/0001.jpg" in warnings[0] and "images/train800/0002.png" in warnings[0]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_classes=10), "data.num_classes=10.*4 classes"),
        (dict(task="cifar10"), "data.task='cifar10'.*caltech101"),
        (dict(split="train"), "data.split='train'"),
        (dict(normalize="imagenet21k"), "data.normalize"),
    ],
)
def test_vtab_bad_options(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_vtab(tmp_path, **kwargs)


def test_vtab_num_classes_matching_the_task(tmp_path):
    assert make_vtab(tmp_path, task="dtd", num_classes=47).num_classes == 47
    assert make_vtab(tmp_path, task="sun397").num_classes == 397


# ---------------------------------------------------------------------------- image folders
CLASSES = ["cat", "dog", "zebra"]


def make_folder(root, **kwargs):
    return ImageFolderDataModule(root=str(root), **{"input_spec": SPEC, "batch_size": 4, **kwargs})


def test_image_folder_split_layout(tmp_path):
    write_class_folders(tmp_path / "train", CLASSES, 4)
    write_class_folders(tmp_path / "val", CLASSES, 2, seed=1, suffix=".jpg")
    write_class_folders(tmp_path / "test", CLASSES[:2], 3, seed=2)  # a class may be absent
    dm = make_folder(tmp_path)
    assert dm.num_classes == 3 and dm.class_names == CLASSES  # known before setup
    ready(dm)
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [12, 6, 6]
    assert labels_of(dm.val_set) == [0, 0, 1, 1, 2, 2]
    assert dm.test_set.samples[3][0] == tmp_path / "test" / "dog" / "000.png"
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.long  # the files' size
    assert dm.prepare_batch(images).shape == (4, 3, 32, 32)


def test_image_folder_without_test_tests_on_val(tmp_path, caplog):
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_class_folders(tmp_path / "val", CLASSES, 1)
    with caplog.at_level(logging.INFO, logger="met_lightning"):
        dm = ready(make_folder(tmp_path))
    assert dm.test_set.samples == dm.val_set.samples and len(dm.train_set) == 6
    assert any("testing on" in r.getMessage() for r in caplog.records)


def test_image_folder_without_val_carves_it_from_train(tmp_path, caplog):
    write_class_folders(tmp_path / "train", CLASSES, 10)
    write_class_folders(tmp_path / "test", CLASSES, 1)
    with caplog.at_level(logging.INFO, logger="met_lightning"):
        dm = ready(make_folder(tmp_path, val_fraction=0.2))
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [24, 6, 3]
    assert sorted(labels_of(dm.val_set)) == [0, 0, 1, 1, 2, 2]
    assert not {p for p, _ in dm.train_set.samples} & {p for p, _ in dm.val_set.samples}
    assert any("validating on a stratified 20%" in r.getMessage() for r in caplog.records)


def test_image_folder_single_layout_split(tmp_path):
    write_class_folders(tmp_path, CLASSES, 10)
    write_image(tmp_path / "dog" / "nested" / "extra.JPEG", np.random.default_rng(0))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"")

    def split(seed):
        dm = ready(make_folder(tmp_path, val_fraction=0.2, test_fraction=0.3, seed=seed))
        return [sorted(p for p, _ in ds.samples) for ds in (dm.train_set, dm.val_set, dm.test_set)]

    a = split(0)
    assert [len(s) for s in a] == [16, 6, 9]  # dog: 11 images -> 5 / 2 / 3 (+1 train)
    assert len(set(a[0]) | set(a[1]) | set(a[2])) == 31
    assert a == split(0) and a != split(1)


def test_stratified_indices_keep_one_train_image_per_class():
    train, val, test = stratified_indices([0, 1, 1, 2, 2, 2], 0.5, 0.4, seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(6))
    assert 0 in train  # a class with one image keeps it for training


def test_image_folder_unknown_class_in_val(tmp_path):
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_class_folders(tmp_path / "val", ["cat", "horse"], 1)
    with pytest.raises(DataError, match=r"horse in .*val are not in .*train"):
        ready(make_folder(tmp_path))


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="data.root="):
        make_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no class folders"):
        make_folder(tmp_path)
    write_class_folders(tmp_path / "train", CLASSES, 2)
    with pytest.raises(DataError, match="neither val/ nor test/"):
        make_folder(tmp_path)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train" / "empty"))):
        ready(make_folder(tmp_path))


def test_image_folder_num_classes(tmp_path):
    write_class_folders(tmp_path, CLASSES, 2)
    assert make_folder(tmp_path, num_classes=3).num_classes == 3
    with pytest.raises(ConfigError, match="data.num_classes=5.*3 class folders"):
        make_folder(tmp_path, num_classes=5)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        make_folder(tmp_path, val_fraction=0.0)


def test_image_folder_grey_and_bad_images(tmp_path, caplog):
    rng = np.random.default_rng(0)
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_class_folders(tmp_path / "val", CLASSES, 1)
    grey = write_image(tmp_path / "train" / "cat" / "grey.png", rng, mode="L")
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="1 undecodable image.*dog/broken.jpg.*skip_bad_images"):
        ready(make_folder(tmp_path))  # not an image at all: the header check at setup
    write_image(bad, rng)
    bad.write_bytes(bad.read_bytes()[:-50])  # truncated: named when loaded
    dm = ready(make_folder(tmp_path))
    index = [p for p, _ in dm.train_set.samples]
    assert prepared(dm, dm.train_set, index.index(grey)).shape == (3, 32, 32)  # grey -> RGB
    with pytest.raises(DataError, match=re.escape(str(bad))):
        dm.train_set[index.index(bad)]
    with caplog.at_level(logging.WARNING, logger="met_lightning"):
        dm = ready(make_folder(tmp_path, skip_bad_images=True))
    assert bad not in [p for p, _ in dm.train_set.samples] and len(dm.train_set) == 7
    assert [r.getMessage() for r in caplog.records if "skipped 1" in r.getMessage()]
