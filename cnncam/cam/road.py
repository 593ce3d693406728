"""ROAD: RemOve And Debias (Rong et al., ICML 2022, arXiv 2202.00449), batched on the device.

For each image and each percentile ``p`` of ``percentiles`` (default 10, 20, ..., 90):

* **MoRF** (most relevant first) keeps the pixels whose saliency is below the ``p``-th
  percentile of the map and removes the others (``1 - p/100`` of the image, the most salient);
  **LeRF** does the same with ``1 - saliency`` (it removes the least salient pixels);
* removed pixels are filled by the paper's *noisy linear imputation*: each removed pixel is the
  weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12 for the 4 diagonal
  neighbours; neighbours outside the image are left out), known neighbours at their values, which
  is one sparse linear system per image and channel, plus Gaussian noise of std ``noise``;
* the score is the softmax probability of the target class on the imputed image.

Per image the MoRF and LeRF scores are the means over the percentiles (pytorch-grad-cam's
``ROADMostRelevantFirstAverage`` / ``ROADLeastRelevantFirstAverage`` with ``return_diff=False``):
a faithful map gives a *low* MoRF and a *high* LeRF score.  Conventions follow pytorch-grad-cam
1.5.7 (``metrics/road.py``), which the tests check to 1e-4 with the noise off: the saliency is the
map upsampled to the input (bilinear, ``align_corners=False``) and min-max normalised, the
percentile is NumPy's linear one, and imputation happens in the model's (normalised) input space.

**The solver.**  pytorch-grad-cam builds a ``scipy.sparse`` matrix and calls ``spsolve`` once
per image on the CPU.  Here the system ``(D - W_uu) x_u = W_uk x_k`` (``D`` = the sum of the
in-image neighbour weights, a weighted graph Laplacian restricted to the removed pixels) is
applied matrix-free as a 3x3 depthwise convolution, and solved for every (image, percentile,
channel) at once by conjugate gradients in float64, to a relative residual of ``tol``.  The
matrix is symmetric and, since every removed region borders a kept pixel, positive definite.

**Noise.**  The noise of image ``i`` is one ``randn(C, H, W)`` field from a CPU generator seeded
with ``noise_keys[i]`` (the export passes the item's global index), added at the imputed pixels
of every percentile: the scores do not depend on the batch, the sharding or the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnncam.cam.faithfulness import metric_inputs, stacked_scores
from cnncam.cam.layers import frozen_eval
from cnncam.cam.viz import normalize, upsample
from cnncam.config import CamConfig
from cnncam.errors import CamError

ROAD_PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01  # the paper's (and pytorch-grad-cam's) noise std
# Neighbour weights of the paper's imputer (1/6 direct, 1/12 diagonal; they sum to 1).
_DIRECT, _DIAGONAL = 1 / 6, 1 / 12


@dataclass(frozen=True)
class Road:
    """Per-image ROAD scores (N,) and the curves (N, P) over ``percentiles`` (P,)."""

    morf: Tensor
    lerf: Tensor
    percentiles: Tensor
    morf_curve: Tensor
    lerf_curve: Tensor


def percentile(values: Tensor, q: Tensor) -> Tensor:
    """NumPy's linear percentile of each row: (N, P) values, (Q,) percents -> (N, Q) float64."""
    sorted_vals = torch.sort(values, dim=1).values
    n = values.shape[1]
    pos = q.to(torch.float64) / 100 * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    t = pos - lo
    a, b = sorted_vals[:, lo], sorted_vals[:, hi]
    # numpy.lib._function_base_impl._lerp with float64 percents: b - a in the values' dtype, the rest
    # in float64 (pytorch-grad-cam compares float32 maps with that float64 threshold): same pixels kept.
    diff = (b - a).double()
    return torch.where(t >= 0.5, b.double() - diff * (1 - t), a.double() + diff * t)


def road_keep_masks(saliency: Tensor, percentiles: Sequence[float], most_relevant: bool) -> Tensor:
    """(N, H, W) saliency in [0, 1] -> (N, P, H, W) bool, True where a pixel is *kept*."""
    s = saliency if most_relevant else 1 - saliency
    flat = s.flatten(1)
    q = torch.as_tensor(list(percentiles), dtype=torch.float64, device=s.device)
    thresholds = percentile(flat, q)  # (N, P)
    return (flat.double()[:, None, :] < thresholds[:, :, None]).view(*s.shape[:1], len(q), *s.shape[1:])


def noisy_linear_impute(
    images: Tensor,
    keep: Tensor,
    noise: Tensor | None = None,
    tol: float = 1e-7,
    max_iter: int | None = None,
) -> Tensor:
    """Fill the pixels where ``keep`` is False by the paper's linear imputation (+ ``noise``).

    Parameters
    ----------
    images : (B, C, H, W) values, in any space (the model's normalised input here).
    keep : (B, H, W) bool, True = known pixel.
    noise : (B, C, H, W) added at the imputed pixels (already scaled), or None.
    tol : relative residual ``|r| <= tol * |b|`` at which a system counts as solved.
    max_iter : conjugate-gradient iterations at most (default ``4 * (H + W) + 50``); a system
        still above ``tol`` then raises :class:`CamError` (never a silent half-solved image).
    """
    if keep.shape != (images.shape[0], *images.shape[2:]):
        raise CamError(f"keep must have shape (B, H, W) = {tuple(images.shape[:1] + images.shape[2:])}")
    b_, c, height, width = images.shape
    x = images.double()
    unknown = (~keep).double()[:, None].expand(b_, c, height, width)

    def neighbours(t: Tensor) -> Tensor:
        """Weighted sum of the in-image neighbours (zero padding); shifted slices, because a float64
        depthwise convolution has no fast CPU kernel."""
        padded = F.pad(t, (1, 1, 1, 1))
        direct = (
            padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
        )
        diagonal = padded[..., :-2, :-2] + padded[..., :-2, 2:] + padded[..., 2:, :-2] + padded[..., 2:, 2:]
        return direct * _DIRECT + diagonal * _DIAGONAL

    degree = neighbours(torch.ones(1, c, height, width, dtype=torch.float64, device=images.device))
    rhs = unknown * neighbours((1 - unknown) * x)

    def apply(v: Tensor) -> Tensor:
        return unknown * (degree * v - neighbours(v))

    solution = _conjugate_gradients(apply, rhs, tol, max_iter or 4 * (height + width) + 50)
    filled = (1 - unknown) * x + unknown * solution
    if noise is not None:
        filled = filled + unknown * noise.double()
    return filled.to(images.dtype)


def _conjugate_gradients(op: Callable[[Tensor], Tensor], rhs: Tensor, tol: float, max_iter: int) -> Tensor:
    """Solve ``op(x) = rhs`` for every (B, C) system of (B, C, H, W) at once (``op`` SPD)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum((2, 3), keepdim=True)
    target = (tol**2) * rr
    for it in range(max_iter):
        ap = op(p)
        pap = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rr / pap.clamp(min=1e-300), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum((2, 3), keepdim=True)
        if it % 8 == 7 and bool((rr_new <= target).all()):  # one host sync every 8 iterations
            return x
        beta = torch.where(rr > 0, rr_new / rr.clamp(min=1e-300), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
    if bool((rr <= target).all()):
        return x
    worst = float((rr / target.clamp(min=1e-300)).max().sqrt() * tol)
    raise CamError(
        f"ROAD imputation did not converge in {max_iter} iterations (relative residual {worst:.2e} > {tol:g})"
    )


def road(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
    noise: float = ROAD_NOISE,
    noise_keys: Tensor | None = None,
    batch_size: int | None = None,
    precision: str = "fp32",
) -> Road:
    """ROAD MoRF and LeRF scores of ``maps`` (N, h, w) for ``images`` (N, C, H, W) (see module doc).

    ``noise_keys`` (N,) seed each image's noise field (default: 0..N-1); ``batch_size`` = images
    per forward (default N), imputed and scored a chunk of (image, percentile) pairs at a time.
    """
    if not percentiles or any(not 0 < p < 100 for p in percentiles):
        raise CamError(f"ROAD percentiles must lie strictly between 0 and 100, got {list(percentiles)}")
    images, maps, targets = metric_inputs(model, images, maps, targets)
    device = images.device
    n, c, height, width = images.shape
    saliency = normalize(upsample(maps.float(), (height, width)))
    keys = torch.arange(n) if noise_keys is None else noise_keys.reshape(-1).cpu().long()
    fields = None
    if noise > 0:
        fields = torch.stack([_noise_field(int(k), (c, height, width)) for k in keys]).to(device) * noise
    curves = []
    p = len(percentiles)
    chunk = max(1, batch_size or n)
    with frozen_eval(model):
        for most in (True, False):
            keep = road_keep_masks(saliency, percentiles, most).reshape(n * p, height, width)
            owner = torch.arange(n, device=device).repeat_interleave(p)
            scores = []
            for start in range(0, n * p, chunk):
                sl = slice(start, start + chunk)
                noisy = None if fields is None else fields[owner[sl]]
                filled = noisy_linear_impute(images[owner[sl]], keep[sl], noisy)
                scores.append(stacked_scores(model, filled, targets[owner[sl]], precision))
            curves.append(torch.cat(scores).view(n, p))
    q = torch.as_tensor(list(percentiles), dtype=torch.float32)
    return Road(curves[0].mean(1), curves[1].mean(1), q, curves[0], curves[1])


def _noise_field(key: int, shape: tuple[int, int, int]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(key))


def road_metrics(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, cam: CamConfig, index: Tensor
) -> dict[str, Tensor]:
    """The export's per-image datasets ``road_morf`` / ``road_lerf`` for ``cam.road``; each image's
    noise is seeded by its global ``index``, so scores do not depend on batching or sharding."""
    scores = road(
        model,
        images,
        maps,
        targets,
        cam.road_percentiles,
        cam.road_noise,
        noise_keys=index,
        batch_size=cam.metric_batch_size or cam.batch_size,
        precision=cam.precision,
    )
    return {"road_morf": scores.morf, "road_lerf": scores.lerf}
