"""The model registry: ``create_model(cfg.model, num_classes)`` and what the CAM engine needs to know.

Each entry of :data:`MODELS` is a :class:`ModelSpec` keyed by the name used in configs, on the
command line, in HDF5 attributes and in reports (``model.name``; the keys equal
``typing.get_args(cnncam.config.ModelName)``).  A spec knows how to build the network, which
layer Grad-CAM should hook by default (``cam_layer``: the last layer with a spatial output) and
which layer is the classifier (``head``: the only trainable part when ``model.freeze_backbone``).

Weights are never downloaded: ``model.pretrained`` is a local state-dict file.  A checkpoint
saved by a run is restored by the trainer/CAM code, not here; build that model with
``dataclasses.replace(cfg, pretrained=None)`` so the ImageNet file need not exist on the node.
"""

from __future__ import annotations

import logging
import typing
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cnncam.config import ModelConfig, ModelName
from cnncam.errors import ModelError, choice_message, closest
from cnncam.models import zoo
from cnncam.models.simple import SimpleCNN, build_simple_cnn

__all__ = [
    "MODELS",
    "ModelSpec",
    "SimpleCNN",
    "count_parameters",
    "create_model",
    "freeze_backbone",
    "get_module",
    "load_pretrained",
    "model_spec",
    "set_train_mode",
    "trainable_parameters",
    "unwrap_model",
]

log = logging.getLogger(__name__)

# Prefixes added by DistributedDataParallel/DataParallel and torch.compile to saved keys
# (nanoGPT's `unwanted_prefix = '_orig_mod.'` fix, generalised).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_MAX_LISTED = 5


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and where its CAM layer and classifier live.

    Attributes
    ----------
    build:
        ``(ModelConfig, num_classes) -> nn.Module`` mapping (B, 3, H, W) images to (B, num_classes) logits.
    cam_layer:
        Dotted module name of the default CAM target: the last layer whose output is (B, C, h, w).
    head:
        Dotted module name of the final ``nn.Linear`` classifier (replaced for ``num_classes``,
        skipped when loading a 1000-class ImageNet file, the only trainable part when frozen).
    """

    build: Callable[[ModelConfig, int], nn.Module]
    cam_layer: str
    head: str


MODELS: dict[str, ModelSpec] = {
    "simple_cnn": ModelSpec(build_simple_cnn, cam_layer="features", head="fc"),
    "resnet18": ModelSpec(zoo.build_resnet18, cam_layer="layer4", head="fc"),
    "resnet34": ModelSpec(zoo.build_resnet34, cam_layer="layer4", head="fc"),
    "resnet50": ModelSpec(zoo.build_resnet50, cam_layer="layer4", head="fc"),
    # features ends with ConvBNReLU6 / Conv2dNormActivation(SiLU): activated, spatial, then GAP.
    "mobilenet_v2": ModelSpec(zoo.build_mobilenet_v2, cam_layer="features", head="classifier.1"),
    # The last ReLU (features.29), not features.30: that max-pool halves an already coarse map
    # (14x14 -> 7x7 at 224 px), as in the Grad-CAM paper's VGG16 maps (Selvaraju et al., ICCV 2017).
    "vgg16": ModelSpec(zoo.build_vgg16, cam_layer="features.29", head="classifier.6"),
    "efficientnet_b0": ModelSpec(zoo.build_efficientnet_b0, cam_layer="features", head="classifier.1"),
}

if set(MODELS) != set(typing.get_args(ModelName)):  # a programming error, caught on import
    raise RuntimeError(f"MODELS {sorted(MODELS)} != config.ModelName {sorted(typing.get_args(ModelName))}")


def model_spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` for ``name``; :class:`ModelError` listing the registry otherwise."""
    if name not in MODELS:
        raise ModelError(choice_message("model", name, MODELS))
    return MODELS[name]


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.name`` for ``num_classes``, load ``cfg.pretrained``, apply ``cfg.freeze_backbone``.

    Returns a module mapping images (B, 3, H, W) to logits (B, num_classes), in train mode.
    Call :func:`set_train_mode` instead of (or after) ``model.train()`` in the training loop.
    """
    spec = model_spec(cfg.name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    model = spec.build(cfg, num_classes)
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained, head=spec.head)
    if cfg.freeze_backbone:
        if cfg.pretrained is None:
            warnings.warn(
                f"model.freeze_backbone=true without model.pretrained: only {cfg.name}.{spec.head} "
                "will train on top of a randomly initialised backbone",
                stacklevel=2,
            )
        freeze_backbone(model, spec.head)
    return model


# ----------------------------------------------------------------------------------------------
# Pretrained weights


def load_pretrained(model: nn.Module, path: str | Path, head: str) -> None:
    """Load a local state-dict file into ``model`` in place.

    Accepts a plain state dict or a dict holding one under ``model`` / ``state_dict`` (our
    checkpoints, most training scripts); strips ``module.`` / ``_orig_mod.`` prefixes.  Tensors
    of ``head`` whose shape differs (an ImageNet 1000-class classifier) are skipped and logged;
    any other missing, unexpected or mis-shaped key raises :class:`ModelError`.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    own = model.state_dict()
    skipped = _drop_resized_head(state, own, head, path)
    _check_keys(state, own, head, path, type(model).__name__)
    model.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(state), path)
    if not any(k.startswith(head + ".") for k in state):
        why = "skipped " + ", ".join(skipped) if skipped else "not in the file"
        log.info("classifier %s stays randomly initialised (%s)", head, why)


def _drop_resized_head(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], head: str, path: Path
) -> list[str]:
    """Remove ``head`` tensors whose shape differs from the model's; error on any other mismatch."""
    skipped: list[str] = []
    mismatched: list[str] = []
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            shapes = f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
            if key.startswith(head + "."):
                skipped.append(shapes)
                del state[key]
            else:
                mismatched.append(shapes)
    if mismatched:
        raise ModelError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for this model: " + _first(mismatched)
        )
    return skipped


def _check_keys(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], head: str, path: Path, arch: str
) -> None:
    """:class:`ModelError` listing the first missing/unexpected keys; the head may be absent."""
    # BatchNorm counters are absent from old torchvision files; BN fills them in itself.
    missing = [
        k
        for k in own
        if k not in state and not k.startswith(head + ".") and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys: {_first(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {_first(unexpected)}"] if unexpected else []
        raise ModelError(
            f"{path} does not fit {arch}: "
            + "; ".join(parts)
            + ". Is model.pretrained a state dict of the same architecture?"
        )


def read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """Read ``{name: tensor}`` from a file with ``torch.load(weights_only=True)``, wrappers unwrapped."""
    if not path.is_file():
        raise ModelError(f"model.pretrained file {str(path)!r} does not exist (weights are never downloaded)")
    try:
        # weights_only: a .pt file is a pickle; never execute code from it (torch >= 2.6 default).
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"cannot read {str(path)!r} as a weights-only state dict ({type(e).__name__}: {e}). "
            "Save weights with torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"keys {_first([str(k) for k in obj])}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(
            f"{str(path)!r} holds no state dict (found {found}); expected "
            "{name: tensor}, or a dict with a 'model' or 'state_dict' entry"
        )
    state: OrderedDict[str, torch.Tensor] = OrderedDict(obj)
    metadata = getattr(obj, "_metadata", None)  # per-module versions, used by BatchNorm's loader
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    for _ in range(4):  # nested wrappers, e.g. DDP(compile(model)) saves "module._orig_mod.layer1..."
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def _first(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


# ----------------------------------------------------------------------------------------------
# Frozen backbones


def freeze_backbone(model: nn.Module, head: str) -> None:
    """Set ``requires_grad=False`` on every parameter except those of module ``head``."""
    head_module = get_module(model, head)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_module.parameters():
        p.requires_grad_(True)
    log.info(
        "froze the backbone: %d of %d parameters train (%s)",
        trainable_parameters(model),
        count_parameters(model),
        head,
    )


def set_train_mode(model: nn.Module, cfg: ModelConfig, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, keeping the BatchNorm layers of a frozen backbone in eval mode.

    A frozen backbone must not update its BN running statistics from the (small, new) training
    batches: that silently changes the features the head was trained on (Keras transfer-learning
    guide, "BatchNormalization layers ... in inference mode").  Works on DDP/DataParallel/
    ``torch.compile`` wrappers.  Returns ``model``.
    """
    model.train(mode)
    if mode and cfg.freeze_backbone:
        inner = unwrap_model(model)
        head_ids = {id(m) for m in get_module(inner, model_spec(cfg.name).head).modules()}
        for m in inner.modules():
            if isinstance(m, _BATCHNORMS) and id(m) not in head_ids:
                m.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Helpers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user model inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Sub-module ``name`` (dotted, e.g. ``layer4`` or ``features.29``); :class:`ModelError` if absent."""
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    if name and name in modules:
        return modules[name]
    msg = f"unknown layer {name!r} in {type(inner).__name__}"
    guess = closest(name, [n for n in modules if n])
    if guess is not None:
        msg += f"; did you mean {guess!r}?"
    top = [n for n, _ in inner.named_children()]
    raise ModelError(
        msg + f" Valid choices: {', '.join(top)} and their dotted sub-modules (print(model) lists them)"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
