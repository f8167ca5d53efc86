"""Formula-driven pretraining images: fractals and radial contours, no real image.

Formula-driven supervised learning (Kataoka et al., ACCV 2020 "Pre-training without natural
images"; CVPR 2022 "Replacing labeled real-image datasets with auto-generated contours") trains
a ViT to tell apart images that one formula draws, each class one set of the formula's
parameters. Two families, both rendered at `SIZE` x `SIZE` in grey levels 0..1 (bright on dark):

- **Fractals** (FractalDB): a class is an iterated function system of 2-4 affine maps, sampled
  the way Anderson & Farrell (WACV 2022, "Improved fractal pre-training") sample them, by their
  singular values, so that the attractor is neither a dot nor noise (sigma-factor in
  [(5+N)/2, (6+N)/2]); an image is its attractor drawn by the chaos game, each instance with its
  maps perturbed by a few percent, flipped, turned and drawn either as a point cloud or as a
  density.
- **Radial contours** (RCDB): a class is a polygon (3-12 vertices) whose radius is modulated by
  a few harmonics, stretched to its own aspect ratio, drawn as 1-4 nested outlines; an instance
  has its own size, centre, rotation, stroke width and is drawn either as outlines or as a
  filled silhouette with a shaded, textured fill (shapes like clothing photos', without a photo).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
OVERSAMPLE = 2  # drawn on a grid this much finer, then averaged down (anti-aliasing)
POINTS = 1500  # chaos-game points per fractal image (after BURN_IN)
BURN_IN = 20
JITTER = 0.05  # relative perturbation of an instance's affine maps
MAX_HARMONICS = 3


def _seeded(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


# ---------------------------------------------------------------------- fractals
def fractal_systems(classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`classes` iterated function systems: maps [C, 4, 2, 3] (A | b, padded to 4 maps) and
    their probabilities [C, 4] (proportional to |det A|; 0 for padding)."""
    rng = _seeded(seed, 0)
    maps = np.zeros((classes, 4, 2, 3))
    probs = np.zeros((classes, 4))
    for c in range(classes):
        n = int(rng.integers(2, 5))
        alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
        while True:  # split the sigma-factor over the maps: each share in (0, 3]
            share = alpha * rng.dirichlet(np.ones(n))
            if share.max() <= 3.0:
                break
        for k, a in enumerate(share):
            s1 = rng.uniform(max(a / 3, a - 2), min(1.0, a))
            s2 = (a - s1) / 2
            theta, phi = rng.uniform(0, 2 * math.pi, 2)
            signs = np.diag(rng.choice([-1.0, 1.0], 2))
            A = _rotation(theta) @ np.diag([s1, s2]) @ _rotation(phi) @ signs
            maps[c, k] = np.column_stack([A, rng.uniform(-1, 1, 2)])  # A | b
            probs[c, k] = abs(np.linalg.det(A)) + 1e-3
        probs[c] /= probs[c].sum()
    return maps, probs


def _rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def render_fractals(
    maps: np.ndarray, probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Attractors of the systems `labels` picks, one chaos game per image: [N, SIZE, SIZE]."""
    n = len(labels)
    inst = maps[labels] * (1 + JITTER * rng.standard_normal((n, 4, 2, 3)))
    cum = np.cumsum(probs[labels], axis=1)
    z = np.zeros((n, 2))
    points = np.empty((POINTS, n, 2))
    rows = np.arange(n)
    for t in range(BURN_IN + POINTS):
        k = np.minimum((rng.random((n, 1)) > cum).sum(axis=1), 3)
        m = inst[rows, k]
        z = np.einsum("nij,nj->ni", m[:, :, :2], z) + m[:, :, 2]
        z = np.clip(z, -1e3, 1e3)  # a perturbed map may expand: keep the numbers finite
        if t >= BURN_IN:
            points[t - BURN_IN] = z
    # Fit each attractor's robust bounding box into the image, with a random margin.
    lo = np.percentile(points, 1, axis=0)
    hi = np.percentile(points, 99, axis=0)
    span = (hi - lo).max(axis=1, keepdims=True) + 1e-9
    fine = SIZE * OVERSAMPLE
    fill = rng.uniform(0.7, 0.95, (n, 1))
    centre = (lo + hi) / 2
    offset = rng.uniform(-0.05, 0.05, (n, 2))
    uv = ((points - centre) / span * fill + 0.5 + offset) * fine
    ij = np.clip(uv.astype(np.int64), 0, fine - 1)
    flat = rows[None, :] * fine * fine + ij[..., 1] * fine + ij[..., 0]
    counts = np.bincount(flat.ravel(), minlength=n * fine * fine).reshape(n, fine, fine)
    counts = counts.reshape(n, SIZE, OVERSAMPLE, SIZE, OVERSAMPLE).sum(axis=(2, 4))
    density = np.log1p(counts) / np.log1p(counts.reshape(n, -1).max(axis=1))[:, None, None]
    binary = (counts > 0).astype(np.float64)
    as_density = rng.random(n)[:, None, None] < 0.5
    images = np.where(as_density, density, binary) * rng.uniform(0.6, 1.0, (n, 1, 1))
    return _flip_turn(images, rng)


def _flip_turn(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flips, turns = rng.random(len(images)) < 0.5, rng.integers(0, 4, len(images))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = np.rot90(image[:, ::-1] if flips[i] else image, turns[i])
    return out


# ---------------------------------------------------------------------- radial contours
def contour_classes(classes: int, seed: int) -> list[dict]:
    """`classes` radial-contour formulas: vertices, nested outlines, radius harmonics."""
    rng = _seeded(seed, 1)
    out = []
    for _ in range(classes):
        h = int(rng.integers(1, MAX_HARMONICS + 1))
        out.append({
            "vertices": int(rng.integers(3, 13)),
            "outlines": int(rng.integers(1, 5)),
            "freqs": rng.integers(1, 7, h),
            "amps": rng.uniform(0.05, 0.3, h),
            "phases": rng.uniform(0, 2 * math.pi, h),
            "aspect": math.exp(rng.uniform(-0.5, 0.5)),
        })  # fmt: skip
    return out


def render_contours(
    formulas: list[dict], labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The radial contours `labels` picks, drawn as outlines or shaded silhouettes."""
    fine = SIZE * OVERSAMPLE
    images = np.empty((len(labels), SIZE, SIZE))
    yy, xx = np.mgrid[0:fine, 0:fine] / fine - 0.5
    for i, label in enumerate(labels):
        f = formulas[label]
        steps = f["vertices"] * 8
        angles = np.linspace(0, 2 * math.pi, steps, endpoint=False)
        vertex = np.floor(angles / (2 * math.pi) * f["vertices"]) / f["vertices"] * 2 * math.pi
        # piecewise-straight polygon sides, then the class's radius harmonics on top
        t = angles - vertex - math.pi / f["vertices"]
        base = math.cos(math.pi / f["vertices"]) / np.cos(t)
        wave = f["amps"][:, None] * np.sin(f["freqs"][:, None] * angles + f["phases"][:, None])
        radius = base * (1 + wave.sum(axis=0) + rng.normal(0, 0.02, steps))
        scale = rng.uniform(0.25, 0.45) * fine
        spin = rng.uniform(0, 2 * math.pi)
        cx, cy = fine / 2 + rng.uniform(-0.08, 0.08, 2) * fine
        stretch = f["aspect"] * math.exp(rng.normal(0, 0.1))
        canvas = Image.new("L", (fine, fine))
        draw = ImageDraw.Draw(canvas)
        filled = rng.random() < 0.5
        for level in range(f["outlines"], 0, -1):
            r = radius * scale * level / f["outlines"]
            x, y = r * np.cos(angles) * stretch, r * np.sin(angles) / stretch
            x, y = x * math.cos(spin) - y * math.sin(spin), x * math.sin(spin) + y * math.cos(spin)
            xy = list(zip(cx + x, cy + y, strict=True))
            if filled:
                draw.polygon(xy, fill=255 if level == f["outlines"] else 0)
                if level < f["outlines"]:
                    draw.polygon(xy, outline=255, width=int(rng.integers(1, 3)))
            else:
                draw.polygon(xy, outline=255, width=int(rng.integers(1, 4)))
        mask = np.asarray(canvas, dtype=np.float64) / 255
        if filled:  # shaded fill: a linear gradient and a little texture
            g = rng.uniform(-1, 1, 2)
            shade = 0.65 + 0.3 * (g[0] * xx + g[1] * yy) + rng.normal(0, 0.05, (fine, fine))
            mask = mask * np.clip(shade, 0.2, 1.0)
        images[i] = mask.reshape(SIZE, OVERSAMPLE, SIZE, OVERSAMPLE).mean(axis=(1, 3))
    return images * rng.uniform(0.6, 1.0, (len(labels), 1, 1))
