"""viz (upsample, normalize, colours, overlay) and activations (feature maps, filters)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from test_cam_helpers import images, no_hooks_left, simple_gap
from torch import Tensor, nn

from cnncam.cam import (
    colorize,
    denormalize,
    first_conv_filters,
    first_layers,
    normalize,
    overlay,
    record_activations,
    to_uint8,
    upsample,
)
from cnncam.cam.viz import colormap_lut
from cnncam.errors import CamError


def test_upsample_is_bilinear_half_pixel() -> None:
    maps = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    out = upsample(maps, 4)
    # align_corners=False: output pixel i samples source (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # (clamped to the edge), i.e. weights 0, 0.25, 0.75, 1 along each axis; value = 2 * row + col.
    axis = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 2 * axis[:, None] + axis[None, :]
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], expected)
    assert upsample(torch.rand(2, 3, 5, 5), (7, 9)).shape == (2, 3, 7, 9)


def test_normalize_per_map() -> None:
    maps = torch.stack([torch.arange(4.0).view(2, 2) * 10 + 5, torch.full((2, 2), 3.0)])[None]  # (1, 2, 2, 2)
    out = normalize(maps)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))  # a constant map has no structure: all zeros
    # convention: relu -> upsample -> minmax equals minmax -> upsample -> minmax (bilinear is convex)
    raw = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(normalize(upsample(raw, 16)), normalize(upsample(normalize(raw), 16)))


def test_to_uint8() -> None:
    out = to_uint8(torch.tensor([-0.5, 0.0, 0.2, 0.5, 1.0, 1.5]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 51, 128, 255, 255]


def test_colorize_uses_matplotlib_lut() -> None:
    maps01 = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])  # (1, 2, 2)
    rgb = colorize(maps01, "jet")
    assert rgb.shape == (1, 3, 2, 2)
    jet = matplotlib.colormaps["jet"]
    for (y, x), v in {(0, 0): 0, (0, 1): 255, (1, 0): 128, (1, 1): 64}.items():
        np.testing.assert_allclose(rgb[0, :, y, x].numpy(), jet(v)[:3], rtol=1e-6)
    np.testing.assert_allclose(rgb[0, :, 0, 0].numpy(), [0.0, 0.0, 0.5], atol=1e-6)  # jet starts dark blue
    assert colorize(maps01[:, None]).shape == (1, 3, 2, 2)
    assert colormap_lut("viridis").shape == (256, 3)
    with pytest.raises(CamError, match="unknown colormap 'jett'; did you mean 'jet'"):
        colorize(maps01, "jett")


def test_overlay_blends_heatmap_over_image() -> None:
    img = torch.rand(2, 3, 4, 4)
    maps01 = torch.rand(2, 4, 4)
    heat = colorize(maps01)
    torch.testing.assert_close(overlay(img, maps01, alpha=0.0), img)
    torch.testing.assert_close(overlay(img, maps01, alpha=1.0), heat)
    torch.testing.assert_close(overlay(img, maps01, alpha=0.4), 0.4 * heat + 0.6 * img)
    small = torch.rand(2, 1, 2, 2)  # low-res maps are upsampled to the image first
    torch.testing.assert_close(overlay(img, small), 0.5 * colorize(upsample(small, 4)) + 0.5 * img)
    with pytest.raises(CamError, match="alpha"):
        overlay(img, maps01, alpha=1.5)


def test_denormalize_inverts_normalize() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = torch.rand(2, 3, 5, 5)
    normed = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(denormalize(normed, mean, std), img)
    assert float(denormalize(torch.full((1, 3, 1, 1), 100.0), mean, std).max()) == 1.0  # clamped
    with pytest.raises(CamError, match="channels"):
        denormalize(img, (0.5,) * 2, (0.5,) * 2)


class Swapped(nn.Module):
    """Registers ``late`` before ``early`` but runs ``early`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(4, 2, 3)
        self.early = nn.Conv2d(3, 4, 5)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.late(self.relu(self.early(x))).mean((2, 3))


def test_first_conv_filters_module_and_execution_order() -> None:
    model = Swapped()
    torch.testing.assert_close(first_conv_filters(model), model.late.weight.detach())
    filters = first_conv_filters(model, images(1, 16))
    assert filters.shape == (4, 3, 5, 5)
    torch.testing.assert_close(filters, model.early.weight.detach())
    filters.zero_()  # a copy: the model's weights are untouched
    assert model.early.weight.abs().sum() > 0
    with pytest.raises(CamError, match="no nn.Conv2d"):
        first_conv_filters(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def test_record_activations_values_channels_and_cleanup() -> None:
    model = Swapped()
    model.train()
    x = images(2, 16)
    acts = record_activations(model, x, ["early", "late"], channels=3)
    with torch.no_grad():
        early = model.early(x)
    assert acts["early"].shape == (2, 3, 12, 12) and acts["late"].shape == (2, 2, 10, 10)
    # the in-place ReLU after `early` must not have changed what was recorded
    torch.testing.assert_close(acts["early"], early[:, :3])
    assert (acts["early"] < 0).any()
    assert model.training and no_hooks_left(model)
    with pytest.raises(CamError, match="unknown layer 'erly'; did you mean 'early'"):
        record_activations(model, x, ["erly"])
    with pytest.raises(CamError, match="positive"):
        record_activations(model, x, ["early"], channels=0)


def test_first_layers_for_feature_grids() -> None:
    names = first_layers(simple_gap(), images(1, 16), n=5)
    assert names == ["features.0", "features.1", "features.2", "features.3", "features.4"]
