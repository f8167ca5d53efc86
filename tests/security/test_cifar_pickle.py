"""CIFAR-100 files are data: reading a crafted pickle runs no code, whatever its hashes."""

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from met_lightning.data import cifar
from met_lightning.errors import DataError
from tests.data_fixtures import (
    CIFAR100_CLASSES,
    cifar_file,
    py2_pickle,
    write_cifar100,
    write_cifar100_py2,
)


class Payload:
    """Pickles as a call of `func(*args)`: what unpickling a crafted file would run."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    """name -> a pickled object whose unpickling creates `marker` (or loads torch objects)."""
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "subprocess": Payload(subprocess.call, ["touch", str(marker)]),
        # torch.save's globals: rebuilding a storage calls torch.load on the pickled bytes
        "torch tensor": torch.zeros(2, 3072, dtype=torch.uint8),
    }


PAYLOADS = list(payloads("m"))


def split_file(data, n=2):
    return {
        "data": data,
        "fine_labels": list(range(n)),
        "filenames": [f"{i}.png" for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("where", ["data", "filenames", "meta"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_cifar_pickle_runs_no_code(tmp_path, payload, where, protocol):
    folder = write_cifar100(tmp_path / "root", n_train=4, n_test=2)
    marker = tmp_path / "pwned"
    evil = payloads(marker)[payload]
    if where == "meta":
        name, content = "meta", {"fine_label_names": [evil] * 100}
    else:
        name = "train"
        content = split_file(np.zeros((2, 3072), np.uint8))
        content[where] = evil if where == "data" else ["0.png", evil]
    (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))

    with pytest.raises(DataError) as err:
        cifar.read_split(folder, "train")
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and str(folder / name) in message
    assert "refers to the Python global" in message and "download it again" in message


def test_refused_global_is_named(tmp_path):
    folder = write_cifar100(tmp_path, n_train=4, n_test=2)
    (folder / "test").write_bytes(pickle.dumps(split_file(Payload(os.system, "true"))))
    with pytest.raises(DataError, match=r"the Python global (posix|nt)\.system"):
        cifar.read_split(folder, "test")


@pytest.mark.parametrize(
    "content",
    [
        split_file(np.array([[1, "x"]] * 2, dtype=object)),  # object arrays hold pickled objects
        {"fine_labels": [0], "data": [np.array([None], dtype=object)]},
    ],
)
def test_object_arrays_are_refused(tmp_path, content):
    folder = write_cifar100(tmp_path, n_train=4, n_test=2)
    (folder / "test").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError, match="dtype object") as err:
        cifar.read_split(folder, "test")
    assert str(folder / "test") in str(err.value) and "\n" not in str(err.value)


def test_only_latin1_bytes_are_decoded(tmp_path):
    """Protocol-2 pickles of Python 3 bytes call `_codecs.encode(text, "latin1")`; no other
    codec is reachable."""
    folder = write_cifar100(tmp_path, n_train=4, n_test=2)
    crafted = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (folder / "test").write_bytes(crafted)
    with pytest.raises(DataError, match="cannot be read.*rot13"):
        cifar.read_split(folder, "test")


def plain_split(folder, split):
    """The split as plain (unrestricted) pickle reads it: the reference."""
    entry, meta = cifar_file(folder, split), cifar_file(folder, "meta")
    images = torch.from_numpy(np.asarray(entry["data"]).reshape(-1, 3, 32, 32))
    return images, torch.tensor(entry["fine_labels"]), meta["fine_label_names"]


@pytest.mark.parametrize("writer", [write_cifar100, write_cifar100_py2])
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_format_files_load_as_plain_pickle_reads_them(tmp_path, writer, split):
    folder = writer(tmp_path, n_train=30, n_test=20, seed=4)
    images, labels, names = cifar.read_split(folder, split)
    expected_images, expected_labels, expected_names = plain_split(folder, split)
    assert images.dtype == torch.uint8 and images.shape == (len(expected_labels), 3, 32, 32)
    assert images.is_contiguous() and torch.equal(images, expected_images)
    assert labels.dtype == torch.int64 and torch.equal(labels, expected_labels)
    assert names == expected_names == list(CIFAR100_CLASSES)


def test_bytes_keys_and_names_are_read(tmp_path):
    """A file pickled by Python 3 with bytes keys and names reads like the str one."""
    folder = write_cifar100(tmp_path, n_train=6, n_test=4)
    reference = cifar.read_split(folder, "test")
    entry = cifar_file(folder, "test")
    (folder / "test").write_bytes(pickle.dumps({k.encode(): v for k, v in entry.items()}))
    names = [n.encode() for n in cifar_file(folder, "meta")["fine_label_names"]]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    images, labels, got_names = cifar.read_split(folder, "test")
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])
    assert got_names == reference[2]


def test_py2_fixture_is_the_official_format(tmp_path):
    """The fixture's pickles name the globals the official files name (numpy 1 module path)."""
    import pickletools

    raw = py2_pickle({"data": np.zeros((1, 3072), np.uint8)})
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
