"""Procedurally rendered letter glyphs in the format of scikit-learn's 8x8 digits.

The demo backbone is pretrained on these glyphs, a source task disjoint from digits. Each glyph is
rendered like the UCI optdigits data were made: a letter from a random font (the TrueType fonts
matplotlib ships), randomly sized, thickened, rotated, sheared and stretched, binarized, its bounding
box fitted into a 32x32 bitmap (full height, like the digits' size normalization, with random
margins and shift), then the "on" pixels counted in 4x4 blocks: an 8x8 image with values 0..16.

Classes: Latin letters plus a few Greek ones, leaving out every letter that looks like a digit, so
that no source class is a digit in disguise:

- 0: O o Q D (a closed oval);      Greek Θ θ Ο ο Ω Φ φ σ
- 1: I l i j (one vertical stroke); Greek Ι ι
- 2: Z z;                          Greek ζ
- 4: A (a closed 4 is a triangle with a bar); Greek Δ
- 5: S s;                          Greek ς
- 6: G b (a loop under a rising stroke); Greek δ
- 7: T t (a bar on a stem);        Greek τ
- 8: B;                            Greek β
- 9: g q (a loop over a descender); Greek ρ
- 3: Greek ε ξ (a mirrored or stretched 3)

Glyphs are normalized to the full box height, so lower case letters that are small copies of
their capital (c p u v w x) would be indistinguishable from it: they are drawn as other forms of
the capital's class instead of being classes of their own (likewise π for Π and ψ for Ψ). Greek
letters that duplicate a Latin shape (Α Β Ε Η Κ Μ Ν Ρ Τ Υ Χ α κ ν υ χ ω) are not used either.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

SOURCE_CLASSES: tuple[str, ...] = (
    *"CEFHJKLMNPRUVWXY",  # Latin capitals
    *"adefhkmnry",  # Latin lower case with a shape of their own
    *"ΓΛΞΠΣΨγλμη",  # Greek
)

# Other renderings of a class: lower case forms that only differ from the capital in size.
CASE_TWINS: dict[str, str] = {
    "C": "c", "P": "p", "U": "u", "V": "v", "W": "w", "X": "x", "Π": "π", "Ψ": "ψ"
}

# Text faces among matplotlib's fonts; the others (DejaVu*Display subsets, STIX size variants and
# non-Unicode sets, cmex/cmsy symbol fonts, LastResort boxes) do not draw letters.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)

BITMAP = 32  # optdigits bitmap side
BLOCK = 4  # side of the blocks whose "on" pixels are counted
FONT_SIZES = (40, 64)
MAX_STROKE = 3  # extra stroke width in font pixels (0..MAX_STROKE)
MAX_ROTATION = math.radians(15.0)
MAX_SHEAR = 0.3
MAX_LOG_ASPECT = 0.35  # horizontal stretch factor in exp(±MAX_LOG_ASPECT)


def font_dir() -> Path:
    """Folder of the TrueType fonts that matplotlib ships."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def fonts_for(char: str) -> tuple[str, ...]:
    """Font files of `FONT_FILES` that have a glyph for `char` which draws something."""
    found = []
    for name in FONT_FILES:
        path = font_dir() / name
        if not path.is_file() or ord(char) not in _codepoints(path):
            continue
        if _font(name, FONT_SIZES[0]).getmask(char).getbbox() is not None:
            found.append(name)
    return tuple(found)


@cache
def _codepoints(path: Path) -> frozenset[int]:
    return frozenset(TTFont(path, lazy=True).getBestCmap() or ())


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


def _draw(
    char: str, font: ImageFont.FreeTypeFont, stroke: int, angle: float, shear: float, aspect: float
) -> np.ndarray:
    """`char` drawn white on black, thickened by `stroke`, then rotated, sheared and stretched."""
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text(
        (1 - left, 1 - top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    # forward = rotation(angle) @ [[aspect, shear], [0, 1]]; the output canvas just holds the
    # transformed corners, and PIL wants the inverse map (output pixel -> input pixel).
    cos, sin = math.cos(angle), math.sin(angle)
    a, b, c, d = cos * aspect, cos * shear - sin, sin * aspect, sin * shear + cos
    width, height = canvas.size
    xs = (0.0, a * width, b * height, a * width + b * height)
    ys = (0.0, c * width, d * height, c * width + d * height)
    x_low, y_low = min(xs) - 1, min(ys) - 1
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    canvas = canvas.transform(
        (math.ceil(max(xs) - x_low) + 1, math.ceil(max(ys) - y_low) + 1),
        Image.Transform.AFFINE,
        (ia, ib, ia * x_low + ib * y_low, ic, id_, ic * x_low + id_ * y_low),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(canvas)


def _fit(
    grey: np.ndarray, max_height: int, max_width: int, y_frac: float, x_shift: int
) -> np.ndarray:
    """Binary 32x32 bitmap with the glyph's bounding box scaled into `max_width x max_height`.

    The box keeps its aspect ratio and lies at `y_frac` of the free height, `x_shift` pixels off
    the horizontal centre.
    """
    ink = grey >= 128
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    scale = min(max_height / (bottom - top), max_width / (right - left))
    fit_w, fit_h = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    glyph = Image.fromarray(grey[top:bottom, left:right])
    glyph = np.asarray(glyph.resize((fit_w, fit_h), Image.Resampling.BILINEAR))
    # Hairline strokes can fade below mid-grey when shrunk: lower the threshold rather than lose them.
    glyph = glyph >= min(128, int(glyph.max()))

    bitmap = np.zeros((BITMAP, BITMAP), dtype=bool)
    y0 = round(y_frac * (BITMAP - fit_h))
    x0 = min(max((BITMAP - fit_w) // 2 + x_shift, 0), BITMAP - fit_w)
    bitmap[y0 : y0 + fit_h, x0 : x0 + fit_w] = glyph
    return bitmap


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """Number of "on" pixels in each 4x4 block of a binary 32x32 bitmap: uint8 8x8, 0..16."""
    side = BITMAP // BLOCK
    return bitmap.reshape(side, BLOCK, side, BLOCK).sum(axis=(1, 3), dtype=np.uint8)


def render_glyphs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render `n` random glyphs: (images uint8 [n, 8, 8] with values 0..16, labels int64 [n]).

    Labels index `SOURCE_CLASSES`; each class gets `n // len(SOURCE_CLASSES)` or one more images,
    in random order. The same `(n, seed)` gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(SOURCE_CLASSES))
    form_u, font_u = rng.random(n), rng.random(n)
    sizes = rng.integers(*FONT_SIZES, size=n, endpoint=True)
    strokes = rng.integers(MAX_STROKE, size=n, endpoint=True)
    angles = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n)
    shears = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    aspects = np.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT, n))
    # optdigits glyphs fill the bitmap's height and are about 3/4 as wide; wide letters fit the width.
    max_heights = BITMAP - rng.integers(0, 2, size=n, endpoint=True)
    max_widths = rng.integers(24, BITMAP, size=n, endpoint=True)
    y_fracs = rng.random(n)
    x_shifts = rng.integers(-2, 2, size=n, endpoint=True)

    images = np.empty((n, BITMAP // BLOCK, BITMAP // BLOCK), dtype=np.uint8)
    for i, label in enumerate(labels):
        char = SOURCE_CLASSES[label]
        forms = (char, CASE_TWINS[char]) if char in CASE_TWINS else (char,)
        char = forms[int(form_u[i] * len(forms))]
        fonts = fonts_for(char)
        font = _font(fonts[int(font_u[i] * len(fonts))], int(sizes[i]))
        grey = _draw(char, font, int(strokes[i]), angles[i], shears[i], aspects[i])
        bitmap = _fit(grey, int(max_heights[i]), int(max_widths[i]), y_fracs[i], int(x_shifts[i]))
        images[i] = block_counts(bitmap)
    return images, labels
