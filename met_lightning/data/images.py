"""Datasets of image files (VTAB-1K list files, image folders): loading, checks and splits.

Every image is loaded in the backbone's colour mode by the rule of `transforms.to_input_mode`
(shared with predict); a file that cannot be read raises a DataError naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from met_lightning.data.base import InputSpec
from met_lightning.data.transforms import to_8bit, to_input_mode
from met_lightning.errors import DataError

log = logging.getLogger(__name__)

# What torchvision's ImageFolder accepts (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# How many file names a message lists before "...".
SHOWN = 5
SKIP_HINT = (
    "Replace or delete the file, or set data.skip_bad_images=true to drop undecodable images "
    "(one warning counts and names them)."
)

Sample = tuple[Path, int]


def listing(paths: Sequence[Path | str], root: Path | None = None) -> str:
    """The first `SHOWN` of `paths` (relative to `root` when inside it), then "..."."""
    names = [
        str(Path(p).relative_to(root)) if root and Path(p).is_relative_to(root) else str(p)
        for p in paths[:SHOWN]
    ]
    return ", ".join(names) + (", ..." if len(paths) > SHOWN else "")


# PIL's decoders, fed any bytes, raise more than OSError / ValueError (a fuzzed DDS header:
# NotImplementedError, an IM header with a 3-number size: TypeError, ...): every exception
# raised while opening or decoding a file means "undecodable", never a crash.


def decode_error(path: Path, header_only: bool = False) -> str | None:
    """Why PIL cannot fully decode the image at `path` and convert it to 8 bits by the rule of
    `transforms.to_8bit` (or, `header_only`, recognize its header), or None if it can."""
    try:
        with Image.open(path) as image:
            if not header_only:
                image.load()
                to_8bit(image)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def header_error(path: Path) -> str | None:
    """Why PIL does not recognize the file at `path` as an image (reads the header only)."""
    return decode_error(path, header_only=True)


def decode_image(image: Image.Image, spec: InputSpec) -> Image.Image:
    """A fully decoded copy of an opened PIL image in the backbone's colour mode."""
    image.load()
    return to_input_mode(image, spec).copy()


def load_image(path: Path, spec: InputSpec, source: str, hint: str = SKIP_HINT) -> Image.Image:
    """The image at `path` in the backbone's colour mode; else a DataError naming it and `source`
    (a list file, a folder), followed by `hint`."""
    try:
        with Image.open(path) as image:
            return decode_image(image, spec)
    except FileNotFoundError:
        raise DataError(f"image {path} (listed in {source}) does not exist") from None
    except Exception as err:  # whatever a decoder raises (see decode_error)
        raise DataError(
            f"cannot decode image {path} (listed in {source}): {type(err).__name__}: {err}. " + hint
        ) from None


class LabelledImages(Dataset):
    """(image, label) samples: a subclass sets `labels` and `image(index)`; `transform` if set."""

    labels: Sequence[int] | torch.Tensor
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> list[int]:
        return [int(label) for label in self.labels]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.image(index)
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])


class TensorImageDataset(LabelledImages):
    """(uint8 image [C, h, w], label) from in-memory tensors, through a uint8 -> uint8 `transform`
    if given."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:  # noqa: ANN001
        self.images = images
        self.labels = labels
        self.transform = transform

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


class ImageListDataset(LabelledImages):
    """(image, label) from (path, label) samples; `source` (a list file, a folder) is named in
    errors; `transform` maps the PIL image in the backbone's colour mode to a tensor, by default
    the uint8 image [C, h, w] at its stored size (batches are resized on the device)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: InputSpec,
        transform: Callable[[Image.Image], torch.Tensor] = pil_to_tensor,
        source: str = "",
    ) -> None:
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.labels = [label for _, label in self.samples]
        self.spec = spec
        self.transform = transform
        self.source = source

    def image(self, index: int) -> Image.Image:
        return load_image(self.samples[index][0], self.spec, self.source)


def check_images(samples: Sequence[Sample], source: str, root: Path, skip_bad: bool) -> list:
    """`samples` checked (names shown relative to `root`). `skip_bad`: every image is decoded
    (threads: PIL releases the GIL) and the bad ones dropped with one counted warning; DataError
    if none is left. Else a DataError counts and names the files whose header PIL does not
    recognize (about 40 us per file; a truncated image is named when it is loaded)."""
    paths = [Path(path) for path, _ in samples]
    if skip_bad:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            errors = list(pool.map(decode_error, paths))
    else:
        errors = [header_error(path) for path in paths]
    bad = [path for path, error in zip(paths, errors, strict=True) if error is not None]
    if bad and not skip_bad:
        first = next(error for error in errors if error is not None)
        raise DataError(
            f"{len(bad)} undecodable image(s) in {source}: {listing(bad, root)} "
            f"(first: {first}). {SKIP_HINT}"
        )
    if bad:
        log.warning(
            "skipped %d undecodable image(s) in %s (data.skip_bad_images=true): %s",
            len(bad),
            source,
            listing(bad, root),
        )
    kept = [sample for sample, error in zip(samples, errors, strict=True) if error is None]
    if not kept:
        raise DataError(f"no image listed in {source} can be decoded")
    return kept


def stratified_indices(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted indices of a per-class train / val / test split, fixed by `seed`.

    Each class gives round(n * fraction) samples to val and to test but always keeps one for train,
    so small classes never fail (they may then be missing from val / test).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        n = len(index)
        n_test = min(int(round(n * test_fraction)), n - 1)
        n_val = min(int(round(n * val_fraction)), n - 1 - n_test)
        parts[2].append(index[:n_test])
        parts[1].append(index[n_test : n_test + n_val])
        parts[0].append(index[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
