"""Models cnncam does not register: ``torchvision:<builder>``, ``timm:<name>``, ``python:<mod>:<fn>``.

Every builder gets ``num_classes`` and the ``model.kwargs`` mapping; nothing is downloaded
(torchvision with ``weights=None``, timm with ``pretrained=False`` unless ``model.pretrained``
names a local file, which timm's own loader then adapts: classifier dropped when its size
differs, position embeddings resampled for another ``img_size``).

A model may declare what cnncam would otherwise look for (a ``python:`` factory sets them on the
module it returns; registered models get them from :data:`cnncam.models.MODELS`):

* ``cnncam_cam_layer``: the layer ``auto`` means, a layer spec such as ``"layer4"`` or
  ``"blocks.11.norm1:tokens"`` (see :mod:`cnncam.cam.layerspec`);
* ``cnncam_head``: the dotted name of the final ``nn.Linear`` (frozen backbones, pretrained heads).

Without them the head is timm's declared classifier, else the last ``nn.Linear`` with one
output per class; the CAM layer is found structurally (:mod:`cnncam.cam.finder`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cnncam.config import ModelConfig
from cnncam.errors import ModelError, choice_message
from cnncam.models.weights import read_state_dict

CAM_LAYER_ATTR = "cnncam_cam_layer"
HEAD_ATTR = "cnncam_head"
TIMM_MISSING = "timm is not installed: pip install 'cnncam[timm]' (or pip install timm)"
# Keyword arguments that would make a builder fetch weights from the internet.
_DOWNLOAD_KWARGS = frozenset({"weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"})


def build_external(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.name`` (one of the three forms) for ``num_classes`` with ``cfg.kwargs``."""
    kind, _, target = cfg.name.partition(":")
    bad = sorted(_DOWNLOAD_KWARGS & set(cfg.kwargs))
    if bad:
        raise ModelError(
            f"model.kwargs may not set {', '.join(bad)}: weights come only from a local file "
            "(model.pretrained to start training, model.weights to export)"
        )
    builders: dict[str, Callable[[str, ModelConfig, int], nn.Module]] = {
        "torchvision": _torchvision,
        "timm": _timm,
        "python": _python,
    }
    if kind not in builders:
        raise ModelError(choice_message("model form", kind, [f"{k}:" for k in builders]))
    model = builders[kind](target, cfg, num_classes)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{cfg.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call(builder: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    try:
        return builder(**kwargs)
    except TypeError as e:
        raise ModelError(f"{name}({', '.join(f'{k}=...' for k in kwargs)}) failed: {e}") from None


def _torchvision(builder: str, cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    choices = tvm.list_models(module=tvm)  # classification builders only (not detection etc.)
    if builder not in choices:
        raise ModelError("torchvision builder: " + choice_message("value", builder, choices))
    factory = tvm.get_model_builder(builder)
    return _call(
        factory, f"torchvision.models.{builder}", weights=None, num_classes=num_classes, **cfg.kwargs
    )


def _timm_module() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(TIMM_MISSING) from None
    return timm


def _timm(name: str, cfg: ModelConfig, num_classes: int) -> nn.Module:
    timm = _timm_module()
    if not timm.is_model(name):
        raise ModelError(
            "timm model: "
            + choice_message("value", name, timm.list_models(name.split(".")[0].split("_")[0] + "*")[:20])
            + " ... (timm.list_models() lists all)"
        )
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, **cfg.kwargs}
    if cfg.pretrained is not None:
        # timm's own loader (its per-model filter: resampled position embeddings, converted stems);
        # we read the file ourselves so it is weights_only / safetensors and never a URL.
        path = Path(cfg.pretrained).expanduser()
        state = read_state_dict(path)
        classifier = timm_classifier(name)
        rows = int(state[f"{classifier}.weight"].shape[0]) if f"{classifier}.weight" in state else 0
        if rows not in (0, num_classes):
            warnings.warn(
                f"model.pretrained {str(path)!r}: classifier {classifier!r} has {rows} outputs, the run "
                f"{num_classes} classes; it is replaced by a new, randomly initialised one",
                stacklevel=3,
            )
        # source="": a hub source in the model's default config would otherwise take precedence.
        overlay = {"state_dict": state, "num_classes": rows, "source": ""}
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        return timm.create_model(name, **kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelError(f"timm.create_model({name!r}) failed: {type(e).__name__}: {e}") from None


def timm_classifier(name: str) -> str:
    """The dotted name of a timm model's classifier, as its pretrained config declares it."""
    pc = _timm_module().models.get_pretrained_cfg(name)
    classifier = getattr(pc, "classifier", None) or "head"
    return classifier if isinstance(classifier, str) else str(classifier[0])


def _python(target: str, cfg: ModelConfig, num_classes: int) -> nn.Module:
    module_name, _, attr = target.partition(":")
    # The working directory first: `python jobs/launch.py` puts jobs/ (not the cwd) on sys.path,
    # and Slurm/local jobs start in the submission directory, so the same import works there.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(
            f"model.name python:{target}: cannot import {module_name!r} ({e}); it must be importable from "
            f"the working directory ({cwd}), PYTHONPATH or an installed package"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            raise ModelError(
                f"python:{target}: " + choice_message(f"callable in {module_name}", attr, public)
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"python:{target} is not callable")
    return _call(obj, f"{module_name}.{attr}", num_classes=num_classes, **cfg.kwargs)  # type: ignore[no-any-return]


def external_head(model: nn.Module, cfg: ModelConfig, num_classes: int | None = None) -> str:
    """The classifier's dotted name: declared, timm's, else the last ``nn.Linear`` with a logit per class."""
    declared = getattr(model, HEAD_ATTR, None)
    if isinstance(declared, str):
        return declared
    if cfg.name.startswith("timm:"):
        return timm_classifier(cfg.name.partition(":")[2])
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if num_classes is not None:
        linears = [(n, m) for n, m in linears if m.out_features == num_classes] or linears
    if not linears:
        raise ModelError(
            f"{cfg.name} has no nn.Linear classifier; declare its head as model.{HEAD_ATTR} = '<module name>'"
        )
    return linears[-1][0]


# ----------------------------------------------------------------------------------------------
# Input transform from timm's data config


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square input size, eval resize of the short side, mean and std."""

    image_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def timm_input_spec(cfg: ModelConfig) -> InputSpec:
    """timm's pretrained data config of ``cfg.name`` (no model is built); ``img_size`` in
    ``model.kwargs`` overrides its input size, since the model is then built for that size."""
    name = cfg.name.partition(":")[2]
    pc = _timm_module().models.get_pretrained_cfg(name)
    _, h, w = getattr(pc, "input_size", None) or (3, 224, 224)
    size = cfg.kwargs.get("img_size", min(h, w))
    size = int(size if isinstance(size, int) else min(size))
    crop = float(getattr(pc, "crop_pct", None) or 0.875)
    mean = tuple(float(v) for v in (getattr(pc, "mean", None) or (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in (getattr(pc, "std", None) or (0.229, 0.224, 0.225)))
    # timm's eval transform: resize the short side to floor(size / crop_pct), centre-crop size.
    return InputSpec(size, max(size, math.floor(size / crop)), mean, std)  # type: ignore[arg-type]


def describe_factory(cfg: ModelConfig) -> str:
    """Where a ``python:`` factory came from (for provenance), else the model name."""
    if not cfg.name.startswith("python:"):
        return cfg.name
    module = sys.modules.get(cfg.name.split(":")[1])
    source = inspect.getsourcefile(module) if module is not None else None
    return f"{cfg.name} ({source})" if source else cfg.name
