"""ROAD (Rong et al., ICML 2022): agreement with pytorch-grad-cam 1.5.7's implementation (noise off),
the batched solver, the percentile, and noise that depends on the image, not on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn

from cnncam.cam.road import ROAD_PERCENTILES, noisy_linear_impute, percentile, road, road_keep_masks
from cnncam.cam.viz import normalize, upsample
from cnncam.errors import CamError

SIZE = 16
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-grad-cam on NumPy 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).eval()


def test_road_matches_pytorch_grad_cam_with_noise_off() -> None:
    g = torch.Generator().manual_seed(0)
    model, x = _model(), torch.randn(3, 3, SIZE, SIZE, generator=g)
    maps, targets = torch.rand(3, 5, 5, generator=g), torch.tensor([0, 1, 2])
    ours = road(model, x, maps, targets, noise=0.0, batch_size=4)
    cams = normalize(upsample(maps, (SIZE, SIZE))).numpy()  # what pytorch-grad-cam is handed
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    for most, curve in ((True, ours.morf_curve), (False, ours.lerf_curve)):
        remover = RemoveMostRelevantFirst if most else RemoveLeastRelevantFirst
        ref = []
        for p in ROAD_PERCENTILES:
            metric = PerturbationConfidenceMetric(remover(p, NoisyLinearImputer(noise=0)))
            scores, imputed = metric(x, cams, wanted, model, return_visualization=True, return_diff=False)
            ref.append(scores)
            keep = road_keep_masks(torch.from_numpy(cams), [p], most)[:, 0]
            torch.testing.assert_close(noisy_linear_impute(x, keep), imputed, atol=1e-4, rtol=0)
        np.testing.assert_allclose(curve.numpy(), np.stack(ref, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.morf.numpy(), ours.morf_curve.mean(1).numpy())
    assert ours.morf_curve.shape == ours.lerf_curve.shape == (3, 9)


def test_percentile_is_numpys_and_masks_keep_the_right_share() -> None:
    v = torch.rand(4, 37, generator=torch.Generator().manual_seed(3))
    q = torch.tensor([10.0, 33.3, 50.0, 90.0], dtype=torch.float64)
    np.testing.assert_array_equal(percentile(v, q).numpy(), np.percentile(v.numpy(), q.numpy(), axis=1).T)
    sal = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(4))
    morf = road_keep_masks(sal, [20, 80], most_relevant=True)
    lerf = road_keep_masks(sal, [20, 80], most_relevant=False)
    assert morf.shape == (2, 2, 10, 10)
    assert morf[:, 0].float().mean() == pytest.approx(0.2, abs=0.02)  # MoRF at p keeps the lowest p %
    for i in range(2):  # MoRF removes the most salient pixels, LeRF the least salient
        assert float(sal[i][morf[i, 1]].max()) < float(sal[i][~morf[i, 1]].min())
        assert float(sal[i][lerf[i, 1]].min()) > float(sal[i][~lerf[i, 1]].max())


def test_imputation_solves_the_neighbour_average_system() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 12, 12, generator=g)
    keep = torch.rand(2, 12, 12, generator=g) > 0.7
    out = noisy_linear_impute(x, keep).double()
    assert torch.equal(out[keep[:, None].expand_as(out)], x.double()[keep[:, None].expand_as(x)].double())
    # every imputed pixel is the weighted mean of its in-image neighbours (the paper's equation)
    padded = torch.nn.functional.pad(out, (1, 1, 1, 1))
    ones = torch.nn.functional.pad(torch.ones_like(out), (1, 1, 1, 1))
    w = {(-1, 0): 1 / 6, (1, 0): 1 / 6, (0, -1): 1 / 6, (0, 1): 1 / 6}
    w.update({(a, b): 1 / 12 for a in (-1, 1) for b in (-1, 1)})
    num = sum(c * padded[..., 1 + a : 13 + a, 1 + b : 13 + b] for (a, b), c in w.items())
    den = sum(c * ones[..., 1 + a : 13 + a, 1 + b : 13 + b] for (a, b), c in w.items())
    gap = (out - num / den).abs()[~keep[:, None].expand_as(out)]
    assert float(gap.max()) < 1e-5
    with pytest.raises(CamError, match="did not converge"):
        noisy_linear_impute(x, keep, max_iter=2)


def test_noise_depends_on_the_image_key_not_on_the_batch() -> None:
    g = torch.Generator().manual_seed(6)
    model, x = _model(), torch.randn(4, 3, SIZE, SIZE, generator=g)
    maps, targets = torch.rand(4, 4, 4, generator=g), torch.tensor([0, 1, 2, 0])
    keys = torch.tensor([10, 11, 12, 13])
    full = road(model, x, maps, targets, [30, 70], noise=0.05, noise_keys=keys, batch_size=3)
    alone = road(model, x[2:3], maps[2:3], targets[2:3], [30, 70], noise=0.05, noise_keys=keys[2:3])
    torch.testing.assert_close(alone.morf_curve[0], full.morf_curve[2], atol=1e-6, rtol=1e-5)
    clean = road(model, x, maps, targets, [30, 70], noise=0.0)
    assert not torch.allclose(full.morf_curve, clean.morf_curve)
    with pytest.raises(CamError, match="strictly between 0 and 100"):
        road(model, x, maps, targets, [0, 50])
