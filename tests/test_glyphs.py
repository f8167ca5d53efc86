"""The procedural letter glyphs that the demo backbone is pretrained on."""

from __future__ import annotations

import numpy as np
import pytest

from met_lightning.demo.glyphs import CASE_TWINS, SOURCE_CLASSES, fonts_for, render_glyphs

# Letters that look like a digit (see the module docstring of met_lightning.demo.glyphs).
DIGIT_LOOKALIKES = set("OoQDIlijZzASsGbTtBgq") | set("ΘθΟοΩΦφσΙιζΔςδτβρεξ")


@pytest.fixture(scope="module")
def glyphs() -> tuple[np.ndarray, np.ndarray]:
    return render_glyphs(len(SOURCE_CLASSES) * 10 + 7, seed=123)


def test_deterministic_for_a_seed(glyphs: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = render_glyphs(len(glyphs[1]), seed=123)
    np.testing.assert_array_equal(images, glyphs[0])
    np.testing.assert_array_equal(labels, glyphs[1])
    assert not np.array_equal(render_glyphs(len(labels), seed=124)[0], images)


def test_format_like_sklearn_digits(glyphs: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = glyphs
    assert images.shape == (len(labels), 8, 8)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.min() == 0 and images.max() <= 16
    assert (images == 16).any()  # solid 4x4 blocks occur, as in the digits


def test_images_are_not_blank(glyphs: tuple[np.ndarray, np.ndarray]) -> None:
    ink = glyphs[0].reshape(len(glyphs[0]), -1).sum(axis=1)
    assert (ink > 16).all()


def test_labels_balanced_and_in_range(glyphs: tuple[np.ndarray, np.ndarray]) -> None:
    counts = np.bincount(glyphs[1], minlength=len(SOURCE_CLASSES))
    assert len(counts) == len(SOURCE_CLASSES)
    assert counts.min() == 10 and counts.max() == 11 and counts.sum() == len(glyphs[1])


def test_source_classes_exclude_digits_and_lookalikes() -> None:
    drawn = set(SOURCE_CLASSES) | set(CASE_TWINS.values())
    assert 30 <= len(SOURCE_CLASSES) <= 40
    assert len(set(SOURCE_CLASSES)) == len(SOURCE_CLASSES)
    assert all(char.isalpha() and len(char) == 1 for char in drawn)
    assert not any(char.isdigit() for char in drawn)
    assert not drawn & DIGIT_LOOKALIKES
    assert set(CASE_TWINS) <= set(SOURCE_CLASSES)


def test_every_letter_has_fonts() -> None:
    for char in set(SOURCE_CLASSES) | set(CASE_TWINS.values()):
        assert len(fonts_for(char)) >= 10, char
