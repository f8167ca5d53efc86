"""Pretrain the demo backbone from scratch on rendered letter glyphs and ship its weights.

    python -m met_lightning.demo.pretrain [--epochs E] [--seed S] [--train-size N] [--out PATH]

The architecture of `conf/backbone/demo_vit.yaml`, trained on `N` fresh glyphs per epoch
(`met_lightning.demo.glyphs`, no digits). The backbone is saved without its head as fp16
safetensors, next to a JSON record of the run and of a transfer check (a logistic-regression
probe of scikit-learn's digits on the frozen class token, vs random weights).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
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
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from met_lightning.data.lowres import lowres_to_tensor
from met_lightning.demo.glyphs import SOURCE_CLASSES, render_glyphs
from met_lightning.models.backbone import create_backbone
from met_lightning.paths import ASSETS_DIR, config_dir
from met_lightning.spec import InputSpec

BACKBONE_CONFIG = Path(config_dir()) / "backbone" / "demo_vit.yaml"
DEFAULT_OUT = ASSETS_DIR / "demo_vit_glyphs.safetensors"

VAL_SIZE = 5000
VAL_STREAM = 1_000_000  # seed stream of the validation glyphs; epochs use streams 0, 1, ...
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 512
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
LABEL_SMOOTHING = 0.1
GRAD_CLIP = 1.0
THREADS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m met_lightning.demo.pretrain",
        description="Pretrain the demo ViT on rendered letter glyphs and save its backbone.",
    )
    parser.add_argument("--epochs", type=int, default=5, help="passes, each on fresh glyphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=48_000, help="glyphs rendered per epoch")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="backbone .safetensors")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.train_size < 1:
        parser.error("--epochs and --train-size must be positive")
    return args


def backbone_architecture(config: Path = BACKBONE_CONFIG) -> tuple[str, dict[str, Any]]:
    """`name` and `model_kwargs` of a backbone config (its interpolations are not resolved)."""
    cfg = yaml.safe_load(config.read_text())
    return cfg["name"], dict(cfg.get("model_kwargs") or {})


def data_seed(seed: int, stream: int) -> int:
    """Independent glyph seed for each (run seed, data stream) pair."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def glyph_tensors(n: int, seed: int, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` rendered glyphs as backbone inputs, through the digits' input pipeline."""
    images, labels = render_glyphs(n, seed)
    x = lowres_to_tensor(images, spec.input_size, spec.mean, spec.std, spec.interpolation)
    return x, torch.from_numpy(labels)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of `x` that `model`, in eval mode, classifies as `y`."""
    model.eval()
    predicted = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(EVAL_BATCH_SIZE)])
    return (predicted == y).float().mean().item()


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
    epochs: int,
    train_size: int,
    seed: int,
    val: tuple[torch.Tensor, torch.Tensor],
) -> list[dict[str, float]]:
    """Train `model` in place; returns per-epoch train loss and val accuracy (+ last train acc)."""
    steps_per_epoch = math.ceil(train_size / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * steps_per_epoch))
    history = []
    for epoch in range(epochs):
        x, y = glyph_tensors(train_size, data_seed(seed, epoch), spec)
        model.train()
        order = torch.randperm(train_size)
        total_loss = 0.0
        bar = tqdm(order.split(BATCH_SIZE), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for step, idx in enumerate(bar):
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        record = {
            "epoch": epoch + 1,
            "train_loss": round(total_loss / steps_per_epoch, 4),
            "val_acc": round(accuracy(model, *val), 4),
        }
        history.append(record)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f}  "
            f"val acc {record['val_acc']:.4f}",
            flush=True,
        )
    # The last epoch's glyphs were seen once, late in training: a fair score on training data.
    history[-1]["train_acc"] = round(accuracy(model, x[:VAL_SIZE], y[:VAL_SIZE]), 4)
    return history


def save_backbone(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save `model`'s weights without the classifier head, in fp16."""
    tensors = {
        key: value.detach().to(torch.float16).contiguous()
        for key, value in model.state_dict().items()
        if not key.startswith("head.")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def digits_features(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Normed class tokens of the frozen `model` for all of scikit-learn's digits."""
    digits = load_digits()
    spec = InputSpec.from_timm(model)
    x = lowres_to_tensor(digits.images, spec.input_size, spec.mean, spec.std, spec.interpolation)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.forward_features(c)[:, 0] for c in x.split(EVAL_BATCH_SIZE)])
    return feats.numpy(), digits.target


def linear_probe(model: nn.Module) -> float:
    """Digits test accuracy of a logistic regression on frozen features (stratified 60/40)."""
    feats, labels = digits_features(model)
    x_train, x_test, y_train, y_test = train_test_split(
        feats, labels, test_size=0.4, stratify=labels, random_state=0
    )
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


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
    return {
        "probe": "LogisticRegression(max_iter=2000) on forward_features(x)[:, 0] of all "
        "sklearn digits, stratified 60/40 split, random_state=0",
        "pretrained_acc": round(linear_probe(pretrained), 4),
        "random_init_acc": round(linear_probe(random), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.manual_seed(args.seed)
    name, model_kwargs = backbone_architecture()

    model = timm.create_model(
        name, pretrained=False, num_classes=len(SOURCE_CLASSES), **model_kwargs
    )
    spec = InputSpec.from_timm(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name} {model_kwargs}: {n_params / 1e6:.2f} M parameters, input {spec}", flush=True)
    val = glyph_tensors(VAL_SIZE, data_seed(args.seed, VAL_STREAM), spec)
    history = train(model, spec, args.epochs, args.train_size, args.seed, val)

    record = {
        "command": shlex.join(["python", "-m", "met_lightning.demo.pretrain", *argv]),
        "seed": args.seed,
        "epochs": args.epochs,
        "train_size_per_epoch": args.train_size,
        "train_glyphs_seen": args.epochs * args.train_size,
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
            "source_task": "rendered letter glyphs (met_lightning.demo.glyphs), no digits",
            "source_classes": record["source_classes"],
            "command": record["command"],
        },
    )
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
        threads=THREADS,
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
