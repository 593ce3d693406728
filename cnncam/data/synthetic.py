"""Seeded synthetic image folders with known object boxes: ``python -m cnncam.data.synthetic``.

Two kinds.  ``shapes`` (default): each image holds one filled shape (the class) at a random
position, scale and colour on a noisy, blotchy background drawn from one distribution for every
class, so a model can only classify by looking at the shape.  ``glyphs``: digits or capital
letters rendered from matplotlib's bundled TrueType fonts (:mod:`cnncam.data.glyphs`) with random
font, size, rotation, position, stroke width, polarity, texture and noise -- closer to real
scanned characters, still with no download.  ``boxes.json`` records where the object is, so CAMs
can be scored (pointing game, Zhang et al. 2016, arXiv 1608.00507) without any downloaded data.

Same arguments -> byte-identical files: every image draws from its own
``numpy.random.Generator`` seeded by (seed, class, image number), never from global RNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cnncam.config import SplitConfig
from cnncam.console import track
from cnncam.data.glyphs import CHARSETS, check_charset, font_paths, glyph_rng, render_glyph
from cnncam.data.shapes import SHAPES as SHAPES
from cnncam.data.shapes import Box as Box
from cnncam.data.shapes import Rendered as Rendered
from cnncam.data.shapes import image_rng as image_rng
from cnncam.data.shapes import render_sample as render_sample
from cnncam.data.splits import split_counts
from cnncam.errors import CnncamError, ConfigError, DataError, choice_message
from cnncam.runs import atomic_write_json, atomic_write_text

MARKER = ".cnncam-synthetic.json"  # hidden, so discovery ignores it
BOXES = "boxes.json"
_TAG_SPLIT, _TAG_GLYPH = 2, 3  # first SeedSequence word keeps the streams apart (1: shapes' images)


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
    _validate(num_classes, per_class, image_size, seed, layout, fmt, split, len(SHAPES))
    shapes = SHAPES[:num_classes]

    def draw(shape: str, number: int) -> tuple[Image.Image, Box]:
        rendered = render_sample(shape, image_size, image_rng(seed, shape, number))
        return rendered.image, rendered.box

    keys = {shape: SHAPES.index(shape) for shape in shapes}
    args: dict[str, object] = {
        "num_classes": num_classes,
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
    }
    return _write(Path(out), shapes, keys, draw, args, per_class, seed, layout, fmt, split, "shapes")


def generate_glyphs(
    out: Path,
    charset: str = "digits",
    num_classes: int | None = None,
    per_class: int = 300,
    image_size: int = 32,
    seed: int = 0,
    layout: Literal["single", "presplit"] = "single",
    fmt: Literal["png", "jpg"] = "png",
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Path:
    """Write rendered glyphs ``out/<char>/<char>_00001.png ...`` (see :mod:`cnncam.data.glyphs`).

    Classes are the first ``num_classes`` characters of ``charset`` (``digits``: 0-9, ``letters``:
    A-Z, ``alnum``: both; default all of them).  ``boxes.json`` and the marker as for
    :func:`generate_shapes`.  Returns ``out``.
    """
    chars = check_charset(charset)
    num_classes = len(chars) if num_classes is None else num_classes
    _validate(num_classes, per_class, image_size, seed, layout, fmt, split, len(chars))
    classes = tuple(chars[:num_classes])

    def draw(char: str, number: int) -> tuple[Image.Image, Box]:
        image, _mask, box = render_glyph(char, image_size, glyph_rng(_TAG_GLYPH, seed, char, number))
        return image, box

    keys = {c: 1000 + ord(c) for c in classes}  # split streams apart from the shapes' class indices
    args: dict[str, object] = {
        "charset": charset,
        "num_classes": num_classes,
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
        "fonts": [p.name for p in font_paths()],
    }
    return _write(Path(out), classes, keys, draw, args, per_class, seed, layout, fmt, split, "glyphs")


def _write(
    out: Path,
    classes: Sequence[str],
    keys: dict[str, int],
    draw: Callable[[str, int], tuple[Image.Image, Box]],
    args: dict[str, object],
    per_class: int,
    seed: int,
    layout: str,
    fmt: str,
    split: tuple[float, float, float],
    kind: str,
) -> Path:
    plan = _plan(classes, keys, per_class, seed, layout, fmt, split)
    _prepare(out)
    args = {"kind": kind, **args, "layout": layout, "fmt": fmt, "split": list(split)}
    atomic_write_json(
        out / MARKER,
        {"generator": "cnncam.data.synthetic", "version": 1, "args": args, "files": sorted(plan) + [BOXES]},
    )
    boxes: dict[str, list[int]] = {}
    for rel, (name, number) in track(plan.items(), total=len(plan), desc=f"drawing {kind}", unit="img"):
        image, box = draw(name, number)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            image.save(target, format="PNG")
        else:
            image.save(target, format="JPEG", quality=95)
        boxes[rel] = list(box)
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
    max_classes: int,
) -> None:
    if not 2 <= num_classes <= max_classes:
        raise ConfigError(f"num_classes must be within 2..{max_classes}, got {num_classes}")
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
    shapes: Sequence[str],
    keys: dict[str, int],
    per_class: int,
    seed: int,
    layout: str,
    fmt: str,
    split: tuple[float, float, float],
) -> dict[str, tuple[str, int]]:
    """Relative path -> (class, 1-based number), in writing order; ``keys`` seed each class's split."""
    plan: dict[str, tuple[str, int]] = {}
    for shape in shapes:
        names = [f"{shape}/{shape}_{n:05d}.{fmt}" for n in range(1, per_class + 1)]
        if layout == "single":
            plan.update({name: (shape, n) for n, name in enumerate(names, 1)})
            continue
        # Same per-class shuffle-then-count rule as data discovery uses for `single`.
        order = np.random.default_rng([_TAG_SPLIT, seed, keys[shape]]).permutation(per_class)
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


# (per class, image size) when --per-class / --size are not given.
_CLI_DEFAULTS = {"shapes": (150, 64), "glyphs": (300, 32)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnncam.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, required=True, help="folder to write (new, empty or made by this tool)"
    )
    p.add_argument(
        "--kind",
        choices=["shapes", "glyphs"],
        default="shapes",
        help="shapes: filled shapes on blotchy noise; glyphs: digits/letters in matplotlib's fonts",
    )
    p.add_argument(
        "--charset",
        choices=list(CHARSETS),
        default="digits",
        help="glyphs only: digits (0-9), letters (A-Z) or alnum (both)",
    )
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help=f"number of classes (default: shapes 4; glyphs the whole charset). Shapes: {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--per-class", type=int, default=None, help="images per class (default: shapes 150, glyphs 300)"
    )
    p.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default: shapes 64, glyphs 32)"
    )
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
    per_class, size = _CLI_DEFAULTS[args.kind]
    per_class = per_class if args.per_class is None else args.per_class
    size = size if args.size is None else args.size
    common = {
        "per_class": per_class,
        "image_size": size,
        "seed": args.seed,
        "layout": args.layout,
        "fmt": args.fmt,
        "split": tuple(args.split),
    }
    try:
        if args.kind == "glyphs":
            classes = list(check_charset(args.charset)[: args.classes])
            out = generate_glyphs(args.out, charset=args.charset, num_classes=args.classes, **common)
        else:
            classes = list(SHAPES[: args.classes or 4])
            out = generate_shapes(args.out, num_classes=args.classes or 4, **common)
    except CnncamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = len(classes) * per_class
    print(f"wrote {total} images of {len(classes)} classes ({', '.join(classes)}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
