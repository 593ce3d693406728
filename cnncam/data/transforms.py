"""Train / eval pipelines (torchvision.transforms.v2), normalisation statistics, box mapping.

The augmentations are the ones users' scripts already use (RandomResizedCrop, flips,
ColorJitter, rotation / shift / zoom), expressed through ``DataConfig`` fields.  All
geometric work happens on uint8 tensors (``ToImage`` first), the fast path of v2.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from cnncam.config import DataConfig
from cnncam.data.images import BadImageError, load_rgb
from cnncam.data.splits import Sample
from cnncam.errors import DataError
from cnncam.runs import RunPaths, atomic_write_json, read_json

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_STATS_IMAGES = 2000  # enough for per-channel mean/std to 3 decimals; bounded cost at startup
_MIN_STD = 1e-3  # a constant channel would divide by ~0


def _geometry(cfg: DataConfig) -> list[v2.Transform]:
    """Eval geometry: resize the short side to ``cfg.eval_resize``, center-crop ``image_size``."""
    return [v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(cfg.image_size)]


def _to_float(mean: Sequence[float], std: Sequence[float], normalize: bool) -> list[v2.Transform]:
    steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return steps


def eval_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL RGB image -> float tensor (3, image_size, image_size), normalised (unless normalize=none)."""
    return v2.Compose([v2.ToImage(), *_geometry(cfg), *_to_float(mean, std, cfg.normalize != "none")])


def train_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL RGB image -> augmented float tensor (3, image_size, image_size) per ``cfg.augment``.

    ``none``: the eval pipeline.  ``basic``: RandomResizedCrop(scale=crop_scale) + flips.
    ``full``: basic + RandomAffine(rotation, translate, zoom) + ColorJitter(color_jitter).
    """
    if cfg.augment == "none":
        return eval_transform(cfg, mean, std)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale), antialias=True),
    ]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(p=cfg.vflip))
    if cfg.augment == "full":
        if cfg.rotation > 0 or cfg.translate > 0 or cfg.zoom > 0:
            steps.append(
                v2.RandomAffine(
                    degrees=cfg.rotation,
                    translate=(cfg.translate, cfg.translate),
                    scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom),
                )
            )
        if cfg.color_jitter > 0:
            cj = cfg.color_jitter
            steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    return v2.Compose(steps + _to_float(mean, std, cfg.normalize != "none"))


# ----------------------------------------------------------------------------------------------
# Normalisation statistics


def normalization(
    cfg: DataConfig, train_samples: Sequence[Sample], root: Path, paths: RunPaths | None
) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) for ``Normalize``, per ``cfg.normalize``.

    ``dataset`` computes them over at most :data:`MAX_STATS_IMAGES` train images (evenly
    spaced over the list, so deterministic) after the eval resize/crop, and caches them in
    ``paths.norm_stats``; a cache computed for another image_size/resize is recomputed.
    """
    if cfg.normalize == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if cfg.normalize == "none":
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    key = {"image_size": cfg.image_size, "resize": cfg.eval_resize}
    if paths is not None and paths.norm_stats.is_file():
        cached = read_json(paths.norm_stats)
        if _valid_stats(cached) and all(cached.get(k) == v for k, v in key.items()):
            return [float(v) for v in cached["mean"]], [float(v) for v in cached["std"]]
        warnings.warn(
            f"{paths.norm_stats} was computed for {cached.get('image_size')}px / resize "
            f"{cached.get('resize')}; recomputing for {cfg.image_size}px / {cfg.eval_resize}",
            stacklevel=2,
        )
    mean, std, used = dataset_stats(cfg, train_samples, root)
    if paths is not None:
        atomic_write_json(paths.norm_stats, {"mean": mean, "std": std, "num_images": used, **key})
    return mean, std


def _valid_stats(cached: Any) -> bool:
    return isinstance(cached, dict) and all(
        isinstance(cached.get(k), list)
        and len(cached[k]) == 3
        and all(isinstance(v, (int, float)) for v in cached[k])
        for k in ("mean", "std")
    )


def dataset_stats(
    cfg: DataConfig, samples: Sequence[Sample], root: Path, limit: int = MAX_STATS_IMAGES
) -> tuple[list[float], list[float], int]:
    """(mean[3], std[3], images used) of pixels in [0, 1] after the eval resize/crop."""
    if not samples:
        raise DataError("cannot compute data.normalize=dataset statistics: the train split is empty")
    picks = np.unique(np.linspace(0, len(samples) - 1, num=min(limit, len(samples))).round().astype(int))
    geometry = v2.Compose([v2.ToImage(), *_geometry(cfg), v2.ToDtype(torch.float64, scale=True)])

    def moments(i: int) -> Any:
        try:
            x = geometry(load_rgb(Path(root) / samples[i][0], cfg.max_image_pixels))
        except BadImageError as e:
            log.warning("normalisation statistics: skipping %s (%s)", e.path, e.reason)
            return None
        return x.sum(dim=(1, 2)), (x * x).sum(dim=(1, 2)), x.shape[1] * x.shape[2]

    total, total_sq, pixels, used = (
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        0,
        0,
    )
    with ThreadPoolExecutor(max_workers=min(16, len(picks))) as pool:
        for result in pool.map(moments, picks.tolist()):
            if result is not None:
                total, total_sq, pixels, used = (
                    total + result[0],
                    total_sq + result[1],
                    pixels + result[2],
                    used + 1,
                )
    if used == 0:
        raise DataError("cannot compute data.normalize=dataset statistics: no train image could be decoded")
    mean = total / pixels
    var = (total_sq / pixels - mean * mean).clamp(min=0.0)
    std = var.sqrt().clamp(min=_MIN_STD)
    return [float(v) for v in mean], [float(v) for v in std], used


# ----------------------------------------------------------------------------------------------
# Boxes


def box_to_input(
    box: Sequence[float], orig_size: tuple[int, int], cfg: DataConfig
) -> tuple[float, float, float, float]:
    """Map (x0, y0, x1, y1) in original pixels to model-input pixels under :func:`eval_transform`.

    Parameters
    ----------
    box: corners in the original image, x1/y1 exclusive (so pixel edges, not centres).
    orig_size: (W, H) of the original image.

    Returns the box in the (image_size, image_size) input, clipped to it (may be empty).
    """
    w, h = orig_size
    # Same arithmetic as torchvision's _compute_resized_output_size (short side -> size,
    # long side truncated) and _center_crop_compute_crop_anchor (round half to even).
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.eval_resize, int(cfg.eval_resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    top = int(round((new_h - cfg.image_size) / 2.0))
    left = int(round((new_w - cfg.image_size) / 2.0))
    sx, sy = new_w / w, new_h / h
    x0, y0, x1, y1 = (float(v) for v in box)
    size = float(cfg.image_size)

    def clip(v: float) -> float:
        return min(max(v, 0.0), size)

    return clip(x0 * sx - left), clip(y0 * sy - top), clip(x1 * sx - left), clip(y1 * sy - top)
