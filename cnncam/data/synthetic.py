"""A seeded synthetic image folder with known object boxes: ``python -m cnncam.data.synthetic``.

Each image holds one filled shape (the class) at a random position, scale and colour on a
noisy, blotchy background drawn from one distribution for every class, so a model can only
classify by looking at the shape; ``boxes.json`` records where the shape is, so CAMs can be
scored (pointing game, Zhang et al. 2016, arXiv 1608.00507) without any downloaded data.

Same arguments -> byte-identical files: every image draws from its own
``numpy.random.Generator`` seeded by (seed, shape, image number), never from global RNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cnncam.config import SplitConfig
from cnncam.console import track
from cnncam.data.splits import split_counts
from cnncam.errors import CnncamError, ConfigError, DataError, choice_message
from cnncam.runs import atomic_write_json, atomic_write_text

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
MARKER = ".cnncam-synthetic.json"  # hidden, so discovery ignores it
BOXES = "boxes.json"
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact coverage mask
_TAG_IMAGE, _TAG_SPLIT = 1, 2  # first SeedSequence word keeps the two streams apart

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


# ----------------------------------------------------------------------------------------------
# Writing a folder


def generate_shapes(
    out: Path,
    num_classes: int = 4,
    per_class: int = 150,
    image_size: int = 64,
    seed: int = 0,
    layout: Literal["single", "presplit"] = "single",
    fmt: Literal["png", "jpg"] = "png",
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Path:
    """Write ``out/<shape>/<shape>_00001.png ...`` (or ``out/{train,val,test}/<shape>/...``).

    Also writes ``out/boxes.json`` (path relative to ``out`` -> [x0, y0, x1, y1] of the object,
    sorted keys) and a hidden marker listing the files, so that running again with any
    arguments replaces exactly what the previous run wrote.  Classes are the first
    ``num_classes`` names of :data:`SHAPES`.  Returns ``out``.
    """
    out = Path(out)
    _validate(num_classes, per_class, image_size, seed, layout, fmt, split)
    shapes = SHAPES[:num_classes]
    plan = _plan(shapes, per_class, seed, layout, fmt, split)
    _prepare(out)
    args = {
        "num_classes": num_classes,
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
        "layout": layout,
        "fmt": fmt,
        "split": list(split),
    }
    atomic_write_json(
        out / MARKER,
        {"generator": "cnncam.data.synthetic", "version": 1, "args": args, "files": sorted(plan) + [BOXES]},
    )
    boxes: dict[str, list[int]] = {}
    for rel, (shape, number) in track(plan.items(), total=len(plan), desc="drawing shapes", unit="img"):
        rendered = render_sample(shape, image_size, image_rng(seed, shape, number))
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            rendered.image.save(target, format="PNG")
        else:
            rendered.image.save(target, format="JPEG", quality=95)
        boxes[rel] = list(rendered.box)
    # One entry per line, sorted: readable, diff-able and byte-identical across runs.
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(boxes[k])}" for k in sorted(boxes))
    atomic_write_text(out / BOXES, "{\n" + lines + "\n}\n")
    return out


def _validate(
    num_classes: int,
    per_class: int,
    image_size: int,
    seed: int,
    layout: str,
    fmt: str,
    split: tuple[float, float, float],
) -> None:
    if not 2 <= num_classes <= len(SHAPES):
        raise ConfigError(f"num_classes must be within 2..{len(SHAPES)}, got {num_classes}")
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16 pixels, got {image_size}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if layout not in ("single", "presplit"):
        raise ConfigError(choice_message("layout", layout, ["single", "presplit"]))
    if fmt not in ("png", "jpg"):
        raise ConfigError(choice_message("format", fmt, ["png", "jpg"]))
    if len(split) != 3:
        raise ConfigError(f"split must be three ratios (train, val, test), got {split}")
    SplitConfig(*split)  # validates ranges and the sum


def _plan(
    shapes: Sequence[str], per_class: int, seed: int, layout: str, fmt: str, split: tuple[float, float, float]
) -> dict[str, tuple[str, int]]:
    """Relative path -> (shape, 1-based number), in writing order."""
    plan: dict[str, tuple[str, int]] = {}
    for shape in shapes:
        names = [f"{shape}/{shape}_{n:05d}.{fmt}" for n in range(1, per_class + 1)]
        if layout == "single":
            plan.update({name: (shape, n) for n, name in enumerate(names, 1)})
            continue
        # Same per-class shuffle-then-count rule as data discovery uses for `single`.
        order = np.random.default_rng([_TAG_SPLIT, seed, SHAPES.index(shape)]).permutation(per_class)
        n_train, n_val, _ = split_counts(per_class, split)
        if n_train == 0:
            raise ConfigError(f"split {split} leaves no training image of {per_class} per class")
        for pos, i in enumerate(order):
            part = "train" if pos < n_train else "val" if pos < n_train + n_val else "test"
            plan[f"{part}/{names[i]}"] = (shape, int(i) + 1)
    return plan


def _prepare(out: Path) -> None:
    """Refuse foreign non-empty folders; remove what a previous generator run wrote."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    marker = out / MARKER
    if not marker.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise DataError(
                f"refusing to write into {out}: it is not empty and was not made by cnncam.data.synthetic "
                f"(no {MARKER}); choose an empty or new folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        return
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{marker} is corrupt ({e}); delete {out} and generate again") from None
    out_resolved = out.resolve()
    parents: set[Path] = set()
    for rel in files:
        path = (out / rel).resolve()
        if out_resolved not in path.parents:  # a tampered marker must never delete outside `out`
            raise DataError(f"{marker} lists {rel!r}, which is outside {out}")
        path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if out_resolved in p.parents)
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    marker.unlink()


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnncam.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, required=True, help="folder to write (new, empty or made by this tool)"
    )
    p.add_argument(
        "--classes", type=int, default=4, help=f"number of shapes, 2..{len(SHAPES)}: {', '.join(SHAPES)}"
    )
    p.add_argument("--per-class", type=int, default=150, help="images per class")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=["single", "presplit"],
        default="single",
        help="single: out/<class>/*; presplit: out/{train,val,test}/<class>/*",
    )
    p.add_argument("--format", dest="fmt", choices=["png", "jpg"], default="png")
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="ratios for --layout presplit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cnncam.data.synthetic`` / ``cnncam-synth``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        out = generate_shapes(
            args.out,
            num_classes=args.classes,
            per_class=args.per_class,
            image_size=args.size,
            seed=args.seed,
            layout=args.layout,
            fmt=args.fmt,
            split=tuple(args.split),
        )
    except CnncamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = args.classes * args.per_class
    print(f"wrote {total} images of {args.classes} classes ({', '.join(SHAPES[: args.classes])}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
