"""Batched, on-device helpers that turn raw CAMs into pictures.

Convention (the Grad-CAM paper's, and ours everywhere): ReLU (done by the method) -> bilinear
upsample to the input size with ``align_corners=False`` -> per-map min-max to [0, 1] with
``(x - min) / (max - min + eps)``.  Bilinear resizing is a convex combination, so normalising
before or after resizing gives the same picture (anchors-cam.md §5); normalising *after* keeps the
raw maps comparable across images until the very last step (pytorch-grad-cam #267).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cnncam.errors import CamError, choice_message

NORMALIZE_EPS = 1e-12


def upsample(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of the last two dims: (..., h, w) -> (..., H, W), ``align_corners=False``."""
    size = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = maps.reshape(-1, 1, h, w).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


def normalize(maps: Tensor, eps: float = NORMALIZE_EPS) -> Tensor:
    """Per-map min-max to [0, 1] over the last two dims; a constant map becomes all zeros."""
    lo = maps.amin((-2, -1), keepdim=True)
    hi = maps.amax((-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def to_uint8(maps01: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 0..255 (rounded, clamped), same shape."""
    return (maps01.clamp(0, 1) * 255).round().to(torch.uint8)


@functools.lru_cache(maxsize=16)
def colormap_lut(cmap: str = "jet") -> Tensor:
    """(256, 3) float32 RGB lookup table in [0, 1] from matplotlib's colormap ``cmap`` (CPU)."""
    import matplotlib  # lazy: only reports need it

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise CamError(choice_message("colormap", cmap, sorted(matplotlib.colormaps))) from None
    return torch.from_numpy(cm(np.linspace(0.0, 1.0, 256))[:, :3].astype("float32"))


def colorize(maps01: Tensor, cmap: str = "jet") -> Tensor:
    """Colour maps in [0, 1]: (N, H, W) or (N, 1, H, W) -> (N, 3, H, W) float32 in [0, 1].

    Any other leading shape works too: (..., H, W) -> (..., 3, H, W).
    """
    if maps01.dim() == 4 and maps01.shape[1] == 1:
        maps01 = maps01[:, 0]
    lut = colormap_lut(cmap).to(maps01.device)
    rgb = lut[to_uint8(maps01).long()]  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def overlay(images: Tensor, maps01: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Heatmap blended over the image: ``alpha * colorize(map) + (1 - alpha) * image``.

    Parameters
    ----------
    images : (N, 3, H, W) in [0, 1] (use :func:`denormalize` first).
    maps01 : (N, H, W) or (N, 1, H, W) in [0, 1]; resized bilinearly if not (H, W).
    """
    # The seeds blend `heatmap * 0.4 + img * 0.6`; alpha is report.alpha (default 0.5).
    if not 0.0 <= alpha <= 1.0:
        raise CamError(f"overlay alpha must be within [0, 1], got {alpha}")
    if maps01.dim() == 4 and maps01.shape[1] == 1:
        maps01 = maps01[:, 0]
    if maps01.shape[-2:] != images.shape[-2:]:
        maps01 = upsample(maps01, tuple(images.shape[-2:])).clamp(0, 1)  # type: ignore[arg-type]
    heat = colorize(maps01, cmap)
    return (alpha * heat + (1.0 - alpha) * images.float()).clamp(0, 1)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``Normalize(mean, std)``: (N, C, H, W) -> (N, C, H, W) clamped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    if m.shape[1] != images.shape[1] or s.shape[1] != images.shape[1]:
        raise CamError(f"mean/std have {m.shape[1]}/{s.shape[1]} values for {images.shape[1]} channels")
    return (images.float() * s + m).clamp(0, 1)
