"""Read a part file or a merged (virtual) CAM file with bounded memory, from any working directory.

A merged file's datasets are HDF5 virtual datasets whose sources are the part files, named
by paths relative to the merged file.  libhdf5 resolves such a name via ``HDF5_VDS_PREFIX``,
then the dataset-access ``virtual_prefix``, then the merged file's own directory and last the
current directory (H5Pset_virtual_prefix docs; verified with h5py/HDF5 2.0 and h5dump 1.10.8).
Releases before 1.10.2 had no prefix and may resolve against the cwd, so we also set
``virtual_prefix`` to the merged file's directory.  Before reading we check that every source
exists: libhdf5 reads a missing source as the fill value, silently (HDFGroup/hdf5#5088, h5py#1546).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from cnncam.errors import SchemaError, choice_message
from cnncam.storage import schema as S


def open_cams(path: str | Path, *, locking: bool = False) -> CamFile:
    """Open a complete part or a merged CAM file read-only.

    ``locking=False`` (default) avoids "unable to lock file" errors on NFS/Lustre (h5py#1082);
    readers never modify the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"CAM file {path} does not exist")
    try:
        f = h5py.File(path, "r", locking=locking)
    except OSError as e:
        raise SchemaError(f"{path} is not a readable HDF5 file ({e})") from None
    try:
        return CamFile(path, f)
    except BaseException:
        f.close()
        raise


class CamFile:
    """One open CAM file: decoded attributes plus chunked, bounded-memory access to datasets."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = path
        self._f = f
        S.check_version(path, f.attrs)
        self.attrs: dict[str, Any] = S.decode_attrs(f.attrs)
        missing = [k for k in S.REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise SchemaError(f"{path} lacks required root attributes: {', '.join(missing)}")
        if self.kind not in (S.PART_KIND, S.MERGED_KIND):
            raise SchemaError(
                f"{path}: " + choice_message("file kind", self.kind, (S.PART_KIND, S.MERGED_KIND))
            )
        if not self.attrs["complete"]:
            raise SchemaError(
                f"{path} is an incomplete part ({self.attrs.get('n_committed')} of "
                f"{self.n_items} items committed); finish the export first"
            )
        self._prefix = str(path.resolve().parent).encode() + b"/"
        if self.kind == S.MERGED_KIND:
            self._check_sources()
        self._cache: dict[str, h5py.Dataset] = {}

    # -- attributes --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return str(self.attrs["kind"])

    @property
    def n_items(self) -> int:
        return int(self.attrs["n_items"])

    @property
    def index_start(self) -> int:
        return int(self.attrs["index_start"])

    @property
    def methods(self) -> list[str]:
        return list(self.attrs["methods"])

    @property
    def layers(self) -> list[str]:
        return list(self.attrs["layers"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config (from ``config_json`` or, when large, ``meta/config``)."""
        if "config_json" in self.attrs:
            return dict(self.attrs["config_json"])
        raw = self._f[S.META_CONFIG][()]
        return dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))

    # -- datasets ----------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        """Paths of the per-item datasets (``samples/...``, ``cams/...``, ...), sorted."""
        return sorted(k for k in S.list_datasets(self._f) if S.is_per_item(k))

    def cam_name(self, method: str, layer: str) -> str:
        """``cams/<method>/<layer>`` after checking both exist in this file."""
        if method not in self.methods:
            raise SchemaError(f"{self.path}: " + choice_message("method", method, self.methods))
        if layer not in self.layers:
            raise SchemaError(f"{self.path}: " + choice_message("layer", layer, self.layers))
        return S.cam_path(method, layer)

    def dataset(self, name: str) -> h5py.Dataset:
        """The h5py dataset ``name``; virtual ones are opened with ``virtual_prefix`` set."""
        if name in self._cache:
            return self._cache[name]
        if name not in self._f or not isinstance(self._f[name], h5py.Dataset):
            raise SchemaError(f"{self.path}: " + choice_message("dataset", name, self.datasets()))
        d = self._f[name]
        if d.is_virtual:
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_virtual_prefix(self._prefix)
            d = h5py.Dataset(h5py.h5d.open(self._f.id, name.encode(), dapl=dapl))
        self._cache[name] = d
        return d

    def read(
        self, name: str, sel: slice | Sequence[int] | np.ndarray | None = None, *, chunk: int = 4096
    ) -> np.ndarray:
        """Rows ``sel`` of ``name``: None = all, a slice, or integer indices in any order
        (read in sorted windows of ``chunk`` rows, so memory stays bounded by the result)."""
        d = self.dataset(name)
        if sel is None or isinstance(sel, slice):
            rows = range(d.shape[0])[sel or slice(None)]
            if rows.step != 1:
                return self.read(name, np.asarray(rows), chunk=chunk)
            out = d[rows.start : rows.stop]
            self._verify(name, np.arange(rows.start, rows.stop), out)
            return self._decode(name, out)
        idx = np.asarray(sel, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= d.shape[0]):
            raise IndexError(
                f"{name}: row indices must lie in [0, {d.shape[0]}), got {idx.min()}..{idx.max()}"
            )
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        out = np.empty((idx.size, *d.shape[1:]), dtype=d.dtype)
        i = 0
        while i < sidx.size:
            a = int(sidx[i])
            j = int(np.searchsorted(sidx, a + chunk))
            block = d[a : int(sidx[j - 1]) + 1]
            out[order[i:j]] = block[sidx[i:j] - a]
            i = j
        self._verify(name, idx, out)
        return self._decode(name, out)

    def iter_rows(
        self, names: Sequence[str], chunk: int = 4096, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: rows}`` for consecutive windows of ``chunk`` rows (last may be shorter).

        ``samples/index`` is read and checked for every window, so a virtual dataset whose source
        went missing raises instead of yielding fill values.
        """
        if chunk < 1:
            raise SchemaError(f"chunk must be >= 1, got {chunk}")
        if self.n_items == 0:  # an empty part has no datasets at all
            return
        for name in names:
            self.dataset(name)
        stop = self.n_items if stop is None else min(stop, self.n_items)
        for a in range(start, stop, chunk):
            rows = slice(a, min(a + chunk, stop))
            if S.INDEX not in names and S.INDEX in self._f:
                self.read(S.INDEX, rows)
            yield {name: self.read(name, rows) for name in names}

    def activations(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(acts (M, C', h, w) float16, global indices (M,))`` recorded for ``layer``."""
        name = S.activation_path(layer)
        if name not in self._f:
            raise SchemaError(
                f"{self.path}: " + choice_message("activation layer", layer, self.activation_layers())
            )
        return self.dataset(name)[...], self.dataset(S.ACTIVATIONS_INDEX)[...]

    def activation_layers(self) -> list[str]:
        group = self._f.get(S.ACTIVATIONS)
        return sorted(k for k in group if k != "index") if group is not None else []

    def filters(self) -> np.ndarray | None:
        """First conv layer's filters ``(O, I, kh, kw)`` float32, if recorded."""
        return self._f[S.FILTERS_FIRST_CONV][...] if S.FILTERS_FIRST_CONV in self._f else None

    # -- checks ------------------------------------------------------------------------------

    def _check_sources(self) -> None:
        for rel in self.attrs.get("parts", []):
            src = self.path.resolve().parent / rel
            if not src.is_file():
                raise SchemaError(
                    f"{self.path} reads its data from part {rel}, which is missing ({src}); "
                    "virtual datasets would silently return fill values. Restore the part files "
                    "next to the merged file or merge again."
                )

    def _verify(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        if name == S.INDEX and not np.array_equal(values, rows + self.index_start):
            bad = int(np.flatnonzero(values != rows + self.index_start)[0])
            raise SchemaError(
                f"{self.path}: samples/index row {int(rows[bad])} reads {int(values[bad])}; "
                "a source part is unreadable or missing (fill value)"
            )

    @staticmethod
    def _decode(name: str, values: np.ndarray) -> np.ndarray:
        return np.char.decode(values, "utf-8") if name == S.PATH else values

    def close(self) -> None:
        self._cache.clear()
        self._f.close()

    def __enter__(self) -> CamFile:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
