"""The GAP + linear fast path: equal to autograd where valid, rejected (and falling back) elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torchvision
from test_cam_helpers import GRAD_METHODS, images, simple_gap, vgg_like
from torch import Tensor, nn

from cnncam.cam import CamEngine, compute_cams

FAST_METHODS = GRAD_METHODS + ("cam",)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def cam_warnings() -> Iterator[list[str]]:
    """Warnings logged by cnncam.cam (a handler on the logger itself: cnncam's logger may not propagate)."""
    handler = _Records()
    logger = logging.getLogger("cnncam.cam")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _assert_same_maps(fast: dict, slow: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert fast.keys() == slow.keys()
    for key in fast:
        scale = float(slow[key].abs().amax())
        torch.testing.assert_close(fast[key], slow[key], rtol=rtol, atol=atol * max(scale, 1.0), msg=str(key))


def test_fast_path_equals_autograd_on_simple_gap_model() -> None:
    model = simple_gap()
    x = images(3, 16)
    with CamEngine(model, methods=FAST_METHODS) as engine:
        first = engine(x, targets="all")
        seen: list[bool] = []
        handle = model.features.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
        second = engine(x, targets="all")
        handle.remove()
    slow = compute_cams(model, x, FAST_METHODS, targets="all", fast_path=False)
    assert first.fast_path == second.fast_path == {"features": True}
    assert slow.fast_path == {"features": False}
    assert seen == [False]  # verified: later batches build no autograd graph at all
    assert first.maps[("gradcam", "features")].shape == (3, 5, 4, 4)
    _assert_same_maps(first.maps, slow.maps)
    _assert_same_maps(second.maps, slow.maps)


def test_fast_path_equals_autograd_on_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    x = images(2, 64)
    methods = ("gradcam", "hirescam", "xgradcam", "cam")
    with CamEngine(model, methods=methods) as engine:
        fast = engine(x, targets="topk:3")
        assert engine.layers == ("layer4",)
    slow = compute_cams(model, x, methods, targets="topk:3", fast_path=False)
    assert fast.fast_path == {"layer4": True} and slow.fast_path == {"layer4": False}
    assert fast.maps[("cam", "layer4")].shape == (2, 3, 2, 2)
    _assert_same_maps(fast.maps, slow.maps)


def test_fast_path_rejected_for_vgg_flatten_mlp_head() -> None:
    model = vgg_like(channels=8, hidden=16)
    x = images(2, 16)
    with CamEngine(model, ("features",), methods=GRAD_METHODS) as engine:
        batch = engine(x, targets="all")
        assert "in_features=8" in engine.fast_reason["features"]
    assert batch.fast_path == {"features": False}
    slow = compute_cams(model, x, GRAD_METHODS, ("features",), targets="all", fast_path=False)
    _assert_same_maps(batch.maps, slow.maps, rtol=1e-6, atol=1e-7)
    # HiResCAM differs from Grad-CAM here: the gradients really vary over space
    assert not torch.allclose(batch.maps[("hirescam", "features")], batch.maps[("gradcam", "features")])


def test_fast_path_rejected_numerically_when_head_shape_matches(cam_warnings: list[str]) -> None:
    model = vgg_like(channels=8, hidden=8)  # the last Linear takes C=8 inputs but is an MLP head
    x = images(2, 16)
    with CamEngine(model, methods=GRAD_METHODS) as engine:
        batch = engine(x, targets="all")
        assert "does not reproduce the logits" in engine.fast_reason["features"]
    assert batch.fast_path == {"features": False}
    assert any("GAP fast path off for 'features'" in m for m in cam_warnings)
    _assert_same_maps(batch.maps, compute_cams(model, x, GRAD_METHODS, targets="all", fast_path=False).maps)


class Net(nn.Module):
    """conv -> ReLU -> [extra] -> GAP -> ``scale`` -> fc, to break the fast path in chosen ways."""

    def __init__(self, extra: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.extra = extra
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.extra(self.act(self.conv(x)))).flatten(1) * self.scale)


def test_fast_path_rejected_when_a_relu_sits_between_layer_and_gap() -> None:
    # Hooking the pre-ReLU conv: linear(mean(A)) != logits -> rejected by the logits check.
    model = Net(nn.Identity())
    x = images(2, 8)
    batch = compute_cams(model, x, GRAD_METHODS, layers=["conv"], targets="all")
    assert batch.fast_path == {"conv": False}
    _assert_same_maps(
        batch.maps, compute_cams(model, x, GRAD_METHODS, layers=["conv"], targets="all", fast_path=False).maps
    )
    # Hooking the ReLU output followed by a second ReLU: the logits check passes (A >= 0), but
    # the gradient is 0 where A == 0, so the first-batch autograd check must reject it.
    model = Net(nn.ReLU())
    with CamEngine(model, methods=GRAD_METHODS, layers=["act"]) as engine:
        batch = engine(x, targets="all")
        assert "differ from autograd" in engine.fast_reason["act"]
    assert batch.fast_path == {"act": False}
    _assert_same_maps(
        batch.maps, compute_cams(model, x, GRAD_METHODS, layers=["act"], targets="all", fast_path=False).maps
    )


def test_fast_path_falls_back_when_a_later_batch_fails_the_check(cam_warnings: list[str]) -> None:
    model = Net(nn.Identity())
    x = images(2, 8)
    with CamEngine(model, methods=GRAD_METHODS, layers=["act"]) as engine:
        assert engine(x, targets="topk:2").fast_path == {"act": True}
        model.scale = 2.0  # the head is no longer linear(mean(A)): the no-graph batch must be redone
        batch = engine(x, targets="topk:2")
    assert batch.fast_path == {"act": False}
    assert any("does not reproduce the logits" in m for m in cam_warnings)
    slow = compute_cams(model, x, GRAD_METHODS, layers=["act"], targets="topk:2", fast_path=False)
    _assert_same_maps(batch.maps, slow.maps)
