"""simple_cnn fits its input: receptive field, the gap and flatten heads, and right CAMs for both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnncam.cam import compute_cams
from cnncam.config import ModelConfig
from cnncam.models import create_model
from cnncam.models.simple import GridPool, SimpleCNN, receptive_field

GRAD_METHODS = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam")


def _eval(model: nn.Module) -> nn.Module:
    """Eval mode with non-trivial BatchNorm statistics (eval BN is then not the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_receptive_field_of_conv_pool_blocks() -> None:
    # Written out: each 3x3 conv adds 2 x stride, each 2x2 pool adds 1 x stride and doubles it.
    assert receptive_field(1, 1) == 1 + 2 + 1 == 4
    assert receptive_field(3, 1) == 22  # the old default: far below a 64-150 px input
    assert receptive_field(3, 2) == 36
    assert receptive_field(4, 2) == 76
    assert receptive_field(5, 2) == 156
    assert receptive_field(4, 2, last_pool=False) == 76 - 8  # the last pool's own stride is gone


def test_receptive_field_matches_the_network() -> None:
    # One output position of the last block depends on exactly receptive_field() input pixels per side
    # (average pools and linear convs: every weight non-zero, so the gradient support is the field).
    for blocks, convs, last_pool in [(2, 1, True), (2, 2, True), (3, 2, True), (3, 2, False)]:
        model = SimpleCNN(
            2, channels=(2,) * blocks, convs_per_block=convs, in_channels=1, last_pool=last_pool
        )
        for m in model.modules():
            if isinstance(m, nn.MaxPool2d):
                m.forward = lambda x: nn.functional.avg_pool2d(x, 2)  # type: ignore[method-assign]
            if isinstance(m, nn.ReLU):
                m.forward = lambda x: x  # type: ignore[method-assign]
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.weight, 1.0)
        size = 2 * receptive_field(blocks, convs, last_pool) + 16
        x = torch.zeros(1, 1, size, size, requires_grad=True)
        out = model.eval().features(x)
        c = out.shape[-1] // 2
        (grad,) = torch.autograd.grad(out[0, 0, c, c], x)
        cols = torch.nonzero(grad[0, 0].abs().sum(0))
        assert int(cols.max() - cols.min() + 1) == receptive_field(blocks, convs, last_pool)


def test_flatten_head_keeps_the_layout_at_any_size() -> None:
    cfg = ModelConfig(name="simple_cnn", channels=(4, 8, 8, 8), convs_per_block=2, head="flatten", hidden=16)
    model = _eval(create_model(cfg, 3))
    assert isinstance(model, SimpleCNN) and isinstance(model.pool, GridPool) and model.pool.grid == 4
    assert isinstance(model.hidden, nn.Sequential) and model.hidden.linear.in_features == 8 * 4 * 4
    for size in (32, 64, 100):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
    # At 64 px the last map is 4x4: the grid pool is the identity (the seeds' exact Flatten -> Dense).
    x = torch.randn(1, 3, 64, 64)
    feats = model.features(x)
    assert feats.shape[-2:] == (4, 4) and torch.equal(model.pool(feats), feats)
    # The classifier sees where things are: swapping two feature cells changes the logits...
    swapped = feats.clone()
    swapped[..., 0, 0], swapped[..., 3, 3] = feats[..., 3, 3], feats[..., 0, 0]

    def head(f: torch.Tensor) -> torch.Tensor:
        return model.fc(model.dropout(model.hidden(model.flatten(model.pool(f)))))

    assert not torch.allclose(head(feats), head(swapped))
    # ...where the GAP head cannot tell.
    gap = _eval(create_model(ModelConfig(name="simple_cnn", channels=(4, 8), head="gap"), 3))
    f = gap.features(torch.randn(1, 3, 32, 32))
    g = f.flip(-1)
    assert torch.allclose(gap.fc(gap.flatten(gap.pool(f))), gap.fc(gap.flatten(gap.pool(g))), atol=1e-6)


def _autograd_gradcam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the predicted class at ``features``, by hand: relu(sum_c mean(dy/dA_c) * A_c)."""
    acts = model.features(x).detach().requires_grad_(True)
    logits = model.fc(model.dropout(model.hidden(model.flatten(model.pool(acts)))))
    pred = logits.argmax(1)
    (grads,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), acts)
    return torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1))


@pytest.mark.parametrize("hidden", [0, 8])  # hidden 8 == C: a Linear with C inputs that is not on a GAP
def test_flatten_head_takes_no_fast_path_and_its_maps_are_right(hidden: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="simple_cnn", channels=(4, 8), head="flatten", flatten_grid=4, hidden=hidden)
    model = _eval(create_model(cfg, 3))
    x = torch.randn(4, 3, 16, 16)
    batch = compute_cams(model, x, GRAD_METHODS, layers=["auto"], targets="pred")
    assert batch.fast_path == {"features": False}
    torch.testing.assert_close(batch.maps[("gradcam", "features")][:, 0], _autograd_gradcam(model, x))
    slow = compute_cams(model, x, GRAD_METHODS, layers=["auto"], targets="pred", fast_path=False)
    for key, value in slow.maps.items():
        torch.testing.assert_close(batch.maps[key], value)


def test_gap_head_keeps_the_fast_path() -> None:
    torch.manual_seed(0)
    model = _eval(create_model(ModelConfig(name="simple_cnn", channels=(4, 8), convs_per_block=2), 3))
    x = torch.randn(4, 3, 16, 16)
    batch = compute_cams(model, x, GRAD_METHODS, layers=["auto"], targets="pred")
    assert batch.fast_path == {"features": True}
    torch.testing.assert_close(batch.maps[("gradcam", "features")][:, 0], _autograd_gradcam(model, x))


def test_last_pool_off_keeps_the_last_blocks_resolution() -> None:
    cfg = ModelConfig(name="simple_cnn", channels=(4, 8, 8, 8), convs_per_block=2, last_pool=False)
    model = _eval(create_model(cfg, 3))
    assert "pool" not in dict(model.features.block4.named_children())
    assert [m for m in model.features.block3.children()][-1].__class__ is nn.MaxPool2d
    x = torch.randn(2, 3, 64, 64)
    assert model.features(x).shape == (2, 8, 8, 8)  # 4 blocks, 3 pools: 8x8 maps at 64 px
    batch = compute_cams(model, x, ["gradcam"], layers=["auto"], targets="pred")
    assert batch.fast_path == {"features": True} and batch.maps[("gradcam", "features")].shape == (2, 1, 8, 8)
