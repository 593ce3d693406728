"""torchvision classifiers, always built with ``weights=None``.

Nothing is ever downloaded: compute nodes usually have no internet, and a job that
silently fetches 500 MB per array task is a bad neighbour.  ImageNet weights come from a
local file (``model.pretrained``), loaded by :func:`cnncam.models.load_pretrained`.

The classifier is built for ``num_classes`` directly (``num_classes=`` in the torchvision
constructor), which is the same as replacing the final Linear after construction but
keeps torchvision's own initialisation of that layer (e.g. N(0, 0.01) for VGG and
MobileNetV2) and never allocates a 1000-class head.

``model.dropout`` is a ``simple_cnn`` setting: the torchvision models keep their published
dropout (VGG 0.5, MobileNetV2/EfficientNet-B0 0.2) so results match the usual recipes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models as tvm

from cnncam.config import ModelConfig

Builder = Callable[[ModelConfig, int], nn.Module]


def _torchvision(factory: Callable[..., nn.Module]) -> Builder:
    """Wrap a torchvision constructor as a ``(ModelConfig, num_classes) -> nn.Module`` builder."""

    def build(cfg: ModelConfig, num_classes: int) -> nn.Module:
        return factory(weights=None, num_classes=num_classes)

    build.__name__ = f"build_{factory.__name__}"
    build.__doc__ = f"torchvision ``{factory.__name__}(weights=None, num_classes=num_classes)``."
    return build


build_resnet18 = _torchvision(tvm.resnet18)
build_resnet34 = _torchvision(tvm.resnet34)
build_resnet50 = _torchvision(tvm.resnet50)
build_mobilenet_v2 = _torchvision(tvm.mobilenet_v2)
build_vgg16 = _torchvision(tvm.vgg16)
build_efficientnet_b0 = _torchvision(tvm.efficientnet_b0)
