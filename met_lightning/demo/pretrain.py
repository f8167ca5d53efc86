"""Pretrain the demo backbone from scratch on generated images and ship its weights.

    python -m met_lightning.demo.pretrain [--epochs E] [--seed S] [--train-size N] [--out PATH]
        [--formula-share F] [--init EARLIER.safetensors] [--device cuda] [--data-workers W]
    python -m met_lightning.demo.pretrain --shipped [--out PATH]   # the shipped file, ~3 h CPU

The architecture of `conf/backbone/demo_vit.yaml`, trained on `N` fresh images per epoch, no
real image among them: rendered letter glyphs (`met_lightning.demo.glyphs`, no digits) and
formula-driven fractals and radial contours (`met_lightning.demo.formulas`), one label space.
The backbone is saved without its head as fp16 safetensors, next to a JSON record of the run
and of transfer checks (logistic-regression probes on the frozen class token, vs random weights:
scikit-learn's digits, and Fashion-MNIST's 1k protocol where the Debian package is installed).
A snapshot of the backbone is saved after every epoch (`*.partial.safetensors`) until the end.
On a GPU (`--device cuda`) the images are still made on the CPU: `--data-workers W` processes
make each epoch's images in W seeded parts (other images than one process makes, as reproducible).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import PIL
import PIL.features
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from met_lightning.data.lowres import LOWRES_MAX, lowres_to_tensor
from met_lightning.data.torchvision_data import has_idx_layout, read_idx_split
from met_lightning.demo.formulas import (
    contour_classes,
    fractal_systems,
    render_contours,
    render_fractals,
)
from met_lightning.demo.glyphs import SOURCE_CLASSES, render_glyphs
from met_lightning.models.backbone import create_backbone
from met_lightning.paths import ASSETS_DIR, config_dir
from met_lightning.spec import InputSpec

BACKBONE_CONFIG = Path(config_dir()) / "backbone" / "demo_vit.yaml"
DEFAULT_OUT = ASSETS_DIR / "demo_vit_glyphs.safetensors"

# The shipped backbone (ASSETS_DIR/demo_vit_glyphs.*), made in two runs: 10 epochs from random
# weights with 2/3 formula images, then (`--init`) 14 more on new images (seed 1), half formulas.
SHIPPED = (
    ["--epochs", "10", "--train-size", "90000", "--threads", "1", "--formula-share", repr(2 / 3)],
    ["--epochs", "14", "--train-size", "90000", "--threads", "1", "--formula-share", "0.5",
     "--seed", "1"],
)  # fmt: skip

VAL_SIZE = 5000
VAL_STREAM = 1_000_000  # seed stream of the validation glyphs; epochs use streams 0, 1, ...
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 512
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
LABEL_SMOOTHING = 0.1
GRAD_CLIP = 1.0
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_PER_CLASS = 100  # the 1k protocol: 100 training images per class, the full test set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m met_lightning.demo.pretrain",
        description="Pretrain the demo ViT on rendered letter glyphs and save its backbone.",
    )
    parser.add_argument("--epochs", type=int, default=5, help="passes, each on fresh glyphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=48_000, help="images made per epoch")
    parser.add_argument("--fractal-classes", type=int, default=300)
    parser.add_argument("--contour-classes", type=int, default=200)
    parser.add_argument(
        "--formula-share", type=float, default=0.0,
        help="share of each epoch's images that are fractals and contours (half each); 0, the "
        "default: glyphs only (the backbone shipped before; README: how the shipped one was made)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda or cuda:N")
    parser.add_argument(
        "--data-workers", type=int, default=1,
        help="processes making each epoch's images (1: in this process, the shipped recipe's)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="backbone .safetensors")
    parser.add_argument(
        "--init", type=Path,
        help="continue from this backbone (an earlier run's --out) instead of random weights; "
        "the classifier head starts fresh. Give a new --seed so that the images are new too",
    )  # fmt: skip
    parser.add_argument(
        "--shipped", action="store_true",
        help="run the two stages of the shipped backbone (SHIPPED): stage 1 to "
        "<out>_stage1.safetensors, stage 2 from it to --out; no other option",
    )  # fmt: skip
    args = parser.parse_args(argv)
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a[:2] == "--"}
    if args.shipped and given - {"--shipped", "--out"}:
        parser.error("--shipped runs the recipe as recorded: give only --out")
    if args.init is not None and not args.init.is_file():
        parser.error(f"--init {args.init}: no such file (an earlier run's --out .safetensors)")
    if min(args.epochs, args.train_size, args.threads, args.data_workers) < 1:
        parser.error("--epochs, --train-size, --threads and --data-workers must be positive")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device; give cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: pretraining runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    args.device = device  # parsed once: train() and main() use the torch.device
    if args.formula_share > 0 and min(args.fractal_classes, args.contour_classes) < 1:
        parser.error("--fractal-classes and --contour-classes must be positive")
    if not 0 <= args.formula_share <= 1:
        parser.error(f"--formula-share must be in [0, 1], got {args.formula_share}")
    return args


def backbone_architecture(config: Path = BACKBONE_CONFIG) -> tuple[str, dict[str, Any]]:
    """`name` and `model_kwargs` of a backbone config (its interpolations are not resolved)."""
    cfg = yaml.safe_load(config.read_text())
    return cfg["name"], dict(cfg.get("model_kwargs") or {})


def data_seed(seed: int, stream: int) -> int:
    """Independent glyph seed for each (run seed, data stream) pair."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class Sources:
    """The pretraining classes: glyphs, then fractal systems, then radial contours."""

    def __init__(self, fractals: int, contours: int, share: float, seed: int) -> None:
        fractals, contours = (fractals, contours) if share > 0 else (0, 0)
        self.fractals = fractal_systems(fractals, seed)  # (maps, probabilities) of each class
        self.contours = contour_classes(contours, seed)
        self.share = share
        self.num_fractals = fractals
        self.num_classes = len(SOURCE_CLASSES) + fractals + contours

    def tensors(self, n: int, seed: int, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` images [n, C, H, W] as backbone inputs and their labels [n], mixed by `share`."""
        rng = np.random.default_rng(seed)
        n_formula = round(n * self.share)
        n_fractal = n_formula // 2
        glyphs, glyph_labels = render_glyphs(n - n_formula, seed)
        parts = [backbone_input(glyphs, spec)]
        labels = [glyph_labels]
        if n_formula:
            offset = len(SOURCE_CLASSES)
            fractal = rng.integers(0, self.num_fractals, n_fractal)
            contour = rng.integers(0, len(self.contours), n_formula - n_fractal)
            chunks = np.array_split(fractal, max(1, len(fractal) // 1024))
            drawn = [render_fractals(*self.fractals, chunk, rng) for chunk in chunks]
            drawn.append(render_contours(self.contours, contour, rng))
            parts += [backbone_input(images * LOWRES_MAX, spec) for images in drawn]
            labels += [fractal + offset, contour + offset + self.num_fractals]
        return torch.cat(parts), torch.from_numpy(np.concatenate(labels).astype(np.int64))


def _part(sources: Sources, spec: InputSpec, size_seed: tuple[int, int]) -> tuple:
    x, y = sources.tensors(size_seed[0], size_seed[1], spec)
    return x.numpy(), y.numpy()  # numpy pickles to the parent without torch's shared memory


def epoch_images(
    sources: Sources, n: int, seed: int, spec: InputSpec, pool: Executor | None, workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sources.tensors(n, seed, spec)`, or with a `pool` of `workers` processes that many parts
    of about n / workers images, part i drawn with `data_seed(seed, i)`: [n, C, H, W], [n]."""
    if pool is None:
        return sources.tensors(n, seed, spec)
    sizes = [n // workers + (i < n % workers) for i in range(workers)]
    jobs = [(size, data_seed(seed, i)) for i, size in enumerate(sizes) if size]
    parts = list(pool.map(functools.partial(_part, sources, spec), jobs))
    return tuple(torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*parts, strict=True))


def backbone_input(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Grey `images` [N, h, w] (values 0..16) as the backbone's input [N, C, H, W]."""
    return lowres_to_tensor(images, spec.input_size, spec.mean, spec.std, spec.interpolation)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of `x` that `model`, in eval mode, classifies as `y`."""
    model.eval()
    device = next(model.parameters()).device
    predicted = [model(chunk.to(device)).argmax(dim=1) for chunk in x.split(EVAL_BATCH_SIZE)]
    return (torch.cat(predicted) == y.to(device)).float().mean().item()


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def train(
    model: nn.Module,
    spec: InputSpec,
    sources: Sources,
    args: argparse.Namespace,
    val: tuple[torch.Tensor, torch.Tensor],
    pool: Executor | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place on `args.device` (each epoch's images made by `pool`'s processes,
    if given); returns per-epoch train loss and val accuracy (+ last train acc). A backbone
    snapshot is saved after each epoch next to `args.out`."""
    epochs, train_size, seed, device = args.epochs, args.train_size, args.seed, args.device
    steps_per_epoch = math.ceil(train_size / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * steps_per_epoch))
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        x, y = epoch_images(
            sources, train_size, data_seed(seed, epoch), spec, pool, args.data_workers
        )
        x, y = x.to(device), y.to(device)
        made = time.perf_counter() - started
        model.train()
        order = torch.randperm(train_size).to(device)  # the CPU generator on every device
        total_loss = torch.zeros((), dtype=torch.float64, device=device)  # read once an epoch
        bar = tqdm(order.split(BATCH_SIZE), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for step, idx in enumerate(bar):
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            total_loss += loss.detach()
            if step % 20 == 0:  # the bar's values: a device-to-host read every 20 steps
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        record = {
            "epoch": epoch + 1,
            "train_loss": round(total_loss.item() / steps_per_epoch, 4),
            "val_acc": round(accuracy(model, *val), 4),
            "data_s": round(made, 1),
            "epoch_s": round(time.perf_counter() - started, 1),
        }
        history.append(record)
        save_backbone(model, partial_path(args.out), {"format": "pt", "epoch": str(epoch + 1)})
        print(
            f"epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f}  "
            f"val acc {record['val_acc']:.4f}  ({record['epoch_s']:.0f} s, data {made:.0f} s)",
            flush=True,
        )
    # The last epoch's glyphs were seen once, late in training: a fair score on training data.
    history[-1]["train_acc"] = round(accuracy(model, x[:VAL_SIZE], y[:VAL_SIZE]), 4)
    return history


def partial_path(out: Path) -> Path:
    """Where the per-epoch snapshot of `out` goes."""
    return out.with_suffix(".partial.safetensors")


def save_backbone(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save `model`'s weights without the classifier head, in fp16."""
    tensors = {
        key: value.detach().to("cpu", torch.float16).contiguous()
        for key, value in model.state_dict().items()
        if not key.startswith("head.")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def features(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Class tokens [N, D] of the frozen `model` for grey `images` [N, h, w] (values 0..16)."""
    x = backbone_input(images, InputSpec.from_timm(model))
    model.eval()
    with torch.no_grad():
        feats = [model.forward_features(chunk)[:, 0] for chunk in x.split(EVAL_BATCH_SIZE)]
    return torch.cat(feats).numpy()


def linear_probe(model: nn.Module) -> float:
    """Digits test accuracy of a logistic regression on frozen features (stratified 60/40)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        features(model, digits.images), digits.target, test_size=0.4, stratify=digits.target,
        random_state=0,
    )  # fmt: skip
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def fashion_probe(model: nn.Module, folder: Path = FASHION_MNIST) -> float:
    """Fashion-MNIST test accuracy of a logistic regression on frozen features of
    `FASHION_PER_CLASS` training images per class (seeded): the 1k protocol's linear probe."""
    (train_x, train_y), (test_x, test_y) = (
        (x.squeeze(1).numpy() * (LOWRES_MAX / 255), y.numpy())
        for x, y in (read_idx_split(folder, split, 10) for split in ("train", "test"))
    )
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.choice(np.flatnonzero(train_y == c), FASHION_PER_CLASS,
                                      replace=False) for c in range(10)])  # fmt: skip
    probe = LogisticRegression(max_iter=3000).fit(features(model, train_x[pick]), train_y[pick])
    return float(probe.score(features(model, test_x), test_y))


def transfer_check(name: str, model_kwargs: dict[str, Any], weights: Path, seed: int) -> dict:
    """Digits linear-probe accuracy of the saved backbone, loaded like the demo does, vs random."""
    pretrained = create_backbone(name, weights_file=str(weights), model_kwargs=model_kwargs)
    # timm loads with strict=False when dropping the head: make sure every weight arrived.
    saved = load_file(str(weights))
    loaded = pretrained.state_dict()
    if saved.keys() != loaded.keys() or any(
        not torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved
    ):
        raise RuntimeError(f"{weights} does not load into {name} {model_kwargs} unchanged")
    torch.manual_seed(seed)
    random = create_backbone(name, model_kwargs=model_kwargs)
    check = {
        "probe": "LogisticRegression(max_iter=2000) on forward_features(x)[:, 0] of all "
        "sklearn digits, stratified 60/40 split, random_state=0",
        "pretrained_acc": round(linear_probe(pretrained), 4),
        "random_init_acc": round(linear_probe(random), 4),
    }
    if has_idx_layout(FASHION_MNIST):
        check["fashion_mnist"] = {
            "probe": f"LogisticRegression(max_iter=3000) on forward_features(x)[:, 0] of "
            f"{FASHION_PER_CLASS} Fashion-MNIST training images per class (seed 0), "
            f"scored on the 10,000 test images ({FASHION_MNIST})",
            "pretrained_acc": round(fashion_probe(pretrained), 4),
            "random_init_acc": round(fashion_probe(random), 4),
        }
    return check


def shipped(out: Path) -> dict:
    """Both runs of `SHIPPED`: stage 1 to `<out>_stage1.safetensors`, stage 2 from it to `out`."""
    first = out.with_name(f"{out.stem}_stage1.safetensors")
    main([*SHIPPED[0], "--out", str(first)])
    return main([*SHIPPED[1], "--init", str(first), "--out", str(out)])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.shipped:
        return shipped(args.out)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name, model_kwargs = backbone_architecture()
    sources = Sources(args.fractal_classes, args.contour_classes, args.formula_share, args.seed)
    model = timm.create_model(name, pretrained=False, num_classes=sources.num_classes,
                              **model_kwargs)  # fmt: skip
    init = {}
    if args.init is not None:
        with safe_open(str(args.init), framework="pt") as f:  # tensors and metadata, one read
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
        init = {"file": str(args.init)}
        if "command" in metadata:
            init["command"] = metadata["command"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected or any(not key.startswith("head.") for key in missing):
            raise SystemExit(
                f"error: --init {args.init} is not a backbone of {name} {model_kwargs}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    spec = InputSpec.from_timm(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name} {model_kwargs}: {n_params / 1e6:.2f} M parameters, input {spec}", flush=True)
    val = sources.tensors(VAL_SIZE, data_seed(args.seed, VAL_STREAM), spec)
    model.to(args.device)
    if args.data_workers > 1:  # spawned: no copy of this process's CUDA state; 1 thread each
        spawn = mp.get_context("spawn")
        with ProcessPoolExecutor(args.data_workers, spawn, torch.set_num_threads, (1,)) as pool:
            history = train(model, spec, sources, args, val, pool)
    else:
        history = train(model, spec, sources, args, val)
    model.cpu()

    record = {
        "command": shlex.join(["python", "-m", "met_lightning.demo.pretrain", *argv]),
        "seed": args.seed,
        "epochs": args.epochs,
        "train_size_per_epoch": args.train_size,
        "train_images_seen": args.epochs * args.train_size,  # this run's; --init's in "init"
        "init": init or None,
        "data": {
            "glyph_classes": len(SOURCE_CLASSES),
            "fractal_classes": sources.num_fractals,
            "contour_classes": len(sources.contours),
            "formula_share": args.formula_share,
            "real_images": 0,
        },
        "val_size": VAL_SIZE,
        "backbone": {"name": name, "model_kwargs": model_kwargs, "parameters": n_params},
        "input": asdict(spec),
        "optimizer": {
            "name": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "batch_size": BATCH_SIZE,
            "schedule": f"linear warm-up {WARMUP_FRACTION:.0%} of steps, then cosine to 0",
            "label_smoothing": LABEL_SMOOTHING,
            "grad_clip": GRAD_CLIP,
        },
        "source_classes": "".join(SOURCE_CLASSES),
        "source_train_acc": history[-1]["train_acc"],
        "source_val_acc": history[-1]["val_acc"],
        "history": history,
    }
    save_backbone(
        model,
        args.out,
        metadata={
            "format": "pt",
            "name": name,
            "model_kwargs": json.dumps(model_kwargs),
            "source_task": "rendered letter glyphs (no digits), formula-driven fractals and "
            "radial contours (met_lightning.demo.glyphs, .formulas); no real image",
            "source_classes": record["source_classes"],
            "command": record["command"],
            **({"init_command": init["command"]} if "command" in init else {}),
        },
    )
    partial_path(args.out).unlink(missing_ok=True)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", flush=True)

    record["transfer_check"] = transfer_check(name, model_kwargs, args.out, args.seed)
    record.update(
        wall_time_s=round(time.perf_counter() - start, 1),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Glyph bitmaps depend on Pillow / FreeType and matplotlib's fonts too.
        versions={
            "torch": torch.__version__,
            "timm": timm.__version__,
            "pillow": PIL.__version__,
            "freetype": PIL.features.version("freetype2"),
            "matplotlib": matplotlib.__version__,
        },
        threads=args.threads,
        device=torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        data_workers=args.data_workers,
    )
    record_file = args.out.with_suffix(".json")
    record_file.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    check = record["transfer_check"]
    print(
        f"source val acc {record['source_val_acc']:.4f}; digits linear probe: pretrained "
        f"{check['pretrained_acc']:.4f} vs random init {check['random_init_acc']:.4f}; "
        f"wall time {record['wall_time_s']:.0f} s",
        flush=True,
    )
    return record


if __name__ == "__main__":
    main()
