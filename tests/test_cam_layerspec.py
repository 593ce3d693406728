"""Layer specs with a reshape step, ``auto`` for models cnncam did not build, and the agreement
with pytorch-grad-cam's documented ``reshape_transform`` for ViT and Swin (random weights)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM
from test_cam_helpers import images, no_hooks_left, simple_gap
from torch import Tensor, nn

from cnncam.cam import CamEngine, compute_cams, normalize, record_activations, upsample
from cnncam.cam.layers import auto_layer, map_shape, probe_model, resolve_layers
from cnncam.cam.layerspec import LayerSpec, Reshape, token_layout
from cnncam.cam.methods import METHODS, MethodSpec, gradcam
from cnncam.config import ModelConfig
from cnncam.errors import CamError
from cnncam.models import create_model


def _timm(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()


# ----------------------------------------------------------------------------------------------
# Specs and reshape steps


def test_parse_spec_names_and_errors() -> None:
    assert LayerSpec.parse("layer4") == LayerSpec("layer4")
    assert LayerSpec.parse("blocks.11.norm1:tokens").name == "blocks.11.norm1:tokens"
    assert LayerSpec.parse("layers.3:nhwc").out_dims == 4 and LayerSpec.parse("a:tokens").out_dims == 3
    with pytest.raises(CamError, match=r"unknown reshape step 'token'; did you mean 'tokens'\?"):
        LayerSpec.parse("blocks.1.norm1:token")


@pytest.mark.parametrize(
    "tokens, hw, declared, expected",
    [
        (197, (224, 224), None, (1, (14, 14))),  # ViT-B/16: one class token
        (201, (224, 224), 5, (5, (14, 14))),  # class + 4 register tokens, declared by timm
        (49, (224, 224), None, (0, (7, 7))),  # Swin tokens: no prefix
        (1 + 2 * 4, (32, 64), None, (1, (2, 4))),  # a wide input keeps its aspect ratio
    ],
)
def test_token_layout(tokens: int, hw: tuple[int, int], declared: int | None, expected: Any) -> None:
    assert token_layout(tokens, hw, declared) == expected


def test_token_layout_refuses_a_non_grid() -> None:
    with pytest.raises(CamError, match="do not form a patch grid"):
        token_layout(7, (32, 32), 1)


def test_reshape_round_trip_keeps_prefix_tokens() -> None:
    out = torch.randn(2, 1 + 6, 5)  # class token + 2x3 patches, 5 channels
    step = Reshape("tokens", 1, (2, 3))
    act = step.to_map(out)
    assert act.shape == (2, 5, 2, 3)
    assert torch.equal(act[:, :, 1, 2], out[:, 1 + 5])  # patch (row 1, col 2) = token 1 + 1*3 + 2
    assert torch.equal(step.restore(act, out), out)
    nhwc = torch.randn(2, 3, 4, 5)
    back = Reshape("nhwc").restore(Reshape("nhwc").to_map(nhwc), nhwc)
    assert torch.equal(back, nhwc) and back.is_contiguous() and back.data_ptr() != nhwc.data_ptr()


# ----------------------------------------------------------------------------------------------
# auto for external models


@pytest.mark.parametrize(
    "name, kwargs, size, expected",
    [
        ("timm:resnet18", {}, 64, "layer4"),
        ("timm:convnext_tiny", {}, 64, "stages.3"),
        ("timm:vit_tiny_patch16_224", {"img_size": 64}, 64, "blocks.11.norm1:tokens"),
        ("timm:swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64, "layers.3:nhwc"),
        ("torchvision:convnext_tiny", {}, 64, "features"),
        ("torchvision:mobilenet_v3_small", {}, 64, "features"),
        ("torchvision:regnet_y_400mf", {}, 64, "trunk_output"),
        ("torchvision:densenet121", {}, 64, "features"),
    ],
)
def test_auto_layer_of_external_models(name: str, kwargs: dict[str, Any], size: int, expected: str) -> None:
    model = create_model(ModelConfig(name=name, kwargs=kwargs), 4).eval()
    probe = probe_model(model, images(1, size))
    assert auto_layer(probe) == expected
    shape = map_shape(probe, expected)
    assert shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def test_vit_register_tokens_are_dropped() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, reg_tokens=4)
    model = model.eval()
    probe = probe_model(model, images(1, 32))
    assert model.num_prefix_tokens == 5
    assert auto_layer(probe) == "blocks.1.norm1:tokens"
    assert map_shape(probe, "blocks.1.norm1:tokens") == (1, 16, 4, 4)
    acts = record_activations(model, images(2, 32), ["blocks.1.norm1:tokens"])
    assert acts["blocks.1.norm1:tokens"].shape == (2, 16, 4, 4)


def test_declared_layer_wins_and_is_checked() -> None:
    model = simple_gap().eval()
    model.cnncam_cam_layer = "features.4"  # type: ignore[assignment]
    assert auto_layer(probe_model(model, images(1, 16))) == "features.4"
    model.cnncam_cam_layer = "featurs"  # type: ignore[assignment]
    with pytest.raises(CamError, match="declares cnncam_cam_layer='featurs'.*did you mean 'features'"):
        auto_layer(probe_model(model, images(1, 16)))


def test_token_output_without_reshape_is_explained() -> None:
    model = _timm("vit_tiny_patch16_224", img_size=32)
    probe = probe_model(model, images(1, 32))
    with pytest.raises(CamError, match="use 'blocks.3.norm1:tokens'"):
        resolve_layers(probe, ["blocks.3.norm1"])
    assert resolve_layers(probe, ["blocks.3.norm1:tokens", "auto"]) == (
        "blocks.3.norm1:tokens",
        "blocks.11.norm1:tokens",
    )
    with pytest.raises(CamError, match=r"hook module\(s\) \['features'\] twice"):
        resolve_layers(probe_model(simple_gap().eval(), images(1, 16)), ["features", "features:nhwc"])


# ----------------------------------------------------------------------------------------------
# Agreement with pytorch-grad-cam (its documented reshape_transform)


def _pgc_vit_reshape(height: int, width: int) -> Callable[[Tensor], Tensor]:
    # pytorch-grad-cam tutorials/vision_transformers.md, with the grid of our small input.
    def reshape_transform(tensor: Tensor) -> Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


def _pgc_swin_reshape(height: int, width: int) -> Callable[[Tensor], Tensor]:
    # pytorch-grad-cam usage_examples/swinT_example.py (tokens (B, h*w, C) -> (B, C, h, w)).
    def reshape_transform(tensor: Tensor) -> Tensor:
        result = tensor.reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


def _ours(model: nn.Module, x: Tensor, layer: str) -> np.ndarray:
    batch = compute_cams(model, x, ["gradcam"], [layer], targets="pred")
    return normalize(upsample(batch.maps[("gradcam", batch_layer(batch))][:, 0], x.shape[-2:])).numpy()


def batch_layer(batch: Any) -> str:
    return next(iter(batch.maps))[1]


def _theirs(
    model: nn.Module, x: Tensor, target: nn.Module, reshape: Callable[[Tensor], Tensor]
) -> np.ndarray:
    with GradCAM(model=model, target_layers=[target], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=None)  # type: ignore[no-any-return]


def _assert_agree(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-4
    assert ours.std() > 0.05  # a real map, not two constant images agreeing


def test_vit_gradcam_matches_pytorch_grad_cam() -> None:
    model = _timm("vit_tiny_patch16_224", img_size=64)
    x = images(3, 64)
    layer = auto_layer(probe_model(model, x[:1]))
    assert layer == "blocks.11.norm1:tokens"
    theirs = _theirs(model, x, model.blocks[-1].norm1, _pgc_vit_reshape(4, 4))
    _assert_agree(_ours(model, x, layer), theirs)
    assert no_hooks_left(model)


@pytest.mark.slow  # Swin-T has 28M parameters and pytorch-grad-cam backpropagates into all of them
def test_swin_gradcam_matches_pytorch_grad_cam() -> None:
    model = _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2)
    x = images(2, 64)
    # The documented Swin target (last block's norm2, a (B, h*w, C) token sequence) ...
    theirs = _theirs(model, x, model.layers[-1].blocks[-1].norm2, _pgc_swin_reshape(2, 2))
    _assert_agree(_ours(model, x, "layers.3.blocks.1.norm2:tokens"), theirs)
    # ... and auto's channels-last stage, given to pytorch-grad-cam as the same permutation.
    layer = auto_layer(probe_model(model, x[:1]))
    assert layer == "layers.3:nhwc"
    theirs = _theirs(model, x, model.layers[-1], lambda t: t.permute(0, 3, 1, 2))
    _assert_agree(_ours(model, x, layer), theirs)


# ----------------------------------------------------------------------------------------------
# The engine reads what methods declare


def test_engine_gives_methods_what_they_declare(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def spy(name: str) -> Callable[[Any], Tensor]:
        def fn(inp: Any) -> Tensor:
            seen[name] = inp
            return gradcam(inp) if inp.gradients is not None else inp.activations[:, None, 0]

        return fn

    monkeypatch.setitem(METHODS, "head_user", MethodSpec("head_user", spy("head_user"), needs_head=True))
    monkeypatch.setitem(METHODS, "plain", MethodSpec("plain", spy("plain")))
    monkeypatch.setitem(METHODS, "masks", MethodSpec("masks", spy("masks"), needs_forward=True))
    model = simple_gap().eval()
    with CamEngine(model, methods=["head_user", "plain", "masks"]) as engine:
        engine(images(2, 16))
    assert seen["head_user"].class_weights is not None and seen["head_user"].forward is None
    assert seen["plain"].class_weights is None and seen["plain"].forward is None
    assert seen["masks"].forward is not None and seen["masks"].class_weights is None
    # a method needing the head refuses a layer without one, whatever its name
    with pytest.raises(CamError, match="method 'head_user' needs global average pooling"):
        compute_cams(model, images(1, 16), ["head_user"], ["features.0"])
