"""Early-exit prediction: `python -m met_lightning.predict checkpoint=RUN input=DIR_OR_FILES`.

`budget=` or `thresholds=[...]` (conf/predict.yaml; neither: no early exit). Prints each image's
class, confidence, exit and MACs, and the totals; `output=FILE.csv` writes every row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from met_lightning.cli import check_writable, hydra_app, user_task
from met_lightning.data.base import InputSpec
from met_lightning.data.images import (
    IMAGE_EXTENSIONS,
    SHOWN,
    decode_error,
    header_error,
    load_image,
)
from met_lightning.errors import ConfigError, DataError
from met_lightning.inference.analysis import finite, write_csv
from met_lightning.inference.session import SessionOptions, open_session, resolve, typed_options
from met_lightning.macs import format_macs

log = logging.getLogger(__name__)


@dataclass
class PredictOptions(SessionOptions):
    """`python -m met_lightning.predict` (conf/predict.yaml selects these defaults)."""

    # an image file, a folder (searched recursively), or a list: input=[a.png,dir/]
    input: Any = MISSING
    batch_size: int = 64
    # CSV file with one row per image (file, class, class_name, confidence, exit, block, macs)
    output: str | None = None
    # rows printed to the terminal
    show: int = 20
    # skip images PIL cannot decode (counted in a warning) instead of stopping
    skip_bad_images: bool = False


ConfigStore.instance().store(name="predict_options", node=PredictOptions)


# ---------------------------------------------------------------------- inputs
def list_images(inputs: str | Sequence[str]) -> list[Path]:
    """Image files named by `inputs` (files, or folders searched recursively), in order."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not items:
        raise ConfigError("input=[] names no image; give a file, a folder or a list of them")
    files: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise DataError(
                    f"input folder {str(path)!r} has no images (looked for "
                    f"{', '.join(IMAGE_EXTENSIONS)}, in subfolders too)"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {str(path)!r} does not exist (give an image file or a folder)")
    return files


def check_readable(files: Sequence[Path], skip_bad: bool) -> list[Path]:
    """The files PIL can read: headers checked and a DataError naming the bad ones, or with
    `skip_bad` every image decoded and the bad ones dropped with a warning naming them."""
    errors = [(decode_error if skip_bad else header_error)(path) for path in files]
    good = [path for path, error in zip(files, errors, strict=True) if error is None]
    bad = [(path, error) for path, error in zip(files, errors, strict=True) if error is not None]
    shown = ", ".join(str(path) for path, _ in bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
    if bad and not skip_bad:
        raise DataError(
            f"cannot read {len(bad)} input image(s): {shown} (first: {bad[0][1]}). Remove them "
            "from the input or pass skip_bad_images=true"
        )
    if bad:
        log.warning("skipped %d undecodable image(s) (skip_bad_images=true): %s", len(bad), shown)
    if not good:
        raise DataError("none of the input images can be read")
    return good


def read_image(path: Path, spec: InputSpec, transform: Any) -> torch.Tensor:
    """One image as the backbone's input tensor; DataError naming the file if it cannot be read."""
    hint = "Remove it from the input or pass skip_bad_images=true"
    return transform(load_image(path, spec, "the predict input", hint))


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run the early-exit engine on the input images; print and return rows and totals."""
    cfg = typed_options(cfg, PredictOptions, "predict")
    if OmegaConf.is_missing(cfg, "checkpoint") or OmegaConf.is_missing(cfg, "input"):
        raise ConfigError("give checkpoint=RUN_FOLDER_OR_FILE and input=IMAGE_FILE_OR_FOLDER")
    if cfg.batch_size <= 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer")
    # everything that can fail is checked before the network is built and an image is read
    plan = resolve(cfg)
    if cfg.output:
        check_writable(cfg.output, "output", folder=False)
    inputs = OmegaConf.to_object(cfg.input) if OmegaConf.is_config(cfg.input) else cfg.input
    files = check_readable(list_images(inputs), cfg.skip_bad_images)

    session = open_session(plan)
    rows = []
    start = time.perf_counter()
    for first in range(0, len(files), cfg.batch_size):
        chunk = files[first : first + cfg.batch_size]
        answers = session.classify([read_image(p, session.spec, session.transform) for p in chunk])
        rows += [{"file": str(p), **row} for p, row in zip(chunk, answers, strict=True)]
    seconds = time.perf_counter() - start
    n, exit_macs = len(rows), plan.macs_per_exit
    mean = sum(r["macs"] for r in rows) / n
    totals = {
        "images": n,
        "exit_counts": [sum(r["exit"] == k + 1 for r in rows) for k in range(len(exit_macs))],
        "mean_macs": mean,
        "total_macs": mean * n,
        "full_macs": exit_macs[-1],
        "speedup": exit_macs[-1] / mean,
        "seconds": seconds,
        "thresholds": [finite(t) for t in plan.thresholds],
        "how": plan.how,
        "precision": plan.precision,
    }
    if cfg.output:  # first: the rows are kept whatever printing them does
        write_csv(Path(cfg.output), list(rows[0]), [list(r.values()) for r in rows])
    print_results(rows, totals, cfg.show)
    return {"rows": rows, "totals": totals}


def print_results(rows: list[dict[str, Any]], totals: dict[str, Any], show: int) -> None:
    console = Console()
    table = Table(title="Predictions", title_justify="left")
    for column in ("file", "class", "confidence", "exit", "MACs"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for row in rows[: max(show, 0)]:
        table.add_row(  # file and class names as plain text: `IMG[copy].png` is not markup
            Text(row["file"]), Text(row["class_name"]), f"{row['confidence']:.4f}",
            str(row["exit"]), format_macs(row["macs"]),
        )  # fmt: skip
    if len(rows) > show:
        table.caption = f"first {show} of {len(rows)} images (show=N for more, output=FILE.csv)"
    console.print(table)
    counts = ", ".join(f"exit {k + 1}: {c}" for k, c in enumerate(totals["exit_counts"]))
    console.print(
        f"thresholds: {totals['how']}\n"
        f"{totals['images']} images ({counts}); mean {format_macs(totals['mean_macs'])} per image, "
        f"{totals['speedup']:.2f}x fewer MACs than the last exit "
        f"({format_macs(totals['full_macs'])}); total {format_macs(totals['total_macs'])}; "
        f"{totals['seconds']:.2f} s",
        soft_wrap=True,
        markup=False,
    )


_task = user_task(predict)
main = partial(hydra_app, "predict", _task)  # the console entry point `met-predict`


if __name__ == "__main__":
    main()
