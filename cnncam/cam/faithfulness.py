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

A faithful CAM gives a *low* deletion AUC and a *high* insertion AUC.  The perturbed copies of
all images and steps are built on the device, ``batch_size`` at a time, and each forward mixes
images and steps; the curve ends that are the unperturbed image (or, with the zero baseline, the
same all-zero image for every input) are not scored again, so one image costs ``2 * steps - 1``
forwards: less than the ``2 * steps`` bound.

Pointing game (Zhang et al., ECCV 2016): the map's arg-max pixel hits when its centre lies in the
box (``tolerance=0``, the exact form) or within 15 px of it (TorchRay's form; see
:func:`cnncam.localisation.pointing_tolerance` for the scaling to the input size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnncam.cam.layers import autocast, frozen_eval, model_device
from cnncam.cam.viz import upsample
from cnncam.errors import CamError
from cnncam.localisation import pointing_tolerance


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
    reference: Tensor | None = None,
) -> DeletionInsertion:
    """Deletion and insertion AUCs (see module doc).

    Parameters
    ----------
    images : (N, C, H, W) model inputs (normalised as for the model).
    maps : (N, h, w) or (N, 1, h, w) CAMs, any resolution.
    targets : (N,) class whose probability is tracked.
    batch_size : perturbed images per forward, taken across images and steps (default N).
    reference : (N,) target-class probabilities of the unperturbed ``images`` when the caller
        has them (the export's own forward): nothing deleted and everything inserted are the
        image itself, so those two curve ends need no forward.

    Cost: ``2 * steps - 1`` forwards per image (``2 * steps + 1`` without ``reference``): the
    deletion end point is the baseline image, shared by all images for ``zero`` (one forward of
    one image) and equal to insertion's blurred start for ``blur``.
    """
    if steps < 1:
        raise CamError(f"steps must be >= 1, got {steps}")
    if deletion_baseline not in ("zero", "blur"):
        raise CamError(f"unknown deletion_baseline {deletion_baseline!r}. Valid choices: zero, blur")
    images, maps, targets = metric_inputs(model, images, maps, targets)
    device = images.device
    n, _, height, width = images.shape
    rank = _pixel_rank(upsample(maps, (height, width)).flatten(1))  # (N, HW)
    counts = torch.round(torch.linspace(0, height * width, steps + 1, device=device)).long()
    fractions = counts.float() / (height * width)
    blurred = gaussian_blur(images, blur_kernel, blur_sigma)
    chunk = max(1, batch_size or n)
    with frozen_eval(model):
        if reference is None:
            reference = stacked_scores(model, images, targets, precision, chunk)
        reference = reference.to(device).float().reshape(n)
        # insertion: steps 0..S-1 reveal the top counts[s] pixels on the blurred copy
        ins = _perturbed_scores(
            model, images, blurred, rank, counts[:steps], targets, precision, chunk, False
        )
        # deletion: steps 1..S-1 replace the top counts[s] pixels by the baseline
        base = torch.zeros_like(images) if deletion_baseline == "zero" else blurred
        dele = _perturbed_scores(model, images, base, rank, counts[1:steps], targets, precision, chunk, True)
        if deletion_baseline == "blur":
            end = ins[:, :1]
        else:  # every image deleted to zeros is the same image: one forward for all targets
            end = _probs(model, torch.zeros_like(images[:1]), precision)[0, targets][:, None]
    del_curve = torch.cat([reference[:, None], dele, end], 1)
    ins_curve = torch.cat([ins, reference[:, None]], 1)
    return DeletionInsertion(
        torch.trapezoid(del_curve, fractions, dim=1),
        torch.trapezoid(ins_curve, fractions, dim=1),
        fractions,
        del_curve,
        ins_curve,
    )


def metric_inputs(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Images (N, C, H, W) float32, maps (N, h, w) and targets (N,) long on the model's device, checked."""
    device = model_device(model, images.device)
    images = images.to(device).float()
    n = images.shape[0]
    maps = as_maps(maps, n).to(device)
    targets = targets.to(device).long().reshape(-1)
    if targets.shape[0] != n:
        raise CamError(f"targets has {targets.shape[0]} entries but the batch has {n} images")
    return images, maps, targets


def _pixel_rank(saliency: Tensor) -> Tensor:
    """(N, P) saliency -> (N, P) rank of each pixel, 0 = most salient (stable for ties)."""
    order = torch.argsort(saliency, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(saliency.shape[1], device=saliency.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def _probs(model: nn.Module, x: Tensor, precision: str) -> Tensor:
    with torch.no_grad(), autocast(x.device, precision):
        return torch.softmax(model(x).float(), 1)


def stacked_scores(
    model: nn.Module, images: Tensor, targets: Tensor, precision: str, chunk: int | None = None
) -> Tensor:
    """Softmax probability (M,) of ``targets`` (M,) for ``images`` (M, C, H, W), ``chunk`` per forward."""
    step = max(1, chunk or images.shape[0])
    parts = [
        _probs(model, images[i : i + step], precision).gather(1, targets[i : i + step, None])[:, 0]
        for i in range(0, images.shape[0], step)
    ]
    return torch.cat(parts) if parts else images.new_zeros(0)


def _perturbed_scores(
    model: nn.Module,
    images: Tensor,
    other: Tensor,
    rank: Tensor,
    counts: Tensor,
    targets: Tensor,
    precision: str,
    chunk: int,
    delete: bool,
) -> Tensor:
    """Scores (N, len(counts)) of the images with their top ``counts[s]`` pixels taken from ``other``
    (``delete``) or kept on ``other`` (insertion).  A forward holds ``chunk // N`` whole steps of
    every image (or, when ``chunk < N``, a slice of one step's images); each is built by
    broadcasting, with no gather, so memory stays at one forward's worth and few ops run."""
    n, c, height, width = images.shape
    steps = counts.numel()
    out = images.new_empty(steps, n)
    per, span = (max(1, chunk // n), n) if chunk >= n else (1, chunk)
    for s0 in range(0, steps, per):
        s1 = min(s0 + per, steps)
        for i0 in range(0, n, span):
            i1 = min(i0 + span, n)
            top = (rank[None, i0:i1] < counts[s0:s1, None, None]).view(s1 - s0, i1 - i0, 1, height, width)
            a, b = (other[i0:i1], images[i0:i1]) if delete else (images[i0:i1], other[i0:i1])
            probs = _probs(model, torch.where(top, a, b).view(-1, c, height, width), precision)
            wanted = targets[i0:i1].repeat(s1 - s0)[:, None]
            out[s0:s1, i0:i1] = probs.gather(1, wanted).view(s1 - s0, i1 - i0)
    return out.T.contiguous()


def pointing_game(maps_up: Tensor, boxes: Tensor, tolerance: float | None = None) -> Tensor:
    """Hit (N,) bool: the map's arg-max lies within ``tolerance`` px of the box.

    Parameters
    ----------
    maps_up : (N, H, W) or (N, 1, H, W) CAMs at input resolution.
    boxes : (N, 4) x0, y0, x1, y1 in input pixel coordinates (pixel j spans [j, j + 1)); a row
        with NaN means "no box" and is never a hit (exclude those rows when averaging).
    tolerance : px; default 15 px scaled to the input size, ``15 * max(H, W) / 224``; 0 = the
        exact form (the arg-max pixel's centre lies in the box).
    """
    maps_up = as_maps(maps_up, boxes.shape[0])
    height, width = maps_up.shape[-2:]
    boxes = _check_boxes(boxes, maps_up.shape[0]).to(maps_up.device)
    tol = pointing_tolerance(height, width) if tolerance is None else tolerance
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
    maps_up = as_maps(maps_up, boxes.shape[0]).float().clamp(min=0)
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


def as_maps(maps: Tensor, n: int) -> Tensor:
    """(N, h, w) or (N, 1, h, w) -> (N, h, w); anything else is a :class:`CamError`."""
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or maps.shape[0] != n:
        raise CamError(f"maps must have shape (N, H, W) with N={n}, got {tuple(maps.shape)}")
    return maps


def _check_boxes(boxes: Tensor, n: int) -> Tensor:
    if boxes.dim() != 2 or boxes.shape != (n, 4):
        raise CamError(f"boxes must have shape (N, 4) = ({n}, 4) as x0, y0, x1, y1; got {tuple(boxes.shape)}")
    return boxes.float()
