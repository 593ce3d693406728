"""Read a part file or a merged CAM file with bounded memory, from any working directory.

Every file is treated as foreign (run folders are copied and handed over): before anything is
read, :mod:`cnncam.storage.guard` refuses links and external storage that would read outside the
file, and checks the root attributes.  A merged file's datasets are virtual datasets over the
part files next to it; they are read through :class:`~cnncam.storage.sources.PartSources`, which
uses the virtual dataset only as the map and opens the parts itself, relative to the merged
file's folder and a few at a time.  So a merged file reads the same from any working directory,
with any ``HDF5_VDS_PREFIX`` and any number of parts: never fill values for a part that could not
be opened (libhdf5's behaviour, HDFGroup/hdf5#5088, h5py#1546, #1597).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from cnncam.errors import SchemaError, choice_message
from cnncam.storage import guard
from cnncam.storage import schema as S
from cnncam.storage.sources import PartSources, read_failure

CLASS_ID_DATASETS = (S.sample_path("label"), S.sample_path("pred"), S.sample_path("targets"))


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
        self.attrs: dict[str, Any] = guard.validated_attrs(path, dict(f.attrs))
        if self.kind not in (S.PART_KIND, S.MERGED_KIND):
            raise SchemaError(
                f"{path}: " + choice_message("file kind", self.kind, (S.PART_KIND, S.MERGED_KIND))
            )
        guard.check_objects(f, path, allow_virtual=self.kind == S.MERGED_KIND)
        if not self.attrs["complete"]:
            raise SchemaError(
                f"{path} is an incomplete part ({self.attrs.get('n_committed')} of "
                f"{self.n_items} items committed); finish the export first"
            )
        self._sources = PartSources(path, f, self.attrs)
        if S.INDEX in f and f[S.INDEX].is_virtual:
            self._sources.check_present(S.INDEX)
        self._views: dict[str, DatasetView] = {}

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
        raw = self.dataset(S.META_CONFIG)[()]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(S.decode_attrs({"config_json": text}, self.path)["config_json"])

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

    def dataset(self, name: str) -> DatasetView:
        """Dataset ``name`` as a read-only view (``shape``, ``dtype``, numpy-style indexing)
        whose reads go through this file's checks (a merged file: straight from its parts)."""
        if name not in self._views:
            d = self._f.get(name)
            if not isinstance(d, h5py.Dataset):
                raise SchemaError(f"{self.path}: " + choice_message("dataset", name, self.datasets()))
            self._views[name] = DatasetView(self, name, d)
        return self._views[name]

    def read(
        self, name: str, sel: slice | Sequence[int] | np.ndarray | None = None, *, chunk: int = 4096
    ) -> np.ndarray:
        """Rows ``sel`` of ``name``: None = all, a slice, or integer indices in any order
        (read in sorted windows of ``chunk`` rows, so memory stays bounded by the result)."""
        return self.read_many([name], sel, chunk=chunk)[name]

    def read_many(
        self,
        names: Sequence[str],
        sel: slice | Sequence[int] | np.ndarray | None = None,
        *,
        chunk: int = 4096,
    ) -> dict[str, np.ndarray]:
        """:meth:`read` of several datasets with one row count, each source part opened once."""
        n = self._rows(names)
        if sel is None or isinstance(sel, slice):
            rows = range(n)[sel or slice(None)]
            if rows.step == 1:
                return self._block(names, rows.start, max(rows.start, rows.stop))
            sel = np.asarray(rows)
        idx = np.asarray(sel, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{names[0]}: row indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        out = {
            k: np.empty((idx.size, *self.dataset(k).shape[1:]), dtype=self.dataset(k).dtype) for k in names
        }
        i = 0
        while i < sidx.size:
            a = int(sidx[i])
            j = int(np.searchsorted(sidx, a + chunk))
            block = self._block(names, a, int(sidx[j - 1]) + 1, decode=False)
            for k in names:
                out[k][order[i:j]] = block[k][sidx[i:j] - a]
            i = j
        for k in names:
            self._verify(k, idx, out[k])
        return {k: self._decode(k, v) for k, v in out.items()}

    def iter_rows(
        self, names: Sequence[str], chunk: int = 4096, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: rows}`` for consecutive windows of ``chunk`` rows (last may be shorter).

        ``samples/index`` is read and checked for every window, and class ids must lie in
        ``[0, classes)``: a damaged or foreign source raises instead of yielding bad rows.
        """
        if chunk < 1:
            raise SchemaError(f"chunk must be >= 1, got {chunk}")
        if self.n_items == 0:  # an empty part has no datasets at all
            return
        for name in names:
            self.dataset(name)
        stop = self.n_items if stop is None else min(stop, self.n_items)
        extra = [S.INDEX] if S.INDEX not in names and S.INDEX in self._f else []
        for a in range(start, stop, chunk):
            got = self._block([*names, *extra], a, min(a + chunk, stop))
            yield {name: got[name] for name in names}

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
        return sorted(k for k in group if k != "index") if isinstance(group, h5py.Group) else []

    def filters(self) -> np.ndarray | None:
        """First conv layer's filters ``(O, I, kh, kw)`` float32, if recorded."""
        return self.dataset(S.FILTERS_FIRST_CONV)[...] if S.FILTERS_FIRST_CONV in self._f else None

    # -- reading and checks ------------------------------------------------------------------

    def _rows(self, names: Sequence[str]) -> int:
        counts = {self.dataset(k).shape[0] for k in names}
        if len(counts) != 1:
            raise SchemaError(f"{self.path}: {', '.join(names)} do not have the same number of rows")
        return counts.pop()

    def _block(self, names: Sequence[str], a: int, b: int, decode: bool = True) -> dict[str, np.ndarray]:
        """Rows ``[a, b)`` of every dataset in ``names`` (checked, decoded unless ``decode=False``)."""
        out: dict[str, np.ndarray] = {}
        virtual: list[tuple[str, np.ndarray, int, int]] = []
        for name in names:
            d = self.dataset(name).h5
            if d.is_virtual:
                out[name] = np.empty((b - a, *d.shape[1:]), dtype=d.dtype)
                virtual.append((name, out[name], a, b))
                continue
            try:
                out[name] = d[a:b]
            except OSError as e:
                raise read_failure(self.path, name, e) from None
        self._sources.read_into(virtual)
        rows = np.arange(a, b)
        for name in names:
            self._verify(name, rows, out[name])
        return {k: self._decode(k, v) for k, v in out.items()} if decode else out

    def _verify(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        if name == S.INDEX and not np.array_equal(values, rows + self.index_start):
            bad = int(np.flatnonzero(values != rows + self.index_start)[0])
            raise SchemaError(
                f"{self.path}: samples/index row {int(rows[bad])} reads {int(values[bad])}; "
                "a source part is unreadable or missing (fill value)"
            )
        if name in CLASS_ID_DATASETS and values.size:
            n = len(self.class_names)
            out = (values < 0) | (values >= n)
            if out.any():
                at = np.argwhere(out)[0]
                raise SchemaError(
                    f"{self.path}: {name} row {int(rows[at[0]])} holds {int(values[tuple(at)])}, outside "
                    f"the classes 0..{n - 1}; the file is damaged"
                )

    @staticmethod
    def _decode(name: str, values: np.ndarray) -> np.ndarray:
        return np.char.decode(values, "utf-8", errors="replace") if name == S.PATH else values

    def close(self) -> None:
        self._views.clear()
        self._sources.close()
        self._f.close()

    def __enter__(self) -> CamFile:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DatasetView:
    """Read-only numpy-style access to one dataset of a :class:`CamFile` (``view[rows, ...]``).

    The first index selects rows (an int, a slice, an int array or ``...``) and goes through the
    file's checked readers; the rest is applied to the rows read.
    """

    def __init__(self, cams: CamFile, name: str, h5: h5py.Dataset) -> None:
        self.cams, self.name, self.h5 = cams, name, h5

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.h5.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.h5.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_virtual(self) -> bool:
        return bool(self.h5.is_virtual)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getitem__(self, key: Any) -> Any:
        if not self.shape:  # scalar (meta/config): nothing to map
            return self.h5[key]
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (Ellipsis, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest) if rest else ()
        if isinstance(first, (int, np.integer)):
            i = int(first) + (len(self) if first < 0 else 0)
            return self.cams.read(self.name, [i])[0][rest] if rest else self.cams.read(self.name, [i])[0]
        rows = self.cams.read(self.name, first)
        return rows[(slice(None), *rest)] if rest else rows
