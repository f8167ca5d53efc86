"""Formula-driven pretraining images (fractals, radial contours) and the pretraining script."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from met_lightning.demo import pretrain
from met_lightning.demo.formulas import (
    SIZE,
    contour_classes,
    fractal_systems,
    render_contours,
    render_fractals,
)
from met_lightning.demo.glyphs import SOURCE_CLASSES
from met_lightning.spec import InputSpec

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
SPEC = InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def nearest_centroid_accuracy(images: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Accuracy of class means of the first half on the second half (is the class visible?)."""
    flat = images.reshape(len(images), -1)
    half = len(flat) // 2
    centroids = np.stack([flat[:half][labels[:half] == c].mean(axis=0) for c in range(classes)])
    distance = ((flat[half:, None, :] - centroids[None]) ** 2).sum(axis=2)
    return float((distance.argmin(axis=1) == labels[half:]).mean())


def test_fractal_systems_are_contractive_ifs_with_the_sigma_factor_of_their_size() -> None:
    maps, probs = fractal_systems(40, seed=3)
    assert maps.shape == (40, 4, 2, 3) and probs.shape == (40, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    for system, p in zip(maps, probs, strict=True):
        used = p > 0
        n = int(used.sum())
        assert 2 <= n <= 4 and (system[~used] == 0).all()
        singular = np.linalg.svd(system[used, :, :2], compute_uv=False)  # [n, 2], descending
        assert singular.max() <= 1.0 + 1e-9  # every map contracts
        sigma = (singular[:, 0] + 2 * singular[:, 1]).sum()
        assert (5 + n) / 2 - 1e-9 <= sigma <= (6 + n) / 2 + 1e-9
    again = fractal_systems(40, seed=3)
    np.testing.assert_array_equal(again[0], maps)
    assert not np.array_equal(fractal_systems(40, seed=4)[0], maps)


# A class mean on raw pixels tells fractal classes apart well; contours less so (random turns,
# sizes, outline or fill), so their bound is lower (chance is 1/6; the runs are seeded).
@pytest.mark.parametrize(("family", "above_chance"), [("fractals", 2.5), ("contours", 1.25)])
def test_images_are_drawn_in_range_and_their_class_is_visible(family, above_chance) -> None:
    classes, rng = 6, np.random.default_rng(0)
    labels = np.tile(np.arange(classes), 40)
    if family == "fractals":
        images = render_fractals(*fractal_systems(classes, seed=0), labels, rng)
    else:
        images = render_contours(contour_classes(classes, seed=0), labels, rng)
    assert images.shape == (len(labels), SIZE, SIZE)
    assert images.min() >= 0.0 and images.max() <= 1.0
    lit = (images > 0.05).reshape(len(images), -1).mean(axis=1)
    assert (lit > 0.01).all() and (lit < 0.9).all()  # neither blank nor a filled square
    # Instances vary (jitter, flips, turns) but a class mean still tells classes apart.
    assert len({image.tobytes() for image in images[labels == 0]}) == 40
    assert nearest_centroid_accuracy(images, labels, classes) > above_chance / classes


def test_sources_mix_glyphs_fractals_and_contours_in_one_label_space() -> None:
    sources = pretrain.Sources(fractals=5, contours=4, share=0.5, seed=0)
    assert sources.num_classes == len(SOURCE_CLASSES) + 5 + 4
    x, y = sources.tensors(120, seed=1, spec=SPEC)
    assert x.shape == (120, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0
    glyphs = int((y < len(SOURCE_CLASSES)).sum())
    fractal = int(((y >= len(SOURCE_CLASSES)) & (y < len(SOURCE_CLASSES) + 5)).sum())
    assert (glyphs, fractal, 120 - glyphs - fractal) == (60, 30, 30)
    assert y.max() < sources.num_classes
    x2, y2 = sources.tensors(120, seed=1, spec=SPEC)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    only_glyphs = pretrain.Sources(fractals=5, contours=4, share=0.0, seed=0)
    assert only_glyphs.num_classes == len(SOURCE_CLASSES)


def test_epoch_images_are_made_in_seeded_parts_by_a_pool() -> None:
    """--data-workers W: W parts of about n / W images, part i drawn with data_seed(seed, i); the
    same images whatever the pool (threads here, spawned processes in the script)."""
    sources = pretrain.Sources(fractals=5, contours=4, share=0.5, seed=0)
    x, y = pretrain.epoch_images(sources, 100, 7, SPEC, None, 1)
    x1, y1 = sources.tensors(100, 7, SPEC)
    assert torch.equal(x, x1) and torch.equal(y, y1)
    with ThreadPoolExecutor(3) as pool:
        x, y = pretrain.epoch_images(sources, 100, 7, SPEC, pool, 3)
    parts = [sources.tensors(n, pretrain.data_seed(7, i), SPEC) for i, n in enumerate((34, 33, 33))]
    assert torch.equal(x, torch.cat([p[0] for p in parts]))
    assert torch.equal(y, torch.cat([p[1] for p in parts]))
    with ThreadPoolExecutor(4) as pool:  # fewer images than parts: the empty parts are skipped
        assert pretrain.epoch_images(sources, 3, 7, SPEC, pool, 4)[0].shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("gpu", "--device gpu: not a device; give cpu, cuda or cuda:N"),
        ("mps", "--device mps: pretraining runs on cpu or cuda"),
        ("cuda", "--device cuda: no CUDA device is visible here; use --device cpu"),
    ],
)
def test_pretrain_device_is_checked_before_anything_runs(device, reason, capsys) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--device", device])
    assert reason in capsys.readouterr().err


def test_pretrain_writes_the_backbone_and_its_record(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pretrain, "FASHION_MNIST", tmp_path / "absent")  # no Fashion-MNIST probe
    monkeypatch.setattr(pretrain, "VAL_SIZE", 64)
    digits = (
        pretrain.load_digits()
    )  # the probe on 300 of them: the record, not the score, is tested
    digits.images, digits.target = digits.images[:300], digits.target[:300]
    monkeypatch.setattr(pretrain, "load_digits", lambda: digits)
    out = tmp_path / "b.safetensors"
    argv = ["--epochs", "1", "--train-size", "96", "--fractal-classes", "3",
            "--contour-classes", "2", "--formula-share", "0.5", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    record = pretrain.main(argv)
    assert out.is_file() and not pretrain.partial_path(out).exists()
    assert not any(k.startswith("head.") for k in load_file(str(out)))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["data"] == {"glyph_classes": len(SOURCE_CLASSES), "fractal_classes": 3,
                             "contour_classes": 2, "formula_share": 0.5,
                             "real_images": 0}  # fmt: skip
    assert saved["train_images_seen"] == 96 and "fashion_mnist" not in saved["transfer_check"]
    assert 0 <= saved["transfer_check"]["pretrained_acc"] <= 1

    # --init: a second run starts from that backbone (no training here: it comes out unchanged)
    monkeypatch.setattr(pretrain, "train", lambda *a: [{"val_acc": 0.0, "train_acc": 0.0}])
    monkeypatch.setattr(
        pretrain, "transfer_check", lambda *a: {"pretrained_acc": 0.0, "random_init_acc": 0.0}
    )
    again = tmp_path / "c.safetensors"
    record = pretrain.main([*argv[:-1], str(again), "--seed", "1", "--init", str(out)])
    first, second = load_file(str(out)), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert record["init"] == {"file": str(out), "command": saved["command"]}
    with safe_open(str(again), framework="pt") as f:
        assert f.metadata()["init_command"] == saved["command"]


def test_shipped_runs_the_two_recorded_stages(tmp_path, monkeypatch) -> None:
    """`--shipped` = stage 1, then stage 2 with --init; SHIPPED holds what the records say."""
    stage1 = json.loads((RESULTS / "pretrain_formulas_cpu.json").read_text())  # the candidate
    stage2 = json.loads(pretrain.DEFAULT_OUT.with_suffix(".json").read_text())  # shipped
    for argv, record in zip(pretrain.SHIPPED, (stage1, stage2), strict=True):
        args = pretrain.parse_args(argv)
        assert (args.epochs, args.train_size, args.seed, args.threads, args.formula_share) == (
            record["epochs"], record["train_size_per_epoch"], record["seed"], record["threads"],
            record["data"]["formula_share"],
        )  # fmt: skip
        assert (args.fractal_classes, args.contour_classes) == (
            record["data"]["fractal_classes"], record["data"]["contour_classes"]
        )  # fmt: skip
    calls = []
    monkeypatch.setattr(pretrain, "main", lambda argv: calls.append(argv) or {"n": len(calls)})
    out = tmp_path / "b.safetensors"
    assert pretrain.shipped(out) == {"n": 2}
    first = str(tmp_path / "b_stage1.safetensors")
    assert calls == [[*pretrain.SHIPPED[0], "--out", first],
                     [*pretrain.SHIPPED[1], "--init", first, "--out", str(out)]]  # fmt: skip


def test_shipped_takes_only_out(capsys) -> None:
    assert pretrain.parse_args(["--shipped", "--out", "x.safetensors"]).shipped
    assert pretrain.parse_args(["--shipped", "--out=x.safetensors"]).shipped
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--shipped", "--epochs", "3"])
    assert "--shipped runs the recipe as recorded: give only --out" in capsys.readouterr().err


def test_pretrain_init_must_be_a_backbone_of_the_architecture(tmp_path) -> None:
    with pytest.raises(SystemExit, match="is not a backbone of"):
        save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        pretrain.main(
            [
                "--epochs",
                "1",
                "--train-size",
                "8",
                "--init",
                str(tmp_path / "x.safetensors"),
                "--out",
                str(tmp_path / "o.safetensors"),
            ]
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--formula-share", "1.5"], "--formula-share must be in [0, 1]"),
     (["--threads", "0"], "must be positive"),
     (["--init", "/nonexistent.safetensors"], "--init /nonexistent.safetensors: no such file"),
     (["--formula-share", "0.5", "--fractal-classes", "0"],
      "--fractal-classes and --contour-classes must be positive")],
)  # fmt: skip
def test_pretrain_refuses_impossible_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        pretrain.parse_args(argv)
    assert message in capsys.readouterr().err
