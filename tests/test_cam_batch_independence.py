"""Invariant: an image's map is the same computed alone or inside a batch of 64 (fp32, relative 1e-6),
for every method and every target spec.

Stock CPU kernels (oneDNN convolution, BLAS) pick different algorithms for different batch sizes,
so the *activations* of one image already differ between N=1 and N=64 in the last bits (measured
3.5e-7 relative), which the signed weighted sums of the methods amplify (up to 2e-6; 1.2e-5 for
Eigen-CAM's SVD).  That is the backend, not the CAM code: the export pads every batch to one size
for exactly that reason.  To test the CAM code itself, the models here run their convolution and
linear layers image by image, so the activations are bit-identical alone or in a batch and any
difference comes from the engine, the targets or a method (batch-wide normalisation, BatchNorm in
train mode, a reduction over the wrong axis).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from cnncam.cam import METHODS, compute_cams
from cnncam.models.simple import SimpleCNN

BATCH = 64
ALONE = range(0, BATCH, 8)  # 8 of the 64 images, computed alone
TARGETS = ("pred", "label", "class:1", "topk:2", "all", "explicit")


class PerImageConv(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        base = nn.Conv2d
        return torch.cat([base.forward(self, x[i : i + 1]) for i in range(x.shape[0])])


class PerImageLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        base = nn.Linear
        return torch.cat([base.forward(self, x[i : i + 1]) for i in range(x.shape[0])])


def per_image(model: nn.Module) -> nn.Module:
    """Swap every Conv2d / Linear for a copy that runs image by image (same weights, same names)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                new: nn.Module = PerImageConv(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    bias=child.bias is not None,
                )  # fmt: skip
            elif type(child) is nn.Linear:
                new = PerImageLinear(child.in_features, child.out_features, bias=child.bias is not None)
            else:
                continue
            new.load_state_dict(child.state_dict())
            setattr(parent, name, new)
    return model


def _with_stats(model: nn.Module) -> nn.Module:
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def gap_model() -> nn.Module:
    """simple_cnn: GAP + linear head (the engine's fast path, and CAM)."""
    torch.manual_seed(0)
    return _with_stats(per_image(SimpleCNN(3, channels=(4, 4), dropout=0.0)))


def flatten_model() -> nn.Module:
    """conv -> flatten -> linear (VGG-style): gradients through autograd, space-varying."""
    torch.manual_seed(1)
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
    )  # fmt: skip
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return _with_stats(per_image(nn.Sequential(OrderedDict(features=features, head=head))))


@pytest.mark.parametrize("make", [gap_model, flatten_model], ids=["gap_head", "flatten_head"])
def test_a_map_is_the_same_alone_or_in_a_batch_of_64(make: object) -> None:
    assert callable(make)
    model = make().train()  # as handed over straight from training: the engine must use eval mode
    methods = [m for m in METHODS if m != "cam" or make is gap_model]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 12, 12, generator=g)
    labels = torch.randint(0, 3, (BATCH,), generator=g)
    explicit = torch.randint(0, 3, (BATCH, 2), generator=g)
    for spec in TARGETS:
        target = explicit if spec == "explicit" else spec
        full = compute_cams(model, x, methods, ["features"], target, labels)
        for i in ALONE:
            one_target = explicit[i : i + 1] if spec == "explicit" else spec
            one = compute_cams(model, x[i : i + 1], methods, ["features"], one_target, labels[i : i + 1])
            assert torch.equal(one.targets[0], full.targets[i])
            for key, maps in one.maps.items():
                alone, batched = maps[0], full.maps[key][i]
                scale = float(batched.abs().max())
                err = float((alone - batched).abs().max())
                assert err <= 1e-6 * scale, f"{key} targets={spec} image {i}: {err:.3g} vs scale {scale:.3g}"
