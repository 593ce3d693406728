"""Batches: what the exporter hands the writer, converted to on-disk dtypes.

Moved out of :mod:`cnncam.storage.schema`, which keeps the paths, dtypes and attributes that
these conversions check against; :class:`PartBatch` is re-exported by :mod:`cnncam.storage`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage.schema import (
    ACTIVATIONS,
    ACTIVATIONS_INDEX,
    CAMS,
    FILTERS_FIRST_CONV,
    METRICS,
    PATH,
    SAMPLE_FIELDS,
    SAMPLES,
    UPSAMPLED,
    activation_path,
    cam_path,
    check_paths,
    dtype_for,
    metric_path,
    sample_path,
    upsampled_path,
)


@dataclass
class PartBatch:
    """One batch of B items as CPU numpy arrays.

    index (B,) int64 global indices; path (B,) str; label, pred (B,) int64; logits (B, C) float32;
    targets (B, K) int64; cams {(method, layer): (B, K, h, w) float32} (stored float16);
    upsampled {(method, layer): (B, K, H, W) uint8}; boxes (B, 4) float32 (NaN = no box);
    metrics {(method, layer): {name: (B,)}} with names from :data:`METRIC_DTYPES`.
    """

    index: np.ndarray
    path: Sequence[str] | np.ndarray
    label: np.ndarray
    pred: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    cams: Mapping[tuple[str, str], np.ndarray]
    upsampled: Mapping[tuple[str, str], np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray | None = None
    metrics: Mapping[tuple[str, str], Mapping[str, np.ndarray]] = field(default_factory=dict)

    def rows(self) -> dict[str, np.ndarray]:
        """Dataset path -> array in its on-disk dtype (always a copy)."""
        raw: dict[str, Any] = {sample_path(k): getattr(self, k) for k in SAMPLE_FIELDS[:6]}
        if self.boxes is not None:
            raw[sample_path("boxes")] = self.boxes
        raw.update({cam_path(m, layer): a for (m, layer), a in self.cams.items()})
        raw.update({upsampled_path(m, layer): a for (m, layer), a in self.upsampled.items()})
        for (m, layer), named in self.metrics.items():
            raw.update({metric_path(m, layer, name): a for name, a in named.items()})
        return convert_rows(raw)


_DEPTH = {SAMPLES: 2, CAMS: 3, UPSAMPLED: 3, METRICS: 4}


def convert_rows(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate per-item dataset paths and convert each array to its on-disk dtype (copies)."""
    for path in raw:
        p = path.split("/")
        if _DEPTH.get(p[0]) != len(p):
            raise SchemaError(
                f"{path!r} is not a per-item dataset path; valid: samples/<field>, "
                "cams/<method>/<layer>, upsampled/<method>/<layer>, metrics/<method>/<layer>/<name>"
            )
        if p[0] == SAMPLES:
            sample_path(p[1])
        else:
            metric_path(*p[1:]) if p[0] == METRICS else cam_path(p[1], p[2])
    return {path: convert(path, value) for path, value in raw.items()}


def convert_extras(
    activations: Mapping[str, np.ndarray] | None,
    activation_index: np.ndarray | None,
    first_conv: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Once-per-part data: activations {layer: (M, C', h, w)} + index (M,), filters (O, I, kh, kw)."""
    rows: dict[str, np.ndarray] = {}
    if activations:
        if activation_index is None:
            raise SchemaError("activation_index (the M global indices) is required with activations")
        rows[ACTIVATIONS_INDEX] = convert(ACTIVATIONS_INDEX, activation_index)
        for layer, a in activations.items():
            rows[activation_path(layer)] = arr = convert(activation_path(layer), a)
            if len(arr) != len(rows[ACTIVATIONS_INDEX]):
                raise SchemaError(
                    f"activations[{layer!r}] has {len(arr)} rows, activation_index has "
                    f"{len(rows[ACTIVATIONS_INDEX])}"
                )
    if first_conv is not None:
        rows[FILTERS_FIRST_CONV] = convert(FILTERS_FIRST_CONV, first_conv)
    return rows


def convert(path: str, value: Any) -> np.ndarray:
    """``value`` as a new array of the dtype of ``path``; refuses lossy or ill-shaped input."""
    if path == PATH:
        return _encode_paths(value)
    target, a = dtype_for(path), np.asarray(value)
    group = path.split("/", 1)[0]
    ndim = 4 if group in (CAMS, UPSAMPLED, ACTIVATIONS, "filters") and path != ACTIVATIONS_INDEX else 1
    ndim = 2 if path.rsplit("/", 1)[1] in ("logits", "targets", "boxes") else ndim
    if a.ndim != ndim or (path == sample_path("boxes") and a.shape[1] != 4):
        raise SchemaError(
            f"{path} must have {ndim} dimensions{' (B, 4)' if 'boxes' in path else ''}, got {a.shape}"
        )
    if target.kind == "f":
        if a.dtype.kind not in "fiub":
            raise SchemaError(f"{path} must be numeric, got dtype {a.dtype}")
        with np.errstate(over="ignore"):
            out = a.astype(target)
        if target == np.float16 and np.isinf(out).sum() > np.isinf(a).sum():
            warnings.warn(f"{path}: values beyond float16's range (65504) stored as inf", RuntimeWarning, 3)
        return out
    if (target == np.uint8 and a.dtype != np.uint8) or a.dtype.kind not in "iub":
        raise SchemaError(
            f"{path} must be {target} (integers{', scaled to 0..255' if target == np.uint8 else ''}), "
            f"got dtype {a.dtype}"
        )
    out = a.astype(target)
    if not np.array_equal(out, a):
        raise SchemaError(f"{path} has values outside the range of {target}")
    return out


def _encode_paths(value: Any) -> np.ndarray:
    encoded = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in value]
    check_paths(encoded)
    return np.array(encoded, dtype=dtype_for(PATH)).reshape(len(encoded))
