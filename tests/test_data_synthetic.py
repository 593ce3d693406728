"""Synthetic shapes and glyphs: deterministic bytes, correct boxes, layouts, folder safety, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from cnncam.config import DataConfig, SplitConfig
from cnncam.data.dataset import discover, load_boxes
from cnncam.data.glyphs import CHARSETS, check_charset, font_paths, glyph_rng, render_glyph
from cnncam.data.splits import split_counts
from cnncam.data.synthetic import (
    MARKER,
    SHAPES,
    generate_glyphs,
    generate_shapes,
    image_rng,
    main,
    render_sample,
)
from cnncam.errors import ConfigError, DataError

SIZE = 32


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small(out: Path, **kw: object) -> Path:
    args: dict[str, object] = {"num_classes": 3, "per_class": 4, "image_size": SIZE, "seed": 0}
    args.update(kw)
    return generate_shapes(out, **args)  # type: ignore[arg-type]


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    a, b = _files(_small(tmp_path / "a")), _files(_small(tmp_path / "b"))
    assert a == b
    assert sorted(a) == sorted(
        [MARKER, "boxes.json"] + [f"{s}/{s}_{n:05d}.png" for s in SHAPES[:3] for n in range(1, 5)]
    )
    other = _files(_small(tmp_path / "c", seed=1))
    assert other["circle/circle_00001.png"] != a["circle/circle_00001.png"]


def test_boxes_json_is_sorted_and_matches_files(tmp_path: Path) -> None:
    out = _small(tmp_path / "s")
    text = (out / "boxes.json").read_text()
    raw = json.loads(text)
    assert list(raw) == sorted(raw)
    assert set(raw) == {k for k in _files(out) if k.endswith(".png")}
    assert load_boxes(out) == {k: tuple(v) for k, v in raw.items()}


@pytest.mark.parametrize("shape", SHAPES)
def test_object_pixels_lie_inside_a_tight_box(shape: str) -> None:
    r = render_sample(shape, 48, image_rng(3, shape, 7))
    x0, y0, x1, y1 = r.box
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    changed = np.any(np.asarray(r.image) != np.asarray(r.background), axis=2)
    ys, xs = np.nonzero(changed)
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    mask = np.asarray(r.mask) > 0
    mys, mxs = np.nonzero(mask)  # tight: the mask touches all four edges
    assert (mxs.min(), mys.min(), mxs.max() + 1, mys.max() + 1) == r.box
    # Object is 25-45% of the image; rotation/shape can shrink or grow the extent a little.
    assert 0.12 * 48 <= max(x1 - x0, y1 - y0) <= 0.55 * 48


def test_written_images_are_the_rendered_ones(tmp_path: Path) -> None:
    out = _small(tmp_path / "s", num_classes=2, per_class=2)
    boxes = load_boxes(out)
    assert boxes is not None
    for rel, box in boxes.items():
        shape, number = rel.split("/")[0], int(rel[-9:-4])
        r = render_sample(shape, SIZE, image_rng(0, shape, number))
        np.testing.assert_array_equal(np.asarray(Image.open(out / rel)), np.asarray(r.image))
        assert box == r.box


def test_presplit_layout_jpg(tmp_path: Path) -> None:
    out = _small(tmp_path / "p", per_class=10, layout="presplit", fmt="jpg", split=(0.6, 0.2, 0.2))
    counts = split_counts(10, (0.6, 0.2, 0.2))
    for split, n in zip(("train", "val", "test"), counts):
        for shape in SHAPES[:3]:
            assert len(list((out / split / shape).glob("*.jpg"))) == n
    boxes = load_boxes(out)
    assert (
        boxes is not None
        and len(boxes) == 30
        and all(k.split("/")[0] in ("train", "val", "test") for k in boxes)
    )
    index = discover(DataConfig(root=str(out), layout="auto", image_size=SIZE), seed=0)
    assert index.classes == sorted(SHAPES[:3])
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 18, "val": 6, "test": 6}
    assert index.skipped == []


def test_regenerate_replaces_previous_output(tmp_path: Path) -> None:
    out = _small(tmp_path / "s", per_class=5)
    first = _files(out)
    _small(out, per_class=2, num_classes=2)
    second = _files(out)
    assert sorted(second) == sorted(
        [MARKER, "boxes.json"] + [f"{s}/{s}_{n:05d}.png" for s in SHAPES[:2] for n in (1, 2)]
    )
    assert not (out / SHAPES[2]).exists()
    _small(out, per_class=5)
    assert _files(out) == first


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty and was not made by"):
        _small(tmp_path / "mine")
    assert _files(tmp_path / "mine") == {"thesis.txt": b"precious"}
    _small(tmp_path / "new" / "deep")  # new folders are fine, parents included
    (tmp_path / "empty").mkdir()
    _small(tmp_path / "empty")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="leaves no training image"):
        generate_shapes(tmp_path / "x", per_class=2, layout="presplit", split=(0.2, 0.4, 0.4))
    assert not (tmp_path / "x").exists()  # refused before touching the disk
    with pytest.raises(ConfigError, match="num_classes"):
        generate_shapes(Path("unused"), num_classes=len(SHAPES) + 1)
    with pytest.raises(ConfigError, match="did you mean 'png'"):
        generate_shapes(Path("unused"), fmt="pgn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sum to 1"):
        generate_shapes(Path("unused"), split=(0.5, 0.1, 0.1))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--classes", "2", "--per-class", "3", "--size", str(SIZE), "--seed", "4"]
    assert main(argv + ["--layout", "presplit", "--format", "jpg", "--split", "0.34", "0.33", "0.33"]) == 0
    assert "wrote 6 images of 2 classes" in capsys.readouterr().out
    assert (
        sorted(p.parent.parent.name for p in out.rglob("*.jpg")) == ["test"] * 2 + ["train"] * 2 + ["val"] * 2
    )
    assert main(argv) == 0  # regenerates in place with another layout
    assert _files(out) == _files(generate_shapes(tmp_path / "api", 2, 3, SIZE, 4))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    assert main(["--out", str(tmp_path / "foreign")]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o2"), "--classes", "1"]) == 2


# ----------------------------------------------------------------------------------------------
# Rendered glyphs


def test_glyph_fonts_are_matplotlibs_and_render_every_character_distinctly() -> None:
    import matplotlib

    paths = font_paths()
    assert len(paths) >= 12
    assert all(
        p.parent == Path(matplotlib.get_data_path()) / "fonts" / "ttf" for p in paths
    )  # no system font
    chars = CHARSETS["alnum"]
    for path in paths:
        font = ImageFont.truetype(str(path), 40)
        renders = []
        for c in chars:
            im = Image.new("L", (48, 56), 0)
            ImageDraw.Draw(im).text((4, 2), c, fill=255, font=font)
            assert im.getbbox() is not None, f"{path.name} draws nothing for {c!r}"
            renders.append(im.tobytes())
        assert len(set(renders)) == len(chars), f"{path.name} draws two characters alike"


@pytest.mark.parametrize("char", ["0", "1", "8", "A", "W"])
def test_glyph_lies_in_its_tight_box_and_stands_out(char: str) -> None:
    image, mask, box = render_glyph(char, 40, glyph_rng(3, 0, char, 5))
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 40
    m = np.asarray(mask) > 0
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box
    assert (y1 - y0) >= 0.25 * 40  # 0.5-0.95 em: at least a quarter of the image tall
    pixels = np.asarray(image, dtype=np.float64).mean(axis=2)
    outside = np.ones_like(m)
    outside[y0:y1, x0:x1] = False
    inked = np.asarray(mask) == 255
    assert abs(pixels[inked].mean() - pixels[outside].mean()) > 40  # ink contrasts with the background


def test_glyph_images_vary_and_repeat() -> None:
    a = render_glyph("5", 32, glyph_rng(3, 0, "5", 1))
    b = render_glyph("5", 32, glyph_rng(3, 0, "5", 1))
    c = render_glyph("5", 32, glyph_rng(3, 0, "5", 2))
    d = render_glyph("6", 32, glyph_rng(3, 0, "6", 1))
    assert a[0].tobytes() == b[0].tobytes() and a[2] == b[2]  # same generator, same pixels
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != d[1].tobytes()
    with pytest.raises(ConfigError, match="one character"):
        render_glyph("10", 32, glyph_rng(3, 0, "1", 1))
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        check_charset("digit")


def test_generate_glyphs_folder_boxes_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = generate_glyphs(tmp_path / "g", "digits", num_classes=3, per_class=4, image_size=SIZE, seed=1)
    files = _files(out)
    assert sorted(files) == sorted(
        [MARKER, "boxes.json"] + [f"{c}/{c}_{n:05d}.png" for c in "012" for n in range(1, 5)]
    )
    assert _files(generate_glyphs(tmp_path / "h", "digits", 3, 4, SIZE, 1)) == files  # byte-identical
    marker = json.loads(files[MARKER])
    assert marker["args"]["kind"] == "glyphs" and marker["args"]["fonts"] == [p.name for p in font_paths()]
    boxes = load_boxes(out)
    assert boxes is not None and set(boxes) == {k for k in files if k.endswith(".png")}
    image, _mask, box = render_glyph("2", SIZE, glyph_rng(3, 1, "2", 3))
    assert np.array_equal(np.asarray(Image.open(out / "2" / "2_00003.png")), np.asarray(image))
    assert boxes["2/2_00003.png"] == box
    index = discover(DataConfig(root=str(out), layout="single", split=SplitConfig(0.5, 0.25, 0.25)), seed=0)
    assert index.classes == ["0", "1", "2"]

    cli = tmp_path / "cli"
    argv = [
        "--out",
        str(cli),
        "--kind",
        "glyphs",
        "--charset",
        "letters",
        "--classes",
        "2",
        "--per-class",
        "2",
    ]
    assert main(argv) == 0
    assert "wrote 4 images of 2 classes (A, B)" in capsys.readouterr().out
    assert Image.open(cli / "A" / "A_00001.png").size == (32, 32)  # the glyphs' default size
    assert main(["--out", str(tmp_path / "bad"), "--kind", "glyphs", "--classes", "11"]) == 2
    assert "num_classes must be within 2..10" in capsys.readouterr().err
