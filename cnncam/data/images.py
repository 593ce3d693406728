"""Robust image decoding: every file either becomes an RGB ``PIL.Image`` or a :class:`BadImageError`.

Kaggle-style folders are messy: CMYK JPEGs, 16-bit PNG X-rays, palette GIFs with
transparency, phone photos with an EXIF orientation tag, truncated downloads and HTML
error pages saved as ``.jpg``.  ``torchvision.datasets.ImageFolder`` hands all of these to
``Image.convert("RGB")``, which clips 16-bit data, composites alpha on black and ignores
EXIF rotation.  :func:`load_rgb` converts each kind properly, or says why it cannot.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cnncam.errors import DataError

log = logging.getLogger(__name__)

# Modes whose alpha channel must be composited (on white: a transparent logo or icon on
# black turns into a dark blob the model learns instead of the object).
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ORIENTATION = 0x0112  # EXIF tag 274
_warned_truncated_flag = False


class BadImageError(DataError):
    """A file cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB image, upright.

    Parameters
    ----------
    path:
        Image file.
    max_pixels:
        Refuse images with more than ``width * height`` pixels (decompression bombs).
        Checked from the header, before any pixel is decoded.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, size (W, H) after EXIF orientation, fully loaded (no open file).

    Raises
    ------
    BadImageError
        Zero-byte, missing, unidentifiable, truncated or corrupt files, too many pixels,
        or a pixel mode that cannot be converted to RGB.
    """
    path = Path(path)
    _check_truncated_flag()
    source: Path | io.BytesIO = path
    try:
        size = path.stat().st_size
    except OSError as e:
        data = _tar_member(path)  # "<shard>.tar/<key>": a sample inside a WebDataset shard
        if data is None:
            raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
        source, size = io.BytesIO(data), len(data)
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(source) as im:
            _check_pixels(path, im.size, max_pixels)
            im.load()
            return _to_rgb(path, _upright(im))
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as e:
        # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS) fires inside Image.open,
        # before our check can run; it is still a bomb as far as we are concerned.
        raise BadImageError(path, f"decompression bomb refused by Pillow ({e})") from None
    except Exception as e:  # noqa: BLE001
        # Pillow plugins raise many types on corrupt input (OSError "image file is truncated",
        # SyntaxError "broken PNG file", struct.error, ValueError, IndexError, EOFError...).
        # Each of them means "this file is unusable"; the reason is kept for skipped.json.
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def _tar_member(path: Path) -> bytes | None:
    """The image bytes of a WebDataset sample path, None when ``path`` is not inside a .tar file."""
    from cnncam.data.webdataset import read_image_member

    try:
        return read_image_member(path)
    except DataError as e:
        raise BadImageError(path, str(e)) from None


def _check_truncated_flag() -> None:
    # A library elsewhere in the process may have set this global; truncated files would
    # then load silently with grey bottoms.  We never set it ourselves.
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process); "
            "truncated images will not be detected",
            stacklevel=3,
        )


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImageError(path, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(
            path,
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"data.max_image_pixels = {max_pixels}",
        )


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are stored sideways with tag 6/8)."""
    # exif_transpose copies even upright images; read the tag first to skip that copy.
    if im.getexif().get(_ORIENTATION, 1) in (0, 1):
        return im
    upright = ImageOps.exif_transpose(im)
    return upright if upright is not None else im


def _to_rgb(path: Path, im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_depth_to_l(im, png_significant_bits(path)).convert("RGB")
    if mode == "CMYK":
        # Pillow's JPEG decoder already undoes Adobe's inverted CMYK; the plain formula
        # conversion is what browsers do without a colour-managed profile.
        return im.convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(path, f"cannot convert pixel mode {mode!r} to RGB ({e})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    """(W, H) RGBA -> RGB alpha-composited over white."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# Bit depths that sensors and DICOM exports store in 16-bit containers.
_DEPTHS = (8, 10, 12, 14, 16)


def data_bit_depth(max_value: int, declared: int | None = None) -> int:
    """The bit depth 16-bit data uses: the PNG's declared significant bits (sBIT) when present,
    else the smallest of 8, 10, 12, 14, 16 bits whose range holds ``max_value``."""
    if declared is not None and 1 <= declared <= 16 and max_value < 2**declared:
        return declared
    return next(d for d in _DEPTHS if max_value < 2**d)


def png_significant_bits(path: Path) -> int | None:
    """The first value of a PNG's ``sBIT`` chunk (significant bits of the grey or red channel).

    Pillow does not expose it; we read the chunks before the pixel data.  None for other files,
    for PNGs without the chunk, and for anything malformed.
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):  # sBIT precedes IDAT; a bounded walk over a foreign file
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = f.read(length)
                if kind == b"sBIT":
                    return data[0] if data else None
                f.seek(4, 1)  # CRC
    except OSError:
        return None
    return None


def _high_depth_to_l(im: Image.Image, declared_bits: int | None = None) -> Image.Image:
    """16-bit / 32-bit grey -> 8-bit ``L`` by scaling, never by clipping.

    ``convert("L")`` clips 16-bit values at 255, so a 12-bit X-ray turns almost white; dividing
    by 257 (the full 16-bit range) keeps only 16 of its grey levels.  Integer data is scaled by
    the bit depth it uses (:func:`data_bit_depth`): 12-bit data 0..4095 -> 0..255, all 256 levels.
    """
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        depth = data_bit_depth(int(arr.max()), declared_bits)
        scaled = np.rint(arr.astype(np.float64) * (255.0 / (2**depth - 1)))
    elif im.mode == "F" and arr.min() >= 0.0 and arr.max() <= 1.0:
        scaled = np.rint(arr.astype(np.float64) * 255.0)
    else:
        # Unknown range (signed 32-bit, float HDR): stretch min..max to 0..255.
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros(arr.shape) if hi <= lo else np.rint((arr - lo) * (255.0 / (hi - lo)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
