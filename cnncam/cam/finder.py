"""What ``auto`` means for a model: its declared layer, else a structural finder.

Declared first: a registered model carries its registry entry's ``cam_layer`` and a ``python:``
factory may set ``cnncam_cam_layer`` (a layer spec) on the module it returns.  Otherwise the
rules below run in order on the probe (shapes, module types, execution order) and on metadata
the model library itself declares; none looks at the model's name:

1. **token transformers** (timm ViT/DeiT, torchvision ViT): the last block of a stack whose
   output is a token sequence (N, T, C) and which holds a ``LayerNorm``; its *first* norm, with
   the ``tokens`` reshape.  The last block's output itself would not do: the class token that
   the head reads no longer depends on the patch tokens there, so their gradient is zero
   (pytorch-grad-cam's "which target layer for ViT").
2. **declared stages** (timm ``feature_info``): the last stage (``layer4``, ``stages.3``,
   ``layers.3``), with the ``nhwc`` reshape when the model declares ``output_fmt == "NHWC"``
   (timm Swin).
3. **last spatial layer**: the last module to finish with a 4-D output larger than 1x1 that
   runs once and is neither a pass-through (``nn.Identity``), an adaptive pooling layer nor
   inside the classifier head.  Containers finish after their children, so this is ``layer4``
   for a ResNet and ``features`` for MobileNet, EfficientNet, ConvNeXt, DenseNet; RegNet's
   ``trunk_output``.  When that module ends with a max-pool and does not feed a global-average-
   pooling + linear head (VGG's ``features`` feed flatten + MLP), the layer just before the pool
   is taken instead, as the Grad-CAM paper does for VGG16 (14x14, not 7x7); with a GAP head the
   pooled map is kept, where Grad-CAM equals the exact CAM.
   A 4-D output whose last dimension is the classifier's width is channels-last (``nhwc``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cnncam.cam.layers import (
    _ADAPTIVE_POOLS,
    HEAD_NAMES,
    LayerInfo,
    ModelProbe,
    check_layer,
    find_head_linear,
)
from cnncam.errors import CamError, CnncamError
from cnncam.models.external import CAM_LAYER_ATTR


def find_auto_layer(probe: ModelProbe) -> str:
    """The layer spec ``auto`` resolves to for the probed model (see the module doc)."""
    declared = getattr(probe.root, CAM_LAYER_ATTR, None)
    if isinstance(declared, str):
        try:
            return check_layer(probe, declared)
        except CnncamError as e:
            raise CamError(
                f"the model declares {CAM_LAYER_ATTR}={declared!r}, which does not fit: {e}"
            ) from None
    for rule in RULES:
        found = rule(probe)
        if found is not None:
            return found
    raise CamError(
        "no layer qualifies for 'auto': none has a 4-D output larger than 1x1 outside the head "
        "(is the input too small?). Layers with 4-D outputs: " + (", ".join(probe.candidates) or "none")
    )


def _checked(probe: ModelProbe, spec: str) -> str | None:
    try:
        return check_layer(probe, spec)
    except CnncamError:
        return None


def _children(probe: ModelProbe, parent: str) -> list[LayerInfo]:
    """The probe's records of ``parent``'s direct children, in completion order."""
    prefix = parent + "." if parent else ""
    return [i for i in probe.layers if i.name.startswith(prefix) and "." not in i.name[len(prefix) :]]


def token_transformer(probe: ModelProbe) -> str | None:
    """Rule 1: the first LayerNorm of the last token block of a block stack, ``:tokens``."""
    modules = dict(probe.root.named_modules()) if probe.root is not None else {}
    blocks = [
        info
        for info in probe.layers
        if info.shape is not None
        and len(info.shape) == 3
        and info.calls == 1
        and isinstance(modules.get(info.name.rpartition(".")[0]), (nn.ModuleList, nn.Sequential))
        and any(isinstance(c, nn.LayerNorm) for c in info.module.children())
    ]
    for block in reversed(blocks):
        norms = [c for c in _children(probe, block.name) if isinstance(c.module, nn.LayerNorm)]
        if norms:
            found = _checked(probe, f"{norms[0].name}:tokens")
            if found is not None:
                return found
    return None


def declared_stages(probe: ModelProbe) -> str | None:
    """Rule 2: the last entry of timm's ``feature_info`` when its output is a spatial map."""
    info_list = getattr(probe.root, "feature_info", None)
    try:
        last = info_list[-1]["module"] if info_list else None  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None
    if not isinstance(last, str):
        return None
    info = probe.get(last)
    if info is None or info.shape is None or len(info.shape) != 4:
        return None
    nhwc = str(getattr(probe.root, "output_fmt", "")).upper().endswith("NHWC")
    h, w = (info.shape[1], info.shape[2]) if nhwc else (info.shape[2], info.shape[3])
    if h * w <= 1:
        return None
    return _checked(probe, f"{last}:nhwc" if nhwc else last)


def last_spatial(probe: ModelProbe) -> str | None:
    """Rule 3: the last spatial layer outside the head (before a final max-pool; nhwc by width)."""
    width = _classifier_width(probe)
    for info in reversed(probe.layers):
        if info.shape is None or len(info.shape) != 4 or info.calls != 1:
            continue
        if isinstance(info.module, (nn.Identity, *_ADAPTIVE_POOLS)) or info.name.split(".")[0] in HEAD_NAMES:
            continue
        nhwc = width is not None and info.shape[3] == width and info.shape[1] != width
        if (info.shape[1] * info.shape[2] if nhwc else info.shape[2] * info.shape[3]) <= 1:
            continue
        if nhwc:
            return _checked(probe, f"{info.name}:nhwc")
        return _before_final_pool(probe, info)
    return None


def _before_final_pool(probe: ModelProbe, info: LayerInfo) -> str:
    """``info``'s name, or - while it is a container ending in a max-pool that feeds no GAP + linear
    head - the child before the pool."""
    if not isinstance(find_head_linear(probe, info.name), str):
        return info.name
    while True:
        children = [c for c in _children(probe, info.name) if c.shape is not None and len(c.shape) == 4]
        if len(children) < 2 or not isinstance(children[-1].module, nn.MaxPool2d) or children[-2].calls != 1:
            return info.name
        info = children[-2]


def _classifier_width(probe: ModelProbe) -> int | None:
    """in_features of the last ``nn.Linear`` that runs (the classifier), if any."""
    linears = [i.module for i in probe.layers if isinstance(i.module, nn.Linear)]
    return linears[-1].in_features if linears else None  # type: ignore[return-value]


RULES: tuple[Callable[[ModelProbe], str | None], ...] = (token_transformer, declared_stages, last_spatial)
