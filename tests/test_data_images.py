"""load_rgb: every awkward image kind either loads as correct RGB or raises BadImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from cnncam.data.images import BadImageError, data_bit_depth, load_rgb, png_significant_bits

BIG = 10_000_000


def _px(im: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    assert im.mode == "RGB"
    return tuple(im.getpixel(xy))  # type: ignore[arg-type]


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png", BIG)
    assert im.mode == "RGB" and im.size == (9, 6)
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = _px(load_rgb(tmp_path / "cmyk.jpg", BIG), (8, 8))
    assert r > 240 and g < 15 and b < 15  # pure red


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257 * 100, 65535, 4096]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "xray.png")
    assert Image.open(tmp_path / "xray.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "xray.png", BIG))
    assert out.shape == (1, 4, 3)
    # Clipping (Image.convert("L")) would give 255 for every non-zero value.
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 16])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_12bit_png_keeps_every_grey_level(tmp_path: Path) -> None:
    # A 12-bit X-ray in a 16-bit PNG: values 0..4095. Dividing by 257 would leave 17 grey levels.
    arr = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(arr).save(tmp_path / "xray12.png")
    out = np.asarray(load_rgb(tmp_path / "xray12.png", BIG))[..., 0]
    assert len(np.unique(out)) == 256  # every 8-bit level used
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out.ravel(), np.rint(np.arange(4096) * 255 / 4095).astype(np.uint8))


def test_declared_significant_bits_win_over_the_data_maximum(tmp_path: Path) -> None:
    # A dark 12-bit image (max 1000) that says so in its sBIT chunk is scaled as 12-bit, not
    # brightened as if it were 10-bit data; without the chunk the maximum decides.
    arr = np.array([[0, 500, 1000]], dtype=np.uint16)
    info = PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(arr).save(tmp_path / "declared.png", pnginfo=info)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    assert png_significant_bits(tmp_path / "declared.png") == 12
    assert png_significant_bits(tmp_path / "plain.png") is None
    declared = np.asarray(load_rgb(tmp_path / "declared.png", BIG))[0, :, 0]
    plain = np.asarray(load_rgb(tmp_path / "plain.png", BIG))[0, :, 0]
    np.testing.assert_array_equal(declared, np.rint(np.array([0, 500, 1000]) * 255 / 4095))
    np.testing.assert_array_equal(plain, np.rint(np.array([0, 500, 1000]) * 255 / 1023))
    assert [data_bit_depth(v) for v in (0, 255, 256, 1023, 1024, 4095, 4096, 65535)] == [
        8,
        8,
        10,
        10,
        12,
        12,
        14,
        16,
    ]
    assert data_bit_depth(5000, declared=12) == 14  # a chunk that lies is ignored
    (tmp_path / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert png_significant_bits(tmp_path / "torn.png") is None


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png", BIG)
    assert _px(out, (0, 0)) == (10, 20, 30) and _px(out, (1, 1)) == (200, 100, 50)


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_is_on_white(tmp_path: Path, ext: str) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.putpixel((2, 2), 1)
    im.save(tmp_path / f"pt.{ext}", transparency=0)
    out = load_rgb(tmp_path / f"pt.{ext}", BIG)
    assert _px(out, (0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert _px(out, (2, 2)) == (200, 100, 50)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    im.save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png", BIG)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in _px(out, (2, 0)))


def test_la_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("LA", (2, 1))
    im.putdata([(0, 0), (50, 255)])
    im.save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png", BIG)
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (50, 50, 50)


def test_grayscale_and_one_bit(tmp_path: Path) -> None:
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert _px(load_rgb(tmp_path / "l.png", BIG), (1, 1)) == (77, 77, 77)
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    out = load_rgb(tmp_path / "bw.png", BIG)
    assert _px(out, (0, 0)) == (0, 0, 0) and _px(out, (1, 0)) == (255, 255, 255)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, left half red.  Orientation 6 = "rotate 90 CW to display":
    # the stored left column becomes the top row, so the upright image is 20 x 40, red on top.
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "phone.jpg", BIG)
    assert out.size == (20, 40)
    top, bottom = _px(out, (10, 5)), _px(out, (10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match="truncated") as err:
        load_rgb(tmp_path / "cut.jpg", BIG)
    assert err.value.path.endswith("cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:-2000])
    with pytest.raises(BadImageError, match="cannot decode"):
        load_rgb(tmp_path / "cut.png", BIG)


def test_zero_byte_text_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html>403 Forbidden</html>")
    with pytest.raises(BadImageError, match="empty file") as err:
        load_rgb(tmp_path / "empty.jpg", BIG)
    assert err.value.reason == "empty file (0 bytes)"
    with pytest.raises(BadImageError, match="not an image"):
        load_rgb(tmp_path / "page.jpg", BIG)
    with pytest.raises(BadImageError, match="cannot read"):
        load_rgb(tmp_path / "gone.jpg", BIG)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 60)).save(tmp_path / "bomb.png")
    assert load_rgb(tmp_path / "bomb.png", 6000).size == (100, 60)  # exactly at the limit is fine

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(BadImageError, match="decompression bomb: 100x60 = 6000 pixels exceeds"):
        load_rgb(tmp_path / "bomb.png", 5999)
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 6000  # untouched global
