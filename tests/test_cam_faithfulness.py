"""Deletion / insertion AUC, pointing game and box energy on crafted cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cnncam.cam import deletion_insertion, energy_in_box, pointing_game
from cnncam.cam.faithfulness import gaussian_blur
from cnncam.errors import CamError
from cnncam.localisation import box_area_baseline, centre_baseline, pointing_tolerance


class MeanProb(nn.Module):
    """Softmax probability of class 0 == mean pixel value (clamped), by construction."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean((1, 2, 3)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([m.log(), (1 - m).log()], 1)


class Evidence(nn.Module):
    """Class 0 is driven only by the top-left 8x8 quadrant."""

    def forward(self, x: Tensor) -> Tensor:
        score = 10 * x[:, :, :8, :8].mean((1, 2, 3)) - 2
        return torch.stack([score, torch.zeros_like(score)], 1)


def test_auc_values_by_construction() -> None:
    x = torch.ones(2, 3, 8, 8)
    maps = torch.rand(2, 4, 4)
    out = deletion_insertion(MeanProb(), x, maps, torch.zeros(2, dtype=torch.long), steps=8)
    fractions = torch.linspace(0, 1, 9)
    torch.testing.assert_close(out.fractions, fractions)
    # deleting a fraction f of an all-ones image (zero baseline) leaves mean 1 - f
    torch.testing.assert_close(out.deletion_curve, (1 - fractions).clamp(1e-6, 1 - 1e-6).expand(2, 9))
    torch.testing.assert_close(out.deletion, torch.full((2,), 0.5), atol=1e-5, rtol=0)
    # the blurred copy of a constant image is the image itself, so insertion stays at ~1
    torch.testing.assert_close(out.insertion, torch.full((2,), 1.0), atol=1e-5, rtol=0)


def _square_images(n: int = 2) -> Tensor:
    x = torch.zeros(n, 3, 16, 16)
    x[:, :, 1:7, 1:7] = 1.0
    return x


def test_cam_on_the_evidence_beats_cam_elsewhere() -> None:
    x = _square_images()
    good = torch.zeros(2, 4, 4)
    good[:, 0:2, 0:2] = 1.0  # on the square
    bad = torch.zeros(2, 4, 4)
    bad[:, 2:, 2:] = 1.0  # bottom-right, no evidence there
    targets = torch.zeros(2, dtype=torch.long)
    g = deletion_insertion(Evidence(), x, good, targets, steps=16)
    b = deletion_insertion(Evidence(), x, bad, targets, steps=16)
    assert (g.insertion > b.insertion + 0.1).all()
    assert (g.deletion < b.deletion - 0.1).all()
    assert g.deletion_curve.shape == (2, 17)
    # endpoints: nothing deleted = original image, everything inserted = original image
    torch.testing.assert_close(g.deletion_curve[:, 0], g.insertion_curve[:, -1])
    # with the blur baseline, deleting everything leaves the blurred image insertion starts from
    d = deletion_insertion(Evidence(), x, good, targets, steps=16, deletion_baseline="blur")
    torch.testing.assert_close(d.deletion_curve[:, -1], d.insertion_curve[:, 0])
    assert (g.deletion_curve[:, -1] < d.deletion_curve[:, -1]).all()  # zero removes more evidence


def test_chunked_forwards_equal_one_forward_and_model_state_restored() -> None:
    x = _square_images(3) + 0.1 * torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 0])
    model = Evidence()
    model.train()
    a = deletion_insertion(model, x, maps, targets, steps=5, batch_size=3)
    b = deletion_insertion(model, x, maps, targets, steps=5, batch_size=100)
    torch.testing.assert_close(a.deletion_curve, b.deletion_curve)
    torch.testing.assert_close(a.insertion, b.insertion)
    assert model.training
    with pytest.raises(CamError, match="targets has 2 entries"):
        deletion_insertion(model, x, maps, targets[:2])
    with pytest.raises(CamError, match="deletion_baseline"):
        deletion_insertion(model, x, maps, targets, deletion_baseline="mean")  # type: ignore[arg-type]


def test_gaussian_blur_preserves_constants_and_mass() -> None:
    const = torch.full((1, 3, 6, 6), 0.7)
    torch.testing.assert_close(gaussian_blur(const), const)
    spike = torch.zeros(1, 1, 31, 31)
    spike[0, 0, 15, 15] = 1.0
    blurred = gaussian_blur(spike, 11, 5.0)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert float(blurred[0, 0, 15, 15]) < 0.1 and float(blurred[0, 0, 15, 10]) > 0


def _peak(y: int, x: int, size: int = 32) -> Tensor:
    m = torch.zeros(size, size)
    m[y, x] = 1.0
    return m


def test_pointing_game_hit_miss_tolerance() -> None:
    maps = torch.stack([_peak(5, 10), _peak(20, 20), _peak(10, 10), _peak(3, 3)])
    boxes = torch.tensor(
        [
            [8.0, 3.0, 12.0, 7.0],  # contains the peak (10.5, 5.5): hit
            [0.0, 0.0, 5.0, 5.0],  # far away: miss
            [12.0, 0.0, 20.0, 20.0],  # 1.5 px left of the box: within 15 * 32 / 224 = 2.14 px
            [math.nan] * 4,  # no box
        ]
    )
    assert pointing_game(maps, boxes).tolist() == [True, False, True, False]
    assert pointing_game(maps, boxes, tolerance=1.0).tolist() == [True, False, False, False]
    assert pointing_game(maps[:, None], boxes).tolist() == [True, False, True, False]
    with pytest.raises(CamError, match=r"boxes must have shape \(N, 4\)"):
        pointing_game(maps, boxes[:, :3])


def test_energy_in_box() -> None:
    ones = torch.ones(32, 32)
    inside = torch.zeros(32, 32)
    inside[2:6, 2:6] = 3.0
    maps = torch.stack([ones, inside, ones, torch.zeros(32, 32)])
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0], [math.nan] * 4, [0.0, 0.0, 8.0, 8.0]])
    energy = energy_in_box(maps, boxes)
    torch.testing.assert_close(energy[:2], torch.tensor([0.25, 1.0]))
    assert torch.isnan(energy[2]) and torch.isnan(energy[3])  # no box; no mass


class Counting(nn.Module):
    """Wraps a model and counts the images it is asked to score."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images, self.calls = inner, 0, 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.calls += 1
        return self.inner(x)


def _naive(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor, steps: int, baseline: str) -> tuple:
    """RISE deletion/insertion written step by step, one forward per step (the definition)."""
    n, _, h, w = x.shape
    up = torch.nn.functional.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)
    order = torch.argsort(up.flatten(1), dim=1, descending=True, stable=True)
    blurred = gaussian_blur(x)
    base = torch.zeros_like(x) if baseline == "zero" else blurred
    dels, inss = [], []
    for s in range(steps + 1):
        k = round(s * h * w / steps)
        top = torch.zeros(n, h * w, dtype=torch.bool)
        top.scatter_(1, order[:, :k], True)
        top = top.view(n, 1, h, w)
        for images, curve in ((torch.where(top, base, x), dels), (torch.where(top, x, blurred), inss)):
            with torch.no_grad():
                curve.append(torch.softmax(model(images), 1).gather(1, targets[:, None])[:, 0])
    return torch.stack(dels, 1), torch.stack(inss, 1)


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_batched_curves_equal_the_definition_with_fewer_forwards(baseline: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = _square_images(5) + 0.2 * torch.rand(5, 3, 16, 16, generator=g)
    maps, targets = torch.rand(5, 4, 4, generator=g), torch.tensor([0, 1, 0, 1, 0])
    model, steps = Counting(Evidence()), 6
    want_del, want_ins = _naive(Evidence(), x, maps, targets, steps, baseline)
    out = deletion_insertion(model, x, maps, targets, steps, batch_size=10, deletion_baseline=baseline)  # type: ignore[arg-type]
    torch.testing.assert_close(out.deletion_curve, want_del)
    torch.testing.assert_close(out.insertion_curve, want_ins)
    # (2S - 1) perturbed images per image, the unperturbed images once, the zero image once
    assert model.images == 5 * (2 * steps - 1) + 5 + (1 if baseline == "zero" else 0)
    # a forward holds 2 whole steps of the 5 images: 3 for insertion's 6 steps, 3 for deletion's 5
    assert model.calls == 3 + 3 + 1 + (1 if baseline == "zero" else 0)
    small = deletion_insertion(Evidence(), x, maps, targets, steps, batch_size=2, deletion_baseline=baseline)  # type: ignore[arg-type]
    torch.testing.assert_close(small.insertion_curve, want_ins)  # a step split over several forwards
    # the export hands over the scores of its own forward: the unperturbed images are not scored again
    model.images = 0
    ref = torch.softmax(Evidence()(x), 1).gather(1, targets[:, None])[:, 0]
    again = deletion_insertion(model, x, maps, targets, steps, deletion_baseline=baseline, reference=ref)  # type: ignore[arg-type]
    torch.testing.assert_close(again.deletion, out.deletion)
    assert model.images == 5 * (2 * steps - 1) + (1 if baseline == "zero" else 0)


def test_centre_and_box_area_baselines() -> None:
    boxes = np.array([[10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0], [17.0, 0.0, 32.0, 32.0], [np.nan] * 4])
    # centre pixel (16, 16) has its centre at (16.5, 16.5)
    np.testing.assert_array_equal(centre_baseline(boxes, 32, 32, 0.0)[:3], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(centre_baseline(boxes, 32, 32, 1.0)[:3], [1.0, 0.0, 1.0])  # 0.5 px away
    assert np.isnan(centre_baseline(boxes, 32, 32, 0.0)[3])
    assert pointing_tolerance(224, 224) == 15.0 and pointing_tolerance(32, 64) == 15.0 * 64 / 224
    # a uniform map's energy in the box = the box's share of pixel centres, as energy_in_box computes it
    flat = energy_in_box(torch.ones(3, 32, 32), torch.from_numpy(boxes[:3]).float()).numpy()
    np.testing.assert_allclose(box_area_baseline(boxes, 32, 32)[:3], flat, rtol=1e-6)
    assert np.isnan(box_area_baseline(boxes, 32, 32)[3])
    # the exact pointing game is the tolerance-0 form
    peak = torch.zeros(1, 32, 32)
    peak[0, 9, 9] = 1.0
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    assert not pointing_game(peak, box, 0.0)[0] and pointing_game(peak, box, 1.5)[0]
