"""Target selection: which class(es) each image's CAMs explain, as a LongTensor (N, K).

Specs (the same strings as ``cam.targets`` in the config): ``pred`` (arg-max of the logits),
``label`` (the true class; needs labels), ``class:<i>``, ``topk:<k>`` (the k highest logits,
best first) and ``all`` (every class, in class order).  An explicit per-image list or tensor
of class ids, shape (N,) or (N, K), is accepted too.  Unlike pytorch-grad-cam's silent
``zip`` (#18, #264) a list whose length differs from the batch is an error, never a blank map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cnncam.config import TARGET_CHOICES, TARGET_PATTERN
from cnncam.errors import CamError

TargetSpec = str | Tensor | Sequence[int] | Sequence[Sequence[int]]


def resolve_targets(spec: TargetSpec, logits: Tensor, labels: Tensor | Sequence[int] | None = None) -> Tensor:
    """Target classes (N, K) long on ``logits.device``.

    Parameters
    ----------
    spec : a target string (see module doc) or explicit class ids (N,) / (N, K).
    logits : (N, classes) model outputs of the batch.
    labels : (N,) true classes, required for ``label``.
    """
    if logits.dim() != 2:
        raise CamError(f"logits must have shape (N, classes), got {tuple(logits.shape)}")
    n, classes = logits.shape
    if isinstance(spec, str):
        targets = _from_string(spec, logits, labels)
    else:
        targets = _as_class_tensor(spec, "targets", n, logits.device)
    _check_range(targets, classes, "target")
    return targets


def parse_target_spec(spec: str) -> tuple[str, int | None]:
    """Split ``'topk:3'`` into ``('topk', 3)``; invalid strings raise :class:`CamError`."""
    if not TARGET_PATTERN.match(spec):
        raise CamError(f"unknown target spec {spec!r}. Valid choices: {TARGET_CHOICES}")
    kind, _, arg = spec.partition(":")
    return kind, int(arg) if arg else None


def _from_string(spec: str, logits: Tensor, labels: Tensor | Sequence[int] | None) -> Tensor:
    kind, arg = parse_target_spec(spec)
    n, classes = logits.shape
    device = logits.device
    if kind == "pred":
        return logits.argmax(1, keepdim=True)
    if kind == "label":
        if labels is None:
            raise CamError("targets='label' needs the true labels of the batch (labels=...)")
        lab = _as_class_tensor(labels, "labels", n, device)
        if lab.shape[1] != 1:
            raise CamError(f"labels must have shape (N,), got {tuple(lab.shape)}")
        _check_range(lab, classes, "label")
        return lab
    if kind == "class":
        assert arg is not None  # guaranteed by TARGET_PATTERN
        _check_range(torch.tensor([[arg]]), classes, "target")
        return torch.full((n, 1), arg, dtype=torch.long, device=device)
    if kind == "topk":
        assert arg is not None
        if arg > classes:
            raise CamError(f"targets {spec!r} asks for {arg} classes but the model has {classes}")
        return logits.topk(arg, dim=1).indices
    return torch.arange(classes, device=device).expand(n, classes).clone()  # "all"


def _as_class_tensor(value: object, what: str, n: int, device: torch.device) -> Tensor:
    """Explicit class ids -> (N, K) long; shape and dtype checked against the batch size."""
    try:
        t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CamError(f"{what} must be class ids of shape (N,) or (N, K): {e}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise CamError(f"{what} must be integer class ids, got dtype {t.dtype}")
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise CamError(f"{what} must have shape (N,) or (N, K) with K >= 1, got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise CamError(f"{what} has {t.shape[0]} rows but the batch has {n} images; give one entry per image")
    return t.to(device=device, dtype=torch.long)


def _check_range(t: Tensor, classes: int, what: str) -> None:
    bad = (t < 0) | (t >= classes)
    if bool(bad.any()):
        value = int(t[bad][0])
        raise CamError(
            f"{what} class {value} is out of range: the model has {classes} classes (0..{classes - 1})"
        )
