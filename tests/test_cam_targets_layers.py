"""Target specs -> (N, K) class ids, and target layers by name / ``auto``."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_cam_helpers import images, no_hooks_left, simple_gap, vgg_like
from torch import nn

from cnncam.cam import compute_cams, probe_model, resolve_layers, resolve_targets
from cnncam.cam.layers import auto_layer
from cnncam.errors import CamError

LOGITS = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 1.0, 2.5], [0.0, 0.2, 0.9, -4.0]])


def test_string_specs() -> None:
    assert resolve_targets("pred", LOGITS).tolist() == [[1], [0], [2]]
    assert resolve_targets("class:3", LOGITS).tolist() == [[3], [3], [3]]
    assert resolve_targets("topk:2", LOGITS).tolist() == [[1, 3], [0, 3], [2, 1]]
    assert resolve_targets("all", LOGITS).tolist() == [[0, 1, 2, 3]] * 3
    assert resolve_targets("label", LOGITS, labels=[2, 2, 0]).tolist() == [[2], [2], [0]]
    out = resolve_targets("pred", LOGITS)
    assert out.dtype == torch.long and out.shape == (3, 1)


def test_explicit_targets() -> None:
    assert resolve_targets([3, 0, 1], LOGITS).tolist() == [[3], [0], [1]]
    assert resolve_targets(torch.tensor([[0, 1], [2, 3], [1, 1]]), LOGITS).tolist() == [
        [0, 1],
        [2, 3],
        [1, 1],
    ]
    assert resolve_targets(torch.tensor([1, 2, 3], dtype=torch.int32), LOGITS).dtype == torch.long


@pytest.mark.parametrize(
    ("spec", "labels", "message"),
    [
        ([1, 2], None, "2 rows but the batch has 3 images"),
        (torch.zeros(4, 2, dtype=torch.long), None, "4 rows but the batch has 3"),
        ([0, 1, 4], None, "class 4 is out of range: the model has 4 classes"),
        ([0, -1, 2], None, "class -1 is out of range"),
        ("class:9", None, "class 9 is out of range: the model has 4 classes"),
        ("topk:5", None, "asks for 5 classes but the model has 4"),
        (torch.tensor([0.0, 1.0, 2.0]), None, "integer class ids"),
        ("best", None, r"unknown target spec 'best'. Valid choices: pred, label, all, class:<i>, topk:<k>"),
        ("label", None, "needs the true labels"),
        ("label", [0, 1], "labels has 2 rows but the batch has 3"),
        ("label", [0, 1, 7], "label class 7 is out of range"),
    ],
)
def test_bad_targets_raise(spec: object, labels: object, message: str) -> None:
    with pytest.raises(CamError, match=message):
        resolve_targets(spec, LOGITS, labels)  # type: ignore[arg-type]


def test_unknown_layer_lists_candidates_closest_first() -> None:
    model = simple_gap()
    with pytest.raises(CamError) as info:
        compute_cams(model, images(1, 16), layers=["featurs.4"])
    msg = str(info.value)
    assert "unknown layer 'featurs.4'; did you mean 'features.4'?" in msg
    choices = msg.split("Valid choices: ")[1].split(", ")
    assert choices[0] == "features.4"
    assert {"features.0", "features.3", "features", "pool"} <= set(choices)
    assert "fc" not in choices and "flatten" not in choices  # not 4-D outputs
    assert no_hooks_left(model)


def test_non_4d_and_shared_layers_are_refused() -> None:
    with pytest.raises(CamError, match=r"layer 'fc' outputs \(1, 5\), not \(N, C, h, w\)"):
        compute_cams(simple_gap(), images(1, 16), layers=["fc"])
    resnet = torchvision.models.resnet18(weights=None, num_classes=3)
    with pytest.raises(CamError, match="runs 2 times per forward"):
        compute_cams(resnet, images(1, 64), layers=["layer4.0.relu"])


def test_auto_layer_choices() -> None:
    probe = probe_model(simple_gap().eval(), images(1, 16))
    assert auto_layer(probe) == "features"
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    assert auto_layer(probe_model(resnet, images(1, 64))) == "layer4"
    # at 32 px layer4 is 1x1, so the last layer with a spatial map is layer3
    assert auto_layer(probe_model(resnet, images(1, 32))) == "layer3"
    # VGG: AdaptiveAvgPool2d((7, 7)) after `features` is not a feature layer, and a flatten + MLP
    # head takes the layer before the final max-pool (the Grad-CAM paper's VGG16 layer)
    vgg = nn.Sequential()
    vgg.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    vgg.add_module("avgpool", nn.AdaptiveAvgPool2d((7, 7)))
    vgg.add_module("flatten", nn.Flatten())
    vgg.add_module("classifier", nn.Linear(4 * 49, 3))
    assert auto_layer(probe_model(vgg, images(1, 16))) == "features.1"
    assert auto_layer(probe_model(vgg_like(), images(1, 16))) == "features.1"


def test_auto_layer_skips_the_classifier_head() -> None:
    # SqueezeNet-style head: a 1x1 conv classifier with spatial output must not be chosen.
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model.add_module(
        "classifier", nn.Sequential(nn.Conv2d(4, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    )
    assert auto_layer(probe_model(model.eval(), images(1, 8))) == "features"


def test_auto_fails_clearly_without_spatial_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 8), nn.Flatten(), nn.Linear(4, 2))  # 8x8 input -> 1x1
    with pytest.raises(CamError, match="no layer qualifies for 'auto'.*is the input too small"):
        resolve_layers(probe_model(model, images(1, 8)), ["auto"])


def test_resolve_layers_dedupes_and_keeps_order() -> None:
    probe = probe_model(simple_gap().eval(), images(1, 16))
    assert resolve_layers(probe, ["features.4", "auto", "features"]) == ("features.4", "features")
    with pytest.raises(CamError, match="at least one target layer"):
        resolve_layers(probe, [])
