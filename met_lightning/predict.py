"""Early-exit prediction: `python -m met_lightning.predict checkpoint=RUN input=DIR_OR_FILES`.

Options (Hydra overrides, see conf/predict.yaml): `budget=` (a fraction of the full cost in (0, 1]
or MACs per image: thresholds with the best held-out accuracy within it, from the run's logit
store), or explicit `thresholds=[...]` (one per early exit); neither = no early exit. Prints, per
image, the class, confidence, exit and MACs, and the totals; `output=FILE.csv` writes every row.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from met_lightning.atomic import write_text
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
    """The files PIL can read. Without `skip_bad`: their headers are checked (fast) and a DataError
    counts and names the bad ones; with it, every image is decoded and the bad ones are dropped
    with one warning that counts and names them."""
    check = decode_error if skip_bad else header_error
    good, bad, first = [], [], ""
    for path in files:
        error = check(path)
        if error is None:
            good.append(path)
        else:
            bad.append(path)
            first = first or error
    shown = ", ".join(map(str, bad[:SHOWN])) + (", ..." if len(bad) > SHOWN else "")
    if bad and not skip_bad:
        raise DataError(
            f"cannot read {len(bad)} input image(s): {shown} (first: {first}). Remove them from "
            "the input or pass skip_bad_images=true"
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


def batches(files: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def _plain(value: Any) -> Any:
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


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
    files = check_readable(list_images(_plain(cfg.input)), cfg.skip_bad_images)

    session = open_session(plan)
    engine, spec, transform = session.engine, session.spec, session.transform

    rows = []
    start = time.perf_counter()
    for chunk in batches(files, cfg.batch_size):
        images = torch.stack([read_image(p, spec, transform) for p in chunk]).to(session.device)
        result = engine(images)
        for path, row in zip(chunk, session.rows(result), strict=True):
            rows.append({"file": str(path), **row})
    seconds = time.perf_counter() - start
    totals = summarize(rows, plan.macs_per_exit, seconds)
    totals["thresholds"] = [t if math.isfinite(t) else str(t) for t in plan.thresholds]
    totals["how"] = plan.how
    totals["precision"] = plan.precision
    if cfg.output:  # first: the rows are kept whatever printing them does
        write_rows(rows, Path(cfg.output))
    print_results(rows, totals, cfg.show)
    return {"rows": rows, "totals": totals}


def summarize(rows: list[dict[str, Any]], exit_macs: Sequence[int], seconds: float) -> dict:
    n = len(rows)
    counts = [sum(r["exit"] == k + 1 for r in rows) for k in range(len(exit_macs))]
    mean = sum(r["macs"] for r in rows) / n
    return {
        "images": n,
        "exit_counts": counts,
        "mean_macs": mean,
        "total_macs": mean * n,
        "full_macs": exit_macs[-1],
        "speedup": exit_macs[-1] / mean,
        "seconds": seconds,
    }


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
    console.print(f"thresholds: {totals['how']}", soft_wrap=True, markup=False)
    console.print(
        f"{totals['images']} images ({counts}); mean {format_macs(totals['mean_macs'])} per image, "
        f"{totals['speedup']:.2f}x fewer MACs than the last exit "
        f"({format_macs(totals['full_macs'])}); total {format_macs(totals['total_macs'])}; "
        f"{totals['seconds']:.2f} s",
        soft_wrap=True,
        markup=False,
    )


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


_task = user_task(predict)


def main() -> None:
    """Console entry point (`met-predict`)."""
    hydra_app("predict", _task)


if __name__ == "__main__":
    main()
