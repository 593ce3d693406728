"""Synthetic shapes: one filled shape (the class) on a noisy, blotchy background, and its box.

The background is drawn from one distribution for every class and before the class, so a
model can only classify by looking at the shape.  Written to folders by
:mod:`cnncam.data.synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cnncam.errors import ConfigError, DataError, choice_message

SHAPES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "diamond",
    "stripes",
    "hexagon",
    "crescent",
)
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact coverage mask
_TAG_IMAGE = 1  # first SeedSequence word; cnncam.data.synthetic uses 2 (split) and 3 (glyphs)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Rendered:
    """One synthetic sample. ``image``/``background``: RGB (S, S); ``mask``: L coverage 0..255."""

    image: Image.Image
    background: Image.Image
    mask: Image.Image
    box: Box  # x0, y0 inclusive; x1, y1 exclusive (PIL getbbox convention)


def image_rng(seed: int, shape: str, number: int) -> np.random.Generator:
    """The generator that draws image ``number`` (1-based) of ``shape``."""
    return np.random.default_rng([_TAG_IMAGE, seed, SHAPES.index(shape), number])


def render_sample(shape: str, image_size: int, rng: np.random.Generator) -> Rendered:
    """Draw one ``shape`` on a fresh noisy background of side ``image_size``."""
    if shape not in SHAPES:
        raise ConfigError(choice_message("shape", shape, SHAPES))
    background = _background(image_size, rng)
    base = np.asarray(background, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    colour = _object_colour(base, rng)
    mask = _shape_mask(shape, image_size, rng)
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    pixels = np.asarray(background, dtype=np.float64) * (1.0 - m) + colour * m
    image = Image.fromarray(np.rint(pixels).astype(np.uint8))
    box = mask.getbbox()
    if box is None:  # cannot happen: shapes are at least 25% of the image
        raise DataError(f"internal error: empty {shape} mask")
    return Rendered(image=image, background=background, mask=mask, box=tuple(int(v) for v in box))  # type: ignore[arg-type]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Low-contrast blotches + pixel noise around a dark-to-mid, slightly tinted grey.

    Drawn before (and independently of) the class, so no background statistic predicts it.
    """
    grey = rng.uniform(40.0, 130.0)
    base = np.clip(grey + rng.integers(-12, 13, size=3), 0, 255)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        x, y = rng.uniform(-0.1, 1.0, size=2) * size
        tint = np.clip(base + rng.integers(-20, 21, size=3), 0, 255)
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in tint))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 16)))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 5.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def _object_colour(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Any hue, but clearly brighter than the background (mean channel >= base + 90).

    Measured: with random colours of either polarity a 3-block CNN stays near chance
    after 8 epochs on 600 images; one polarity makes the shape, not the colour contrast,
    the thing to learn.  Bounded loop keeps it deterministic.
    """
    colour = rng.integers(0, 256, size=3)
    for _ in range(200):
        if colour.mean() >= base.mean() + 90:
            break
        colour = rng.integers(0, 256, size=3)
    else:
        colour = np.clip(base + 120, 0, 255).astype(np.int64)
    return colour.astype(np.float64)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """(S, S) L coverage mask of one shape; side 25-45% of the image, fully inside it."""
    side = rng.uniform(0.25, 0.45) * size
    # Rotated corners reach ~0.55 side from the centre; keep the whole shape in the image.
    half = 0.56 * side
    cx, cy = rng.uniform(half, size - half, size=2)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    k = side * _SUPERSAMPLE

    def to_px(points: Sequence[tuple[float, float]], rot: float = angle) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        return [
            ((cx + (x * c - y * s) * side) * _SUPERSAMPLE, (cy + (x * s + y * c) * side) * _SUPERSAMPLE)
            for x, y in points
        ]

    def disc(r: float, dx: float = 0.0, dy: float = 0.0, fill: int = 255) -> None:
        x, y = (cx + dx * side) * _SUPERSAMPLE, (cy + dy * side) * _SUPERSAMPLE
        draw.ellipse([x - r * k, y - r * k, x + r * k, y + r * k], fill=fill)

    if shape == "circle":
        disc(0.5)
    elif shape == "ring":
        disc(0.5)
        disc(0.28, fill=0)
    elif shape == "crescent":
        disc(0.5)
        bite = rng.uniform(0, 2 * math.pi)
        disc(0.42, 0.25 * math.cos(bite), 0.25 * math.sin(bite), fill=0)
    elif shape == "cross":
        draw.polygon(to_px(_rect(0.5, 0.15)), fill=255)
        draw.polygon(to_px(_rect(0.15, 0.5)), fill=255)
    elif shape == "stripes":
        for offset in (-0.36, -0.12, 0.12, 0.36):
            draw.polygon(to_px([(x + offset, y) for x, y in _rect(0.06, 0.45)]), fill=255)
    else:
        draw.polygon(to_px(_POLYGONS[shape]), fill=255)
    return big.reduce(_SUPERSAMPLE)


def _rect(hw: float, hh: float) -> list[tuple[float, float]]:
    return [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]


def _regular(n: int, r_outer: float, r_inner: float | None = None) -> list[tuple[float, float]]:
    radii = [r_outer] * n if r_inner is None else [r_outer, r_inner] * (n // 2)
    return [
        (r * math.sin(2 * math.pi * i / len(radii)), -r * math.cos(2 * math.pi * i / len(radii)))
        for i, r in enumerate(radii)
    ]


# Unit shapes in a side-1 square centred on 0 (y down).
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": _rect(0.4, 0.4),
    "triangle": [(0.0, -0.5), (0.5, 0.4), (-0.5, 0.4)],
    "diamond": [(0.0, -0.5), (0.32, 0.0), (0.0, 0.5), (-0.32, 0.0)],  # taller than wide: not a square
    "star": _regular(10, 0.5, 0.2),
    "hexagon": _regular(6, 0.5),
}
