"""Rendered glyphs: digits and letters in random fonts on textured backgrounds, with their boxes.

A real-ish benchmark that needs no download: the TrueType fonts come from matplotlib's own
package data (DejaVu, STIX and Computer Modern ship inside the wheel), never from the system,
so the same arguments give the same pixels on any machine with the same matplotlib and Pillow.
Each sample varies font, size, rotation, position, stroke width, polarity (light on dark or dark
on light), background texture and noise; :func:`render_glyph` returns the glyph's coverage mask
and bounding box so CAM localisation can be scored like the shapes' (``boxes.json``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cnncam.errors import ConfigError, DataError, choice_message

CHARSETS = {
    "digits": "0123456789",
    "letters": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",  # upper case only: 'a' and 'A' collide on case-blind disks
    "alnum": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
}
# Text faces with ordinary Latin digits and capitals (the display, symbol and math-italic files
# of the same folder map other glyphs to these code points, or have none).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
_SUPERSAMPLE = 4
MAX_ROTATION = 15.0  # degrees; more would confuse 6 and 9, M and W


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def font_paths() -> tuple[Path, ...]:
    """The :data:`FONT_FILES` present in this matplotlib, in that fixed order."""
    folder = font_dir()
    paths = tuple(folder / name for name in FONT_FILES if (folder / name).is_file())
    if not paths:
        raise DataError(
            f"no TrueType font of {FONT_FILES[:2]}... in {folder}; is matplotlib installed whole?"
        )
    return paths


@functools.lru_cache(maxsize=2048)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size=size)


def check_charset(name: str) -> str:
    if name not in CHARSETS:
        raise ConfigError(choice_message("charset", name, CHARSETS))
    return CHARSETS[name]


def glyph_rng(tag: int, seed: int, char: str, number: int) -> np.random.Generator:
    """The generator that draws image ``number`` (1-based) of ``char``."""
    return np.random.default_rng([tag, seed, ord(char), number])


def render_glyph(
    char: str, image_size: int, rng: np.random.Generator
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """Draw ``char`` on a textured background of side ``image_size``.

    Returns (RGB image, L coverage mask 0..255, box (x0, y0, x1, y1), x1/y1 exclusive).
    """
    if len(char) != 1:
        raise ConfigError(f"a glyph is one character, got {char!r}")
    background = texture(image_size, rng)
    mask = _glyph_mask(char, image_size, rng)
    base = np.asarray(background, dtype=np.float64)
    colour = _contrasting_colour(base.reshape(-1, 3).mean(axis=0), rng)
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    pixels = base * (1.0 - m) + colour * m
    pixels += rng.normal(0.0, rng.uniform(2.0, 10.0), size=pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if rng.random() < 0.3:  # a slightly out-of-focus scan
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8)))
    box = mask.getbbox()
    if box is None:
        raise DataError(f"internal error: glyph {char!r} rendered empty")
    return image, mask, (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


def _glyph_mask(char: str, size: int, rng: np.random.Generator) -> Image.Image:
    """(S, S) coverage mask: a glyph of 0.5-0.95 em (digits: 35-70 % of the side), rotated, inside."""
    paths = font_paths()
    path = paths[int(rng.integers(len(paths)))]
    big = size * _SUPERSAMPLE
    px = int(round(rng.uniform(0.5, 0.95) * big))
    stroke = int(rng.integers(0, max(1, px // 18) + 1))
    font = _font(path, px)
    x0, y0, x1, y1 = (int(v) for v in font.getbbox(char, stroke_width=stroke))
    pad = 2 + stroke
    tile = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
    ImageDraw.Draw(tile).text(
        (pad - x0, pad - y0), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    tile = tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    tight = tile.getbbox()
    if tight is None:
        raise DataError(f"font {path.name} has no visible glyph for {char!r}")
    tile = tile.crop(tight)
    # Large, rotated glyphs may not fit: shrink to 90 % of the canvas at most.
    scale = min(1.0, 0.9 * big / max(tile.size))
    if scale < 1.0:
        shrunk = (max(1, int(tile.width * scale)), max(1, int(tile.height * scale)))
        tile = tile.resize(shrunk, Image.Resampling.LANCZOS)
    left = int(rng.integers(0, big - tile.width + 1))
    top = int(rng.integers(0, big - tile.height + 1))
    canvas = Image.new("L", (big, big), 0)
    canvas.paste(tile, (left, top))
    return canvas.reduce(_SUPERSAMPLE)


def texture(size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB background: a tinted grey plus one or two of blotches, gradient, stripes, grain.

    Drawn independently of the class, so no background statistic predicts it.
    """
    grey = rng.uniform(30.0, 225.0)
    base = np.clip(grey + rng.integers(-15, 16, size=3), 0, 255).astype(np.float64)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    kinds = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)
    for kind in kinds:
        amp = rng.uniform(10.0, 35.0)
        if kind == 0:  # blotches
            blot = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(blot)
            for _ in range(int(rng.integers(3, 8))):
                w, h = rng.uniform(0.1, 0.5, size=2) * size
                x, y = rng.uniform(-0.1, 1.0, size=2) * size
                draw.ellipse([x, y, x + w, y + h], fill=int(rng.integers(60, 256)))
            blot = blot.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 12)))
            img += (np.asarray(blot, dtype=np.float64)[..., None] / 255.0 - 0.5) * 2 * amp
        elif kind == 1:  # linear gradient in a random direction
            a = rng.uniform(0, 2 * math.pi)
            img += ((xx * math.cos(a) + yy * math.sin(a)) - 0.5)[..., None] * 2 * amp
        elif kind == 2:  # sinusoidal stripes (paper lines, fabric)
            a, freq = rng.uniform(0, math.pi), rng.uniform(2.0, 8.0)
            phase = rng.uniform(0, 2 * math.pi)
            wave = np.sin(2 * math.pi * freq * (xx * math.cos(a) + yy * math.sin(a)) + phase)
            img += wave[..., None] * amp * 0.6
        else:  # blurred grain
            grain = Image.fromarray(np.clip(rng.normal(128, 60, size=(size, size)), 0, 255).astype(np.uint8))
            grain = grain.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.5)))
            img += (np.asarray(grain, dtype=np.float64)[..., None] - 128.0) / 128.0 * amp
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def _contrasting_colour(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour whose mean differs from the background mean by >= 70, lighter or darker at random.

    Either polarity (ink on paper, chalk on board); a bounded loop keeps it deterministic.
    """
    lighter = rng.random() < 0.5
    if base.mean() > 185:
        lighter = False
    elif base.mean() < 70:
        lighter = True
    for _ in range(200):
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        diff = colour.mean() - base.mean()
        if (diff >= 70) if lighter else (diff <= -70):
            return colour
    return np.clip(base + (110 if lighter else -110), 0, 255)
