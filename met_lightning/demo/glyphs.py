"""Procedurally rendered letter glyphs in the format of scikit-learn's 8x8 digits.

The demo backbone is pretrained on these glyphs, a source task disjoint from digits. Each glyph
is made the way the UCI optdigits data were: a letter from a random font (the TrueType fonts that
matplotlib ships), randomly sized, thickened, rotated, sheared and stretched, is binarized, its
bounding box fitted into a 32x32 bitmap (full height, with random margins and shift), and the
"on" pixels counted in 4x4 blocks: an 8x8 image, values 0..16.

Classes: Latin letters plus a few Greek ones, leaving out every letter that looks like a digit
(0: O o Q D Θ θ Ο ο Ω Φ φ σ; 1: I l i j Ι ι; 2: Z z ζ; 3: ε ξ; 4: A Δ; 5: S s ς; 6: G b δ;
7: T t τ; 8: B β; 9: g q ρ). Glyphs fill the box height, so lower case letters that are
small copies of their capital (c p u v w x, π, ψ) are drawn as other forms of the capital's
class; Greek letters that duplicate a Latin shape (Α Β Ε Η Κ Μ Ν Ρ Τ Υ Χ α κ ν υ χ ω) are unused.
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
CASE_TWINS: dict[str, str] = dict(zip("CPUVWXΠΨ", "cpuvwxπψ", strict=True))

# Text faces among matplotlib's fonts; the others (DejaVu*Display subsets, STIX size variants and
# non-Unicode sets, cmex/cmsy symbol fonts, LastResort boxes) do not draw letters.
FONT_FILES: tuple[str, ...] = (
    *(f"DejaVuSans{style}.ttf" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSansMono{style}.ttf" for style in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSerif{style}.ttf" for style in ("", "-Bold", "-Italic", "-BoldItalic")),
    *(f"STIXGeneral{style}.ttf" for style in ("", "Bol", "Italic", "BolIta")),
    *(f"{name}.ttf" for name in ("cmr10", "cmb10", "cmss10", "cmti10", "cmtt10", "cmmi10")),
)

BITMAP = 32  # optdigits bitmap side
BLOCK = 4  # side of the blocks whose "on" pixels are counted
OVERSAMPLE = 2  # the bitmap is resampled on a finer grid and thresholded after averaging
FONT_SIZES = (40, 64)
MAX_STROKE = 1.5  # outline added around the strokes, in bitmap pixels
MAX_ROTATION = math.radians(15.0)
MAX_SHEAR = 0.3
MAX_LOG_ASPECT = 0.35  # horizontal stretch factor in exp(±MAX_LOG_ASPECT)


def font_dir() -> Path:
    """Folder of the TrueType fonts that matplotlib ships."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def fonts_for(char: str) -> tuple[str, ...]:
    """Font files of `FONT_FILES` that have a glyph for `char` which draws something."""
    return tuple(
        name
        for name in FONT_FILES
        if (font_dir() / name).is_file()
        and ord(char) in _codepoints(font_dir() / name)
        and _font(name, FONT_SIZES[0]).getmask(char).getbbox() is not None
    )


@cache
def _codepoints(path: Path) -> frozenset[int]:
    return frozenset(TTFont(path, lazy=True).getBestCmap() or ())


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    # The basic layout engine is much faster than raqm and enough for single characters.
    return ImageFont.truetype(str(font_dir() / name), size, layout_engine=ImageFont.Layout.BASIC)


@cache
def _glyph_height(font: ImageFont.FreeTypeFont, char: str) -> int:
    _, top, _, bottom = font.getbbox(char)
    return bottom - top


def _render_bitmap(
    char: str,
    font: ImageFont.FreeTypeFont,
    stroke: float,
    warp: tuple[float, float, float],
    box: tuple[int, int, float, int],
) -> np.ndarray:
    """`char` as a binary 32x32 bitmap, size-normalized like optdigits.

    The glyph is thickened by `stroke` bitmap pixels on each side and warped by
    `warp = (angle, shear, aspect)`: rotation(angle) @ [[aspect, shear], [0, 1]]. The bounding box
    of its ink then keeps its aspect ratio and is scaled to fit `box = (max_height, max_width,
    y_frac, x_shift)`, placed at `y_frac` of the free height, `x_shift` pixels off the centre.
    """
    max_height, max_width, y_frac, x_shift = box
    stroke = stroke * _glyph_height(font, char) / max_height  # in font pixels
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    left, top = math.floor(left), math.floor(top)
    right, bottom = math.ceil(right), math.ceil(bottom)
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text(
        (-left, -top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    rows, cols = np.nonzero(np.asarray(canvas) >= 128)

    angle, shear, aspect = warp
    cos, sin = math.cos(angle), math.sin(angle)
    a, b, c, d = cos * aspect, cos * shear - sin, sin * aspect, sin * shear + cos
    x, y = cols + 0.5, rows + 0.5  # ink pixel centres
    u, v = a * x + b * y, c * x + d * y
    u_low, v_low = u.min() - 0.5, v.min() - 0.5
    width, height = u.max() + 0.5 - u_low, v.max() + 0.5 - v_low

    scale = min(max_height / height, max_width / width)
    x0 = min(max((BITMAP - width * scale) / 2 + x_shift, 0.0), BITMAP - width * scale)
    y0 = y_frac * (BITMAP - height * scale)

    # One affine map from the canvas onto a grid OVERSAMPLE times finer than the bitmap:
    # fine = k * warp(p) + t. PIL wants its inverse (fine pixel -> canvas pixel).
    k = scale * OVERSAMPLE
    t0, t1 = OVERSAMPLE * (x0 - scale * u_low), OVERSAMPLE * (y0 - scale * v_low)
    det = (a * d - b * c) * k
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    fine = canvas.transform(
        (BITMAP * OVERSAMPLE, BITMAP * OVERSAMPLE),
        Image.Transform.AFFINE,
        (ia, ib, -(ia * t0 + ib * t1), ic, id_, -(ic * t0 + id_ * t1)),
        resample=Image.Resampling.BILINEAR,
    )
    grey = np.asarray(fine.reduce(OVERSAMPLE))
    # Hairlines can fade below mid-grey when shrunk: lower the threshold rather than lose them.
    return grey >= min(128, int(grey.max()))


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """Number of "on" pixels in each 4x4 block of a binary 32x32 bitmap: uint8 8x8, 0..16."""
    side = BITMAP // BLOCK
    return bitmap.reshape(side, BLOCK, side, BLOCK).sum(axis=(1, 3), dtype=np.uint8)


def render_glyphs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render `n` random glyphs: (images uint8 [n, 8, 8] with values 0..16, labels int64 [n]).

    Labels index `SOURCE_CLASSES`; each class gets `n // len(SOURCE_CLASSES)` or one more images,
    in random order. The same `(n, seed)` gives the same arrays (with the same Pillow / FreeType).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(SOURCE_CLASSES))
    form_u, font_u = rng.random(n), rng.random(n)
    # As Python lists: numpy scalars slow down the per-glyph arithmetic.
    sizes = rng.integers(*FONT_SIZES, size=n, endpoint=True).tolist()
    strokes = rng.uniform(0.0, MAX_STROKE, n).tolist()
    angles = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n).tolist()
    shears = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n).tolist()
    aspects = np.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT, n)).tolist()
    # optdigits glyphs fill the bitmap's height and are about 3/4 as wide; wide letters fit width.
    max_heights = (BITMAP - rng.integers(0, 2, size=n, endpoint=True)).tolist()
    max_widths = rng.integers(24, BITMAP, size=n, endpoint=True).tolist()
    y_fracs = rng.random(n).tolist()
    x_shifts = rng.integers(-2, 2, size=n, endpoint=True).tolist()

    images = np.empty((n, BITMAP // BLOCK, BITMAP // BLOCK), dtype=np.uint8)
    for i, label in enumerate(labels):
        char = SOURCE_CLASSES[label]
        forms = (char, CASE_TWINS[char]) if char in CASE_TWINS else (char,)
        char = forms[int(form_u[i] * len(forms))]
        fonts = fonts_for(char)
        font = _font(fonts[int(font_u[i] * len(fonts))], sizes[i])
        warp = (angles[i], shears[i], aspects[i])
        box = (max_heights[i], max_widths[i], y_fracs[i], x_shifts[i])
        images[i] = block_counts(_render_bitmap(char, font, strokes[i], warp, box))
    return images, labels
