"""``cams/sanity.h5``: the results of the sanity checks, written once and atomically; no torch.

The file sits next to ``cams.h5`` but is not part of it: ``cams.h5`` is rebuilt by every merge,
while the sanity checks run on their own (``launch.py sanity``) on a fixed sample of the split.
Layout (``S`` sampled images, ``L`` randomisation units, ``E`` example images, ``h x w`` the
layer's map size; documented in ``docs/hdf5-schema.md``)::

    samples/{index,label,target}                   (S,) int64   split index, true class, class explained
    samples/path                                   (S,) str     image path relative to data.root
    sanity/units                                   (L,) str     randomised units, top (classifier) first
    sanity/images                                  (E, H, W, 3) uint8, the example inputs
    sanity/original/<method>/<layer>               (E, h, w) float16 signed maps of the trained model
    sanity/model/<mode>/<method>/<layer>/<sim>     (L, S) float32, sim in spearman_abs, spearman, ssim
    sanity/model/<mode>/<method>/<layer>/examples  (L, E, h, w) float16 signed maps after each step
    sanity/data/<method>/<layer>/<sim>             (S,) float32, permuted-label model vs trained model
    sanity/data/<method>/<layer>/examples          (E, h, w) float16 signed maps of the permuted model

Root attributes: ``kind = "sanity"``, ``sanity_version``, the run's identity (``run_name``,
``model``, ``split``, ``class_names``, ``input_size``, ``checkpoint_sha256``), the settings
(``modes``, ``targets``, ``seed``, ``flag_metric``, ``flag_depth``, ``flag_threshold``), the
description of what was randomised (``randomisation``) and, with the data test,
``permuted_run`` and ``permuted_checkpoint_sha256``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage.schema import validate_name

SANITY_FILENAME = "sanity.h5"
SANITY_KIND = "sanity"
SANITY_VERSION = 1
SIMILARITIES = ("spearman_abs", "spearman", "ssim")
MODES = ("cascading", "independent")
_JSON_ATTRS = frozenset({"class_names", "modes", "input_size"})
Key = tuple[str, str]


@dataclass
class SanityData:
    """Everything in a sanity file, as numpy arrays (see the module doc for shapes)."""

    attrs: dict[str, Any]
    index: np.ndarray
    path: list[str]
    label: np.ndarray
    target: np.ndarray
    units: list[str]
    images: np.ndarray  # (E, H, W, 3) uint8
    original: dict[Key, np.ndarray]  # (E, h, w)
    model: dict[str, dict[Key, dict[str, np.ndarray]]]  # mode -> key -> sim (L, S) | examples
    data: dict[Key, dict[str, np.ndarray]] = field(default_factory=dict)  # sim (S,) | examples

    @property
    def keys(self) -> list[Key]:
        return list(self.original)

    def curve(self, mode: str, key: Key, sim: str) -> np.ndarray:
        """(L,) mean over images of similarity ``sim`` after each step (NaN-aware; NaN if all NaN)."""
        values = np.asarray(self.model[mode][key][sim], dtype=np.float64)
        ok = np.isfinite(values)
        total = np.where(ok, values, 0.0).sum(axis=1)
        count = ok.sum(axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def flagged(self, key: Key) -> bool:
        """True when ``key``'s maps stay similar once the top ``flag_depth`` units are randomised."""
        if "cascading" not in self.model:
            return False
        curve = self.curve("cascading", key, str(self.attrs["flag_metric"]))
        return is_flagged(curve, int(self.attrs["flag_depth"]), float(self.attrs["flag_threshold"]))


def is_flagged(curve: np.ndarray, depth: int, threshold: float) -> bool:
    """The flag rule: the mean similarity after ``depth`` cascading steps is still >= ``threshold``.

    A model with fewer units than ``depth`` uses its last step; NaN (every map constant) is not similar.
    """
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size == 0 or depth < 1:
        return False
    value = float(curve[min(depth, curve.size) - 1])
    return bool(np.isfinite(value) and value >= threshold)


def sanity_group(*parts: str) -> str:
    """``sanity/<part>/...`` with every part checked as one HDF5 path component."""
    return "/".join(["sanity", *(validate_name("sanity path part", p) for p in parts)])


# ----------------------------------------------------------------------------------------------
# Writing


def write_sanity(path: Path, data: SanityData) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, ``os.replace``:
    a crash leaves the previous file (or none), never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", libver=("v108", "v110")) as f:
            _write(f, data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _dataset(f: h5py.File, name: str, value: np.ndarray, dtype: Any) -> None:
    arr = np.asarray(value, dtype=dtype)
    opts: dict[str, Any] = {"compression": "gzip", "compression_opts": 4} if arr.size > 1 else {}
    f.create_dataset(name, data=arr, **opts)


def _write(f: h5py.File, data: SanityData) -> None:
    for key, value in data.attrs.items():
        f.attrs[key] = json.dumps(value) if key in _JSON_ATTRS else value
    f.attrs["kind"] = SANITY_KIND
    f.attrs["sanity_version"] = np.int64(SANITY_VERSION)
    for name, arr in (("index", data.index), ("label", data.label), ("target", data.target)):
        _dataset(f, f"samples/{name}", arr, np.int64)
    f.create_dataset("samples/path", data=np.asarray(data.path, dtype=object), dtype=h5py.string_dtype())
    f.create_dataset("sanity/units", data=np.asarray(data.units, dtype=object), dtype=h5py.string_dtype())
    _dataset(f, "sanity/images", data.images, np.uint8)
    for (method, layer), maps in data.original.items():
        _dataset(f, sanity_group("original", method, layer), maps, np.float16)
    for mode, per_key in data.model.items():
        for (method, layer), values in per_key.items():
            for name, arr in values.items():
                dtype = np.float16 if name == "examples" else np.float32
                _dataset(f, sanity_group("model", mode, method, layer, name), arr, dtype)
    for (method, layer), values in data.data.items():
        for name, arr in values.items():
            dtype = np.float16 if name == "examples" else np.float32
            _dataset(f, sanity_group("data", method, layer, name), arr, dtype)


# ----------------------------------------------------------------------------------------------
# Reading


def read_sanity(path: Path) -> SanityData:
    """Read a whole sanity file (it is small: S images x L units); clear errors for foreign files."""
    path = Path(path)
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise SchemaError(f"{path} is not a readable HDF5 file ({e})") from None
    with f:
        kind = _text(f.attrs.get("kind", ""))
        if kind != SANITY_KIND:
            raise SchemaError(f"{path} is not a cnncam sanity file (kind {kind!r}, expected {SANITY_KIND!r})")
        version = int(np.asarray(f.attrs.get("sanity_version", -1)).item())
        if version != SANITY_VERSION:
            raise SchemaError(
                f"{path} has sanity_version {version}; this cnncam reads version {SANITY_VERSION}. "
                "Run `launch.py sanity` again."
            )
        try:
            return _read(f)
        except (KeyError, ValueError, TypeError) as e:
            raise SchemaError(f"{path} is not a complete sanity file: {e}") from None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _attrs(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, (bytes, str)):
            value = _text(value)
            out[key] = json.loads(value) if key in _JSON_ATTRS else value
        else:
            out[key] = np.asarray(value).tolist()
    return out


def _groups(g: h5py.Group, depth: int) -> dict[tuple[str, ...], h5py.Group]:
    """Sub-groups exactly ``depth`` levels below ``g``, by their path parts."""
    if depth == 0:
        return {(): g}
    out: dict[tuple[str, ...], h5py.Group] = {}
    for name, child in g.items():
        if isinstance(child, h5py.Group):
            for rest, sub in _groups(child, depth - 1).items():
                out[(name, *rest)] = sub
    return out


def _read(f: h5py.File) -> SanityData:
    strings = [_text(s) for s in f["samples/path"][()]]
    original = {
        (m, layer): np.asarray(d[()], dtype=np.float32)
        for (m,), g in _groups(f["sanity/original"], 1).items()
        for layer, d in g.items()
    }
    model: dict[str, dict[Key, dict[str, np.ndarray]]] = {}
    if "sanity/model" in f:
        for (mode, m, layer), g in _groups(f["sanity/model"], 3).items():
            model.setdefault(mode, {})[(m, layer)] = {
                n: np.asarray(d[()], dtype=np.float32) for n, d in g.items()
            }
    data: dict[Key, dict[str, np.ndarray]] = {}
    if "sanity/data" in f:
        for (m, layer), g in _groups(f["sanity/data"], 2).items():
            data[(m, layer)] = {n: np.asarray(d[()], dtype=np.float32) for n, d in g.items()}
    for where, values in [*((f"model/{m}/{k[0]}/{k[1]}", v) for m, d in model.items() for k, v in d.items()),
                          *((f"data/{k[0]}/{k[1]}", v) for k, v in data.items())]:  # fmt: skip
        missing = [n for n in (*SIMILARITIES, "examples") if n not in values]
        if missing:
            raise KeyError(f"sanity/{where} lacks {', '.join(missing)}")
    attrs = _attrs(f.attrs)
    absent = [a for a in ("flag_metric", "flag_depth", "flag_threshold") if a not in attrs]
    if absent or attrs.get("flag_metric") not in SIMILARITIES:
        raise KeyError(f"root attributes {absent or ['flag_metric']} missing or invalid")
    return SanityData(
        attrs=attrs,
        index=f["samples/index"][()],
        path=strings,
        label=f["samples/label"][()],
        target=f["samples/target"][()],
        units=[_text(s) for s in f["sanity/units"][()]],
        images=f["sanity/images"][()],
        original=original,
        model=model,
        data=data,
    )
