"""Target layers by layer spec, the model probe behind ``auto``, and model-state helpers.

A *probe* is one forward of a single example image with a hook on every named module; it
records each module's output shape, how often it ran and in which order it finished.  From it:

* candidate layers = modules whose output is 4-D ``(N, C, h, w)`` (listed in error messages);
* a layer spec (:mod:`cnncam.cam.layerspec`: ``module`` or ``module:tokens`` / ``module:nhwc``)
  is checked against the shapes, and its reshape step resolved (prefix tokens, patch grid);
* ``auto`` = what the model declares, else a structural finder (:mod:`cnncam.cam.finder`);
* the linear head: the last ``nn.Linear`` that runs after the layer and takes ``C`` inputs
  (used by the CAM method and the GAP fast path).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnncam.cam.layerspec import LayerSpec, Reshape, token_layout
from cnncam.config import Precision
from cnncam.errors import CamError, choice_message

AUTO = "auto"
# Top-level children that hold the classifier in torchvision / timm models.
HEAD_NAMES = frozenset({"fc", "classifier", "head", "heads", "last_linear", "logits"})
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LayerInfo:
    """What the probe saw of one module."""

    name: str
    module: nn.Module
    shape: tuple[int, ...] | None  # output shape of the last call; None if not a tensor
    calls: int
    order: int  # index in completion order of the module's last call


@dataclass(frozen=True)
class ModelProbe:
    """Result of :func:`probe_model`; ``layers`` are in completion order."""

    layers: tuple[LayerInfo, ...]
    num_classes: int
    root: nn.Module | None = None  # the probed model (what it declares: cnncam_cam_layer, timm metadata)
    input_hw: tuple[int, int] = (0, 0)

    def get(self, name: str) -> LayerInfo | None:
        return next((info for info in self.layers if info.name == name), None)

    @property
    def candidates(self) -> list[str]:
        """Names of modules with a 4-D output, in execution order."""
        return [i.name for i in self.layers if i.shape is not None and len(i.shape) == 4]


def probe_model(model: nn.Module, example: Tensor) -> ModelProbe:
    """Run ``example`` (1, 3, H, W) once with a hook on every named module (no grad)."""
    seen: dict[str, dict[str, Any]] = {}
    counter = iter(range(1 << 62))

    def make_hook(name: str, module: nn.Module) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            rec = seen.setdefault(name, {"module": module, "calls": 0})
            rec["calls"] += 1
            rec["order"] = next(counter)
            rec["shape"] = tuple(out.shape) if isinstance(out, Tensor) else None

        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CamError(f"the model must return logits of shape (N, classes); it returned {shape}")
    infos = [LayerInfo(n, r["module"], r["shape"], r["calls"], r["order"]) for n, r in seen.items()]
    infos.sort(key=lambda i: i.order)
    hw = (int(example.shape[-2]), int(example.shape[-1]))
    return ModelProbe(tuple(infos), int(out.shape[1]), root=model, input_hw=hw)


def auto_layer(probe: ModelProbe) -> str:
    """The default CAM layer spec: the model's declared one, else found (:mod:`cnncam.cam.finder`)."""
    from cnncam.cam.finder import find_auto_layer  # the finder uses check_layer from here

    return find_auto_layer(probe)


def resolve_layers(probe: ModelProbe, names: Sequence[str]) -> tuple[str, ...]:
    """Resolve ``auto`` and check each layer spec; duplicates are dropped, order is kept."""
    if not names:
        raise CamError("at least one target layer is needed (or 'auto')")
    out: list[str] = []
    for name in names:
        resolved = auto_layer(probe) if name == AUTO else check_layer(probe, name)
        if resolved not in out:
            out.append(resolved)
    modules = [LayerSpec.parse(n).module for n in out]
    twice = sorted({m for m in modules if modules.count(m) > 1})
    if twice:
        raise CamError(f"layers {list(out)} hook module(s) {twice} twice; give each module once")
    return tuple(out)


def check_layer(probe: ModelProbe, name: str) -> str:
    """``name`` if it is a layer spec whose module runs once with the output its reshape expects."""
    spec = LayerSpec.parse(name)
    info = probe.get(spec.module)
    if info is None:
        raise unknown_layer_error(probe, spec.module)
    if info.shape is None or len(info.shape) != spec.out_dims:
        hint = ""
        if info.shape is not None and len(info.shape) == 3 and spec.reshape is None:
            hint = f" It outputs tokens: use {spec.module + ':tokens'!r} to show them as a patch grid."
        raise CamError(
            f"layer {name!r} outputs {info.shape or 'a non-tensor'}, not "
            + ("(N, tokens, C)" if spec.reshape == "tokens" else "(N, C, h, w)")
            + f"; layers with 4-D outputs: {', '.join(_ranked(spec.module, probe.candidates))}.{hint}"
        )
    if info.calls != 1:
        raise CamError(
            f"layer {name!r} runs {info.calls} times per forward (a shared module such as a "
            "reused ReLU), so its output is ambiguous; pick its parent block instead"
        )
    layer_reshape(probe, name)  # a token count that forms no grid is an error here, not mid-export
    return spec.name


def layer_reshape(probe: ModelProbe, name: str) -> Reshape:
    """The resolved reshape step of layer spec ``name`` (prefix tokens and grid for ``tokens``)."""
    spec = LayerSpec.parse(name)
    if spec.reshape != "tokens":
        return Reshape(spec.reshape)
    info = probe.get(spec.module)
    if info is None or info.shape is None:
        raise unknown_layer_error(probe, spec.module)
    declared = getattr(probe.root, "num_prefix_tokens", None)  # timm ViT/DeiT: class + register tokens
    prefix, grid = token_layout(
        info.shape[1], probe.input_hw, declared if isinstance(declared, int) else None
    )
    return Reshape("tokens", prefix, grid)


def map_shape(probe: ModelProbe, name: str) -> tuple[int, ...] | None:
    """(N, C, h, w) of layer spec ``name``'s map in the probe, None when it has no tensor output."""
    info = probe.get(LayerSpec.parse(name).module)
    if info is None or info.shape is None:
        return None
    return layer_reshape(probe, name).map_shape(info.shape)


def unknown_layer_error(probe: ModelProbe, name: str) -> CamError:
    """The error for an unknown (or never executed) layer, candidates closest first."""
    return CamError(choice_message("layer", name, _ranked(name, probe.candidates)))


def _ranked(name: str, candidates: list[str]) -> list[str]:
    best = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return best + [c for c in candidates if c not in best]


def find_head_linear(probe: ModelProbe, layer: str) -> tuple[str, nn.Linear] | str:
    """The last ``nn.Linear`` after ``layer`` with ``in_features == C`` and one output per class.

    Returns ``(name, module)`` or a string saying why there is none.
    """
    info = probe.get(layer)
    if LayerSpec.parse(layer).reshape is not None:
        return f"layer {layer!r} is reshaped from tokens or channels-last, not fed to global average pooling"
    if info is None or info.shape is None:
        return f"layer {layer!r} was not seen by the probe"
    channels = info.shape[1]
    for other in reversed(probe.layers):
        if other.order <= info.order:
            break
        mod = other.module
        if (
            isinstance(mod, nn.Linear)
            and mod.in_features == channels
            and mod.out_features == probe.num_classes
        ):
            return other.name, mod
    return f"no nn.Linear with in_features={channels} and {probe.num_classes} outputs runs after {layer!r}"


def head_reproduces_logits(act: Tensor, head: nn.Linear, logits: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``head(act.mean((2, 3)))`` equals ``logits`` (N, classes), i.e. A -> GAP -> head.

    Checked on every batch (cheap) before the GAP fast path or CAM use the head's weights;
    the tolerance is relative to the largest logit and looser under bf16/fp16 autocast.
    """
    bias = None if head.bias is None else head.bias.detach().float()
    pooled = F.linear(act.detach().float().mean((2, 3)), head.weight.detach().float(), bias)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return bool(((pooled - logits.detach()).abs() <= tol * (logits.detach().abs().amax() + 1e-6)).all())


def analytic_gradients(head: nn.Linear, targets: Tensor, act: Tensor) -> Tensor:
    """GAP + linear: d logit_c / dA = W[c] / (h*w) at every position -> (N, K, C, 1, 1) float32.

    ``targets`` (N, K), ``act`` (N, C, h, w).  The 1x1 spatial layout stands for a constant map
    (see :mod:`cnncam.cam.methods`).
    """
    weight = head.weight.detach().float()
    return (weight[targets] / (act.shape[2] * act.shape[3]))[..., None, None]


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter; both restored on exit.

    Each module's own ``training`` flag is restored (not ``model.train(mode)``), so mixed
    states such as frozen BatchNorm inside a training model survive.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def check_precision(precision: str) -> torch.dtype:
    """Autocast dtype of a precision name ('fp32' -> float32 = no autocast)."""
    if precision not in _DTYPES:
        raise CamError(choice_message("precision", precision, get_args(Precision)))
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for bf16/fp16 (bf16 works on CPU too); a no-op for fp32."""
    dtype = check_precision(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: nn.Module, fallback: torch.device | None = None) -> torch.device:
    """Device of the model's first parameter (or buffer), else ``fallback`` / CPU."""
    for tensors in (model.parameters(), model.buffers()):
        first = next(iter(tensors), None)
        if first is not None:
            return first.device
    return fallback or torch.device("cpu")
