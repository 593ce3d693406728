"""CAM quality metrics, batched on device: deletion / insertion AUC, pointing game, box energy.

Deletion and insertion (Petsiuk et al., RISE, BMVC 2018, arXiv 1806.07421):

* pixels are ranked by the CAM upsampled to the input size (bilinear, ``align_corners=False``;
  ties broken by pixel index, so results are deterministic);
* at step ``s`` of ``steps`` the top ``round(s / steps * H * W)`` pixels are deleted or inserted;
* deletion replaces them with 0 *in the normalised input space* (the dataset mean colour when the
  inputs are mean/std normalised; RISE's ``torch.zeros_like`` substrate), or with a blurred copy
  when ``deletion_baseline="blur"``; insertion reveals them on a blurred copy of the image
  (RISE: Gaussian kernel 11, sigma 5);
* the score is the softmax probability of the target class; the AUC is the trapezoid integral of
  the ``steps + 1`` scores over the deleted/inserted fraction in [0, 1].

A faithful CAM gives a *low* deletion AUC and a *high* insertion AUC.  All ``steps + 1`` perturbed
copies of a batch are scored with batched forwards of ``batch_size`` images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnncam.cam.layers import autocast, frozen_eval, model_device
from cnncam.cam.viz import upsample
from cnncam.errors import CamError

# Zhang et al., ECCV 2016 (arXiv 1608.00507): a hit within 15 px of the object, for ~224 px inputs.
POINTING_TOLERANCE_PX = 15.0
POINTING_REFERENCE_SIZE = 224.0


@dataclass(frozen=True)
class DeletionInsertion:
    """Per-image AUCs (N,) and the curves (N, steps + 1) over ``fractions`` (steps + 1,)."""

    deletion: Tensor
    insertion: Tensor
    fractions: Tensor
    deletion_curve: Tensor
    insertion_curve: Tensor


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with replicate padding (works at any size)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise CamError(f"blur kernel_size must be a positive odd number, got {kernel_size}")
    half = kernel_size // 2
    x = torch.arange(kernel_size, device=images.device, dtype=torch.float32) - half
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = images.float()
    out = F.conv2d(
        F.pad(out, (half, half, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c
    )
    out = F.conv2d(
        F.pad(out, (0, 0, half, half), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )
    return out.to(images.dtype)


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = 16,
    batch_size: int | None = None,
    deletion_baseline: Literal["zero", "blur"] = "zero",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    precision: str = "fp32",
) -> DeletionInsertion:
    """Deletion and insertion AUCs (see module doc).

    Parameters
    ----------
    images : (N, C, H, W) model inputs (normalised as for the model).
    maps : (N, h, w) or (N, 1, h, w) CAMs, any resolution.
    targets : (N,) class whose probability is tracked.
    batch_size : images per forward, rounded down to whole steps of N (default N).
    """
    if steps < 1:
        raise CamError(f"steps must be >= 1, got {steps}")
    if deletion_baseline not in ("zero", "blur"):
        raise CamError(f"unknown deletion_baseline {deletion_baseline!r}. Valid choices: zero, blur")
    device = model_device(model, images.device)
    images = images.to(device).float()
    n, _, height, width = images.shape
    maps = _as_maps(maps, n).to(device)
    targets = targets.to(device).long().reshape(-1)
    if targets.shape[0] != n:
        raise CamError(f"targets has {targets.shape[0]} entries but the batch has {n} images")
    rank = _pixel_rank(upsample(maps, (height, width)).flatten(1))  # (N, HW)
    counts = torch.round(torch.linspace(0, height * width, steps + 1, device=device)).long()
    fractions = counts.float() / (height * width)
    blurred = gaussian_blur(images, blur_kernel, blur_sigma)
    deleted = torch.zeros_like(images) if deletion_baseline == "zero" else blurred

    def masks(s: int) -> Tensor:  # (N, 1, H, W), 1 where pixel is among the top counts[s]
        return (rank < counts[s]).view(n, 1, height, width).float()

    per_forward = max(1, (batch_size or n) // n)
    with frozen_eval(model):
        score = _scorer(model, targets, precision)
        del_curve = _curve(lambda s: images * (1 - masks(s)) + deleted * masks(s), steps, per_forward, score)
        ins_curve = _curve(lambda s: blurred * (1 - masks(s)) + images * masks(s), steps, per_forward, score)
    return DeletionInsertion(
        torch.trapezoid(del_curve, fractions, dim=1),
        torch.trapezoid(ins_curve, fractions, dim=1),
        fractions,
        del_curve,
        ins_curve,
    )


def _pixel_rank(saliency: Tensor) -> Tensor:
    """(N, P) saliency -> (N, P) rank of each pixel, 0 = most salient (stable for ties)."""
    order = torch.argsort(saliency, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(saliency.shape[1], device=saliency.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def _scorer(model: nn.Module, targets: Tensor, precision: str) -> Callable[[Tensor], Tensor]:
    """(S*N, C, H, W) step-major stacked images -> (S*N,) target-class probabilities."""
    n = targets.shape[0]

    def score(x: Tensor) -> Tensor:
        with torch.no_grad(), autocast(x.device, precision):
            probs = torch.softmax(model(x).float(), 1)
        return probs.gather(1, targets.repeat(x.shape[0] // n)[:, None])[:, 0]

    return score


def _curve(
    make: Callable[[int], Tensor], steps: int, per_forward: int, score: Callable[[Tensor], Tensor]
) -> Tensor:
    """Scores (N, steps + 1) of the step images ``make(s)`` (N, C, H, W), s = 0..steps.

    ``per_forward`` steps are stacked into one forward, so memory stays at one batch's worth.
    """
    parts = []
    for first in range(0, steps + 1, per_forward):
        stacked = torch.cat([make(s) for s in range(first, min(first + per_forward, steps + 1))])
        parts.append(score(stacked))
    return torch.cat(parts).view(steps + 1, -1).T.contiguous()


def pointing_game(maps_up: Tensor, boxes: Tensor, tolerance: float | None = None) -> Tensor:
    """Hit (N,) bool: the map's arg-max lies within ``tolerance`` px of the box.

    Parameters
    ----------
    maps_up : (N, H, W) or (N, 1, H, W) CAMs at input resolution.
    boxes : (N, 4) x0, y0, x1, y1 in input pixel coordinates (pixel j spans [j, j + 1)); a row
        with NaN means "no box" and is never a hit (exclude those rows when averaging).
    tolerance : px; default 15 px scaled to the input size, ``15 * max(H, W) / 224``.
    """
    maps_up = _as_maps(maps_up, boxes.shape[0])
    height, width = maps_up.shape[-2:]
    boxes = _check_boxes(boxes, maps_up.shape[0]).to(maps_up.device)
    tol = (
        POINTING_TOLERANCE_PX * max(height, width) / POINTING_REFERENCE_SIZE
        if tolerance is None
        else tolerance
    )
    idx = maps_up.flatten(1).argmax(1)
    py = (idx // width).float() + 0.5  # pixel centres
    px = (idx % width).float() + 0.5
    dx = torch.clamp(torch.maximum(boxes[:, 0] - px, px - boxes[:, 2]), min=0)
    dy = torch.clamp(torch.maximum(boxes[:, 1] - py, py - boxes[:, 3]), min=0)
    return (torch.hypot(dx, dy) <= tol) & ~torch.isnan(boxes).any(1)


def energy_in_box(maps_up: Tensor, boxes: Tensor) -> Tensor:
    """Fraction (N,) of CAM mass whose pixel centre lies in the box (Score-CAM §5.3's energy).

    Negative map values are clipped to 0.  NaN box rows, and maps with no mass, give NaN.
    """
    maps_up = _as_maps(maps_up, boxes.shape[0]).float().clamp(min=0)
    height, width = maps_up.shape[-2:]
    boxes = _check_boxes(boxes, maps_up.shape[0]).to(maps_up.device)
    ys = torch.arange(height, device=maps_up.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=maps_up.device, dtype=torch.float32) + 0.5
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])  # (N, H)
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])  # (N, W)
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    total = maps_up.sum((1, 2))
    energy = (maps_up * inside).sum((1, 2)) / total
    nan = torch.full_like(energy, float("nan"))
    return torch.where(torch.isnan(boxes).any(1) | (total <= 0), nan, energy)


def _as_maps(maps: Tensor, n: int) -> Tensor:
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or maps.shape[0] != n:
        raise CamError(f"maps must have shape (N, H, W) with N={n}, got {tuple(maps.shape)}")
    return maps


def _check_boxes(boxes: Tensor, n: int) -> Tensor:
    if boxes.dim() != 2 or boxes.shape != (n, 4):
        raise CamError(f"boxes must have shape (N, 4) = ({n}, 4) as x0, y0, x1, y1; got {tuple(boxes.shape)}")
    return boxes.float()
