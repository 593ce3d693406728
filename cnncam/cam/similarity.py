"""Batched similarity of two sets of maps: Spearman rank correlation and SSIM, in torch.

Used by the sanity checks (:mod:`cnncam.cam.sanity`, Adebayo et al., NeurIPS 2018, arXiv
1810.03292), which compare a model's maps with those of a randomised model image by image.

* :func:`spearman` - Pearson correlation of the ranks of the pixels, ties given their average
  rank (the textbook definition, ``scipy.stats.spearmanr``).  NaN when one map is constant
  (its ranks have no variance, the correlation is undefined).
* :func:`ssim` - structural similarity (Wang et al., IEEE TIP 2004) with the paper's 11x11
  Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 and data range 1, averaged over the
  "valid" positions where the window fits (the reference MATLAB ``ssim_index``).  Maps are
  expected in [0, 1]; windows larger than the map shrink to the map's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cnncam.errors import CamError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def average_ranks(values: Tensor) -> Tensor:
    """(N, P) -> (N, P) float64 ranks 0..P-1 per row; tied values share their mean rank."""
    n, p = values.shape
    sorted_vals, order = torch.sort(values, dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # (N, P) group id of each sorted position
    flat = group + torch.arange(n, device=values.device)[:, None] * p  # groups of all rows, disjoint
    positions = torch.arange(p, device=values.device, dtype=torch.float64).expand(n, p)
    total = torch.zeros(n * p, dtype=torch.float64, device=values.device)
    count = torch.zeros(n * p, dtype=torch.float64, device=values.device)
    total.scatter_add_(0, flat.reshape(-1), positions.reshape(-1))
    count.scatter_add_(0, flat.reshape(-1), torch.ones(n * p, dtype=torch.float64, device=values.device))
    mean_rank = (total / count.clamp(min=1))[flat]  # (N, P) in sorted order
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of ``a`` and ``b`` (N, ...) -> (N,) float32, NaN if undefined."""
    if a.shape != b.shape or a.dim() < 2:
        raise CamError(
            f"spearman needs two tensors of one shape (N, ...), got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denom = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    corr = (ra * rb).sum(1) / denom
    return torch.where(denom > 0, corr, torch.full_like(corr, float("nan"))).float()


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per map of ``a`` and ``b`` (N, H, W) -> (N,) float32 (see the module doc)."""
    if a.shape != b.shape or a.dim() != 3:
        raise CamError(f"ssim needs two tensors of shape (N, H, W), got {tuple(a.shape)}, {tuple(b.shape)}")
    height, width = a.shape[-2:]
    size = min(SSIM_WINDOW, height, width)
    g = _gaussian_window(size, SSIM_SIGMA, a.device)
    x = torch.stack([a, b]).double().reshape(2 * a.shape[0], 1, height, width)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian, "valid" positions only
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    xa, xb = x[: a.shape[0]], x[a.shape[0] :]
    mu_a, mu_b = blur(xa), blur(xb)
    var_a = blur(xa * xa) - mu_a**2
    var_b = blur(xb * xb) - mu_b**2
    cov = blur(xa * xb) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean((1, 2, 3)).float()
