"""Tiny models shared by the tests/test_cam_*.py files (imported as ``test_cam_helpers``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ALL_METHODS = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam")
GRAD_METHODS = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running stats, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def simple_gap(
    classes: int = 5, channels: tuple[int, int] = (6, 8), inplace: bool = False, seed: int = 0
) -> nn.Module:
    """simple_cnn-like: ``features`` (conv-BN-ReLU-pool x2) -> ``pool`` GAP -> flatten -> dropout -> fc."""
    torch.manual_seed(seed)
    c1, c2 = channels
    model = nn.Sequential()
    model.add_module(
        "features",
        nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
        ),
    )
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("dropout", nn.Dropout(0.3))
    model.add_module("fc", nn.Linear(c2, classes))
    return _randomize_bn(model, seed)


def vgg_like(
    classes: int = 5, channels: int = 8, hidden: int = 16, size: int = 16, seed: int = 0
) -> nn.Module:
    """VGG-style: ``features`` -> flatten -> ``classifier`` (Linear-ReLU-Linear MLP); no GAP."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module(
        "features",
        nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ),
    )
    model.add_module("flatten", nn.Flatten())
    side = size // 2
    model.add_module(
        "classifier",
        nn.Sequential(
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        ),
    )
    return model


class OneConv(nn.Module):
    """1x1 conv (1 -> 2 channels, hand-set) -> optional in-place ReLU -> flatten -> hand-set ``fc``."""

    def __init__(self, side: int = 3, classes: int = 3, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * side * side, classes)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -0.5]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            j = torch.arange(2 * side * side, dtype=torch.float32)
            for c in range(classes):
                self.fc.weight[c] = ((c + 1) * (j % 5) - 2) / 10
            self.fc.bias.copy_(torch.arange(classes, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.relu(self.conv(x))))


def images(n: int = 3, size: int = 16, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    )


def test_helpers_build_working_models() -> None:
    x = images(2, 16)
    assert simple_gap()(x).shape == (2, 5)
    assert vgg_like()(x).shape == (2, 5)
    out = OneConv()(torch.arange(9.0).view(1, 1, 3, 3))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
