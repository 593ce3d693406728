"""Feature maps and first-layer filters: the seeds' "visualise what each layer sees" grids.

The seeds (Keras blog posts) show, for one image, the activations of the first few layers as
channel grids and the first convolution's kernels.  These helpers return the tensors; the report
draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cnncam.cam.layers import autocast, check_layer, frozen_eval, layer_reshape, model_device, probe_model
from cnncam.cam.layerspec import LayerSpec
from cnncam.errors import CamError


def first_conv_filters(model: nn.Module, example: Tensor | None = None) -> Tensor:
    """Weights (O, I, kh, kw) float32 (a copy) of the first ``nn.Conv2d``.

    "First" is in execution order when ``example`` (1, C, H, W) is given, else in module order.
    """
    convs: list[nn.Conv2d]
    if example is None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    else:
        with frozen_eval(model):
            probe = probe_model(model, example[:1].to(model_device(model, example.device)))
        convs = [i.module for i in probe.layers if isinstance(i.module, nn.Conv2d)]  # type: ignore[misc]
        # Completion order == start order for leaf convs, so the first one finished ran first.
    if not convs:
        raise CamError("the model has no nn.Conv2d layer, so there are no filters to show")
    return convs[0].weight.detach().float().clone()


def first_layers(model: nn.Module, example: Tensor, n: int = 8) -> list[str]:
    """Names of the first ``n`` leaf modules with 4-D outputs (conv, BN, ReLU, pool...).

    Modules that run more than once per forward (shared ReLUs) are skipped: their output is
    ambiguous.
    """
    with frozen_eval(model):
        probe = probe_model(model, example[:1].to(model_device(model, example.device)))
    names = [
        i.name
        for i in probe.layers
        if i.shape is not None
        and len(i.shape) == 4
        and i.calls == 1
        and not any(True for _ in i.module.children())
    ]
    return names[:n]


def record_activations(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str],
    channels: int | None = None,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Outputs of the layer specs for ``images`` (N, 3, H, W): ``layer -> (N, C', h, w)`` float32.

    ``channels`` keeps the first C' channels (None = all); token / channels-last layers
    (``module:tokens``, ``module:nhwc``) are reshaped to maps first.  Eval mode and no grad during
    the forward; hooks removed and the model's state restored afterwards.  Unknown names raise
    :class:`CamError` listing the layers with 4-D outputs.
    """
    if channels is not None and channels <= 0:
        raise CamError(f"channels must be a positive number of channels or None, got {channels}")
    if not layers:
        return {}
    device = model_device(model, images.device)
    images = images.to(device)
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    with frozen_eval(model):
        specs = [LayerSpec.parse(name) for name in layers]
        probe = None
        if any(s.module not in modules or not s.module or s.reshape for s in specs):
            probe = probe_model(model, images[:1])
            for name in layers:
                check_layer(probe, name)  # raises with candidates

        def make_hook(name: str) -> Any:
            step = layer_reshape(probe, name) if probe is not None else None
            dims = LayerSpec.parse(name).out_dims

            def hook(_m: nn.Module, _args: Any, output: Any) -> None:
                if not isinstance(output, Tensor) or output.dim() != dims:
                    raise CamError(
                        f"layer {name!r} must output a {dims}-D tensor, got {getattr(output, 'shape', None)}"
                    )
                value = step.to_map(output.detach()) if step is not None else output.detach()
                # Copy: a later in-place op (ReLU(inplace=True)) must not change what we keep.
                out[name] = value[:, :channels].to(torch.float32, copy=True)

            return hook

        handles = [
            modules[LayerSpec.parse(name).module].register_forward_hook(make_hook(name))
            for name in dict.fromkeys(layers)
        ]
        try:
            with torch.no_grad(), autocast(device, precision):
                model(images)
        finally:
            for h in handles:
                h.remove()
    missing = [name for name in layers if name not in out]
    if missing:
        raise CamError(f"layer(s) {missing} did not run in the forward pass")
    return out
