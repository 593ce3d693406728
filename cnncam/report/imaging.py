"""The report's pictures in numpy and Pillow: the CAM display convention without torch.

The report reads HDF5 and draws PNGs; importing torch for that cost about 0.8 GB of memory and
a second or more per command.  These functions follow ``cnncam.cam.viz`` exactly (bilinear
upsampling with ``align_corners=False``, per-map min-max, the same colormap table and blend) and
the eval geometry of ``cnncam.data.transforms`` (resize the short side to ``data.eval_resize``,
centre-crop ``data.image_size``); ``tests/test_report_imaging.py`` checks both against torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cnncam.config import DataConfig
from cnncam.errors import CamError, choice_message

NORMALIZE_EPS = 1e-12  # cnncam.cam.viz.NORMALIZE_EPS


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each output pixel (PyTorch's rule)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample(maps: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Bilinear resize of the last two dims, ``align_corners=False``: (..., h, w) -> (..., H, W) float32."""
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = np.asarray(maps, dtype=np.float32)
    h, w = x.shape[-2:]
    y0, y1, wy = _axis_weights(h, out_h)
    x0, x1, wx = _axis_weights(w, out_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]  # (..., H, w)
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


def normalize(maps: np.ndarray, eps: float = NORMALIZE_EPS) -> np.ndarray:
    """Per-map min-max to [0, 1] over the last two dims; a constant map becomes all zeros."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - lo) / (hi - lo + eps)


def to_uint8(maps01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 0..255 (rounded half to even like torch, clamped), same shape."""
    return np.round(np.clip(maps01, 0, 1) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def colormap_lut(cmap: str = "jet") -> np.ndarray:
    """(256, 3) float32 RGB lookup table in [0, 1] from matplotlib's colormap ``cmap``."""
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise CamError(choice_message("colormap", cmap, sorted(matplotlib.colormaps))) from None
    lut = cm(np.linspace(0.0, 1.0, 256))[:, :3].astype("float32")
    lut.flags.writeable = False  # shared through the cache
    return lut


def overlay(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) image and (h, w) map in [0, 1] -> (H, W, 3) ``alpha * heat + (1 - alpha) * image``."""
    if not 0.0 <= alpha <= 1.0:
        raise CamError(f"overlay alpha must be within [0, 1], got {alpha}")
    if map01.shape != image.shape[:2]:
        map01 = np.clip(upsample(map01, image.shape[:2]), 0, 1)
    heat = colormap_lut(cmap)[to_uint8(map01).astype(np.int64)]
    return np.clip(alpha * heat + (1.0 - alpha) * image.astype(np.float32), 0, 1).astype(np.float32)


def eval_geometry(image: Image.Image, data: DataConfig) -> np.ndarray:
    """An RGB image through the eval geometry -> (image_size, image_size, 3) float32 in [0, 1].

    Same output size and crop offsets as torchvision's ``Resize(eval_resize)`` +
    ``CenterCrop(image_size)``; Pillow's antialiased bilinear filter stands in for torchvision's.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = data.eval_resize, int(data.eval_resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    crop = data.image_size
    pad_y, pad_x = max(0, crop - new_h), max(0, crop - new_w)
    if pad_y or pad_x:  # torchvision pads a too-small image with zeros before cropping
        arr = np.pad(arr, ((pad_y // 2, (pad_y + 1) // 2), (pad_x // 2, (pad_x + 1) // 2), (0, 0)))
    top = int(round((arr.shape[0] - crop) / 2.0))
    left = int(round((arr.shape[1] - crop) / 2.0))
    return np.ascontiguousarray(arr[top : top + crop, left : left + crop])
