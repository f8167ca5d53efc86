"""Datasets of image files (VTAB-1K list files, image folders): loading, checks and splits.

Shared by `vtab.py` and `image_folder.py`:

- `ImageListDataset`: (path, label) samples, loaded with PIL in the backbone's colour mode (the
  rule of `transforms.to_input_mode`, shared with predict) and transformed; a file that cannot be
  read raises a DataError naming it (checked lazily, when the sample is loaded).
- `check_exist`: every listed file exists (cheap, done before the backbone is built).
- `check_headers`: PIL recognizes every file's header (cheap, no decoding: catches empty files,
  text or HTML saved as .jpg; a truncated image is named when it is loaded).
- `drop_undecodable`: decode every image once and drop the bad ones with one counted warning
  (the `data.skip_bad_images` option).
- `stratified_indices`: a per-class, seeded train / val / test split that never fails on small
  classes.
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

Sample = tuple[Path, int]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (", ..." if len(names) > SHOWN else "")


# PIL's decoders, fed any bytes, raise more than OSError / ValueError (a fuzzed DDS header:
# NotImplementedError, an IM header with a 3-number size: TypeError, ...): every exception
# raised while opening or decoding a file means "undecodable", never a crash.


def decode_error(path: Path) -> str | None:
    """Why the image at `path` cannot be fully decoded by PIL, or converted to 8 bits by the
    rule of `transforms.to_8bit` (e.g. a float image outside [0, 1]), or None if it can."""
    try:
        with Image.open(path) as image:
            image.load()
            to_8bit(image)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def header_error(path: Path) -> str | None:
    """Why PIL does not recognize the file at `path` as an image (reads the header only)."""
    try:
        with Image.open(path):
            pass
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


SKIP_HINT = (
    "Replace or delete the file, or set data.skip_bad_images=true to drop undecodable images "
    "(one warning counts and names them)."
)


def decode_image(image: Image.Image, spec: InputSpec) -> Image.Image:
    """A fully decoded copy of an opened PIL image in the backbone's colour mode."""
    image.load()
    return to_input_mode(image, spec).copy()


def load_image(path: Path, spec: InputSpec, source: str, hint: str = SKIP_HINT) -> Image.Image:
    """The image at `path` in the backbone's colour mode; a DataError naming it if unreadable.

    `source` (a list file, a folder) is named in the message, followed by `hint`.
    """
    try:
        with Image.open(path) as image:
            return decode_image(image, spec)
    except FileNotFoundError:
        raise DataError(f"image {path} (listed in {source}) does not exist") from None
    except Exception as err:  # whatever a decoder raises (see decode_error)
        raise DataError(
            f"cannot decode image {path} (listed in {source}): {type(err).__name__}: {err}. " + hint
        ) from None


class ImageListDataset(Dataset):
    """(image tensor, label) from a list of (path, label) samples.

    `source` (a list file, a folder) is named in error messages; `transform` maps the PIL image
    (already in the backbone's colour mode) to a tensor: by default the decoded uint8 image
    [C, h, w] at its stored size (the DataModules resize and normalize batches on the device).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: InputSpec,
        transform: Callable[[Image.Image], torch.Tensor] = pil_to_tensor,  # uint8 [C, h, w]
        source: str = "",
    ) -> None:
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.spec = spec
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_image(path, self.spec, self.source)
        return self.transform(image), label


def check_exist(samples: Sequence[Sample], source: str, hint: str = "") -> None:
    """DataError naming the missing files (and `source`) if any listed image does not exist."""
    missing = [str(path) for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in {source} do not exist: {_listing(missing)}"
            + (f". {hint}" if hint else "")
        )


def _names(paths: Sequence[Path], root: Path | None) -> list[str]:
    return [str(p.relative_to(root)) if root and p.is_relative_to(root) else str(p) for p in paths]


def check_headers(samples: Sequence[Sample], source: str, root: Path | None = None) -> None:
    """DataError counting and naming the files of `samples` that are not images PIL can open
    (header only, about 40 us per file). Names are shown relative to `root` when given."""
    bad, first = [], ""
    for path, _ in samples:
        error = header_error(Path(path))
        if error is not None:
            bad.append(Path(path))
            first = first or error
    if bad:
        raise DataError(
            f"{len(bad)} undecodable image(s) in {source}: {_listing(_names(bad, root))} "
            f"(first: {first}). {SKIP_HINT}"
        )


def drop_undecodable(samples: Sequence[Sample], source: str, root: Path | None = None) -> list:
    """`samples` without the images PIL cannot decode; one warning counts and names those dropped.

    Decodes every image once (threads: PIL releases the GIL while decoding). DataError if none is
    left. Names are shown relative to `root` when given.
    """
    paths = [Path(path) for path, _ in samples]
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(decode_error, paths))
    kept = [sample for sample, error in zip(samples, errors, strict=True) if error is None]
    bad = [path for path, error in zip(paths, errors, strict=True) if error is not None]
    if bad:
        names = _names(bad, root)
        log.warning(
            "skipped %d undecodable image(s) in %s (data.skip_bad_images=true): %s",
            len(bad),
            source,
            _listing(names),
        )
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
