"""The model registry: ``create_model(cfg.model, num_classes)`` and what the CAM engine needs to know.

Each entry of :data:`MODELS` is a :class:`ModelSpec` keyed by the name used in configs, on the
command line, in HDF5 attributes and in reports (``model.name``; the keys equal
``cnncam.config.REGISTERED_MODELS``).  A spec knows how to build the network, which layer
``auto`` means (``cam_layer``, declared on the built model as ``cnncam_cam_layer``: the CAM
engine reads it there) and which layer is the classifier (``head``: the only trainable part
when ``model.freeze_backbone``).  Any other model comes from :mod:`cnncam.models.external`
(``torchvision:``, ``timm:``, ``python:``).

Weights are never downloaded: ``model.pretrained`` is a local state-dict file.  A checkpoint
saved by a run is restored by the trainer/CAM code, not here; build that model with
``dataclasses.replace(cfg, pretrained=None)`` so the ImageNet file need not exist on the node.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnncam.config import MODEL_FORMS, REGISTERED_MODELS, ModelConfig
from cnncam.errors import ModelError, choice_message, closest
from cnncam.errors import first_items as _first
from cnncam.models import zoo
from cnncam.models.external import CAM_LAYER_ATTR, build_external, external_head
from cnncam.models.simple import SimpleCNN, build_simple_cnn
from cnncam.models.weights import read_state_dict as read_state_dict

__all__ = [
    "MODELS",
    "ModelSpec",
    "SimpleCNN",
    "count_parameters",
    "create_model",
    "freeze_backbone",
    "get_module",
    "head_name",
    "load_pretrained",
    "model_spec",
    "set_train_mode",
    "trainable_parameters",
    "unwrap_model",
]

log = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and where its CAM layer and classifier live.

    Attributes
    ----------
    build:
        ``(ModelConfig, num_classes) -> nn.Module`` mapping (B, 3, H, W) images to (B, num_classes) logits.
    cam_layer:
        The layer ``auto`` means (a layer spec, see :mod:`cnncam.cam.layerspec`): the last layer
        whose output is (B, C, h, w).  :func:`create_model` declares it on the model it builds.
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

if tuple(MODELS) != REGISTERED_MODELS:  # a programming error, caught on import
    raise RuntimeError(f"MODELS {list(MODELS)} != config.REGISTERED_MODELS {list(REGISTERED_MODELS)}")


def model_spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` for ``name``; :class:`ModelError` listing the registry otherwise."""
    if name not in MODELS:
        raise ModelError(
            choice_message("model", name, MODELS) + f"; or one of the forms {', '.join(MODEL_FORMS)}"
        )
    return MODELS[name]


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.name`` for ``num_classes``, load ``cfg.pretrained``, apply ``cfg.freeze_backbone``.

    ``cfg.name`` is a registered name or ``torchvision:``/``timm:``/``python:`` (see
    :mod:`cnncam.models.external`).  Returns a module mapping images (B, 3, H, W) to logits
    (B, num_classes), in train mode.  Call :func:`set_train_mode` instead of (or after)
    ``model.train()`` in the training loop.
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.name in MODELS:
        spec = MODELS[cfg.name]
        model = spec.build(cfg, num_classes)
        setattr(model, CAM_LAYER_ATTR, spec.cam_layer)  # the registry's metadata, read by `auto`
    else:
        model = build_external(cfg, num_classes)  # timm loads model.pretrained itself
    head = head_name(model, cfg, num_classes)
    if cfg.pretrained is not None and not cfg.name.startswith("timm:"):
        load_pretrained(model, cfg.pretrained, head=head)
    if cfg.freeze_backbone:
        if cfg.pretrained is None:
            warnings.warn(
                f"model.freeze_backbone=true without model.pretrained: only {cfg.name}.{head} "
                "will train on top of a randomly initialised backbone",
                stacklevel=2,
            )
        freeze_backbone(model, head)
    return model


def head_name(model: nn.Module, cfg: ModelConfig, num_classes: int | None = None) -> str:
    """Dotted name of ``model``'s classifier: the registry's ``head``, else found (see external.py)."""
    if cfg.name in MODELS:
        return MODELS[cfg.name].head
    return external_head(unwrap_model(model), cfg, num_classes)


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
    if skipped:
        log.warning(
            "classifier %s is replaced by a randomly initialised one (skipped %s)", head, _first(skipped)
        )
    elif not any(k.startswith(head + ".") for k in state):
        log.info("classifier %s stays randomly initialised (not in the file)", head)


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
        head_ids = {id(m) for m in get_module(inner, head_name(inner, cfg)).modules()}
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
