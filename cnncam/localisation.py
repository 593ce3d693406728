"""Localisation conventions and trivial baselines, in NumPy (no torch: the report imports this).

* Pointing game (Zhang et al., ECCV 2016, arXiv 1608.00507): a map *hits* when the centre of its
  arg-max pixel lies in the object's box (the exact form) or within a tolerance of it (TorchRay's
  form: 15 px for ~224 px inputs, scaled here to the input, ``15 * max(H, W) / 224``).
* Baselines on the same images (TorchRay prints one beside every pointing-game figure): the
  *centre-point* baseline points at the centre pixel ``(H // 2, W // 2)`` of every image; the
  *box-area* baseline for energy-in-box is a uniform map, whose energy in the box is the share of
  pixel centres inside the box.

Boxes are ``x0, y0, x1, y1`` in input pixels; pixel ``j`` spans ``[j, j + 1)``, so its centre is
``j + 0.5``.  A row with a NaN is "no box" and gives NaN baselines.
"""

from __future__ import annotations

import numpy as np

POINTING_TOLERANCE_PX = 15.0
POINTING_REFERENCE_SIZE = 224.0


def pointing_tolerance(height: int, width: int) -> float:
    """TorchRay's 15 px tolerance scaled to an input of ``height x width`` pixels."""
    return POINTING_TOLERANCE_PX * max(height, width) / POINTING_REFERENCE_SIZE


def point_hits(points: np.ndarray, boxes: np.ndarray, tolerance: float) -> np.ndarray:
    """(N, 2) points ``(x, y)``, (N, 4) boxes -> (N,) float: 1 hit, 0 miss, NaN no box."""
    boxes = np.asarray(boxes, dtype=np.float64)
    px, py = points[:, 0], points[:, 1]
    dx = np.clip(np.maximum(boxes[:, 0] - px, px - boxes[:, 2]), 0, None)
    dy = np.clip(np.maximum(boxes[:, 1] - py, py - boxes[:, 3]), 0, None)
    with np.errstate(invalid="ignore"):
        hit = (np.hypot(dx, dy) <= tolerance).astype(np.float64)
    return np.where(np.isnan(boxes).any(axis=1), np.nan, hit)


def centre_baseline(boxes: np.ndarray, height: int, width: int, tolerance: float) -> np.ndarray:
    """(N,) pointing-game hits (1/0, NaN = no box) of a map whose peak is the centre pixel."""
    centre = np.array([[width // 2 + 0.5, height // 2 + 0.5]])
    return point_hits(np.repeat(centre, len(boxes), axis=0), boxes, tolerance)


def box_area_baseline(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) energy-in-box of a uniform map: the share of pixel centres inside the box (NaN = no box)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    with np.errstate(invalid="ignore"):
        in_y = ((ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])).sum(axis=1)
        in_x = ((xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])).sum(axis=1)
    share = in_y * in_x / float(height * width)
    return np.where(np.isnan(boxes).any(axis=1), np.nan, share)
