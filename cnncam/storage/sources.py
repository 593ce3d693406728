"""Read a merged file's virtual datasets straight from its part files, a few open at a time.

Reading through libhdf5's virtual datasets has three problems at scale: every source stays open
until the dataset is closed, so a merged file with more parts than the open-file limit reads the
rest *silently as fill values* (h5py #1597/#2155, HDFGroup/hdf5 #5187); each open source keeps its
own chunk cache and metadata, so memory grows with the part count; and libhdf5 resolves source
names through ``HDF5_VDS_PREFIX`` and the working directory, wherever those point.  cnncam's
reader therefore uses the virtual dataset only as the *map* (which rows come from which part,
checked by :func:`cnncam.storage.guard.virtual_pieces`) and opens the parts itself: relative to
the merged file's folder, at most :data:`MAX_OPEN_PARTS` at once, each checked once (no links,
no external storage, a complete part of the same fingerprint whose rows line up).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage import guard
from cnncam.storage import schema as S

_PART_ATTRS = ("kind", "complete", "fingerprint", "index_start")
MAX_OPEN_PARTS = 16  # far below any open-file limit; memory does not grow with the part count
PART_CACHE_BYTES = 1 << 20  # chunk cache per open part (libhdf5's default)
VERIFY_BYTES = 64 << 20  # bytes per read while verifying checksums (bounded memory)


def read_failure(where: object, name: str, e: BaseException) -> SchemaError:
    """The error for a dataset that cannot be read (fletcher32 mismatch, truncated file...)."""
    return SchemaError(
        f"{where}: dataset {name} cannot be read: a chunk failed its checksum or the file is "
        f"damaged ({e}). Export that part again (delete it, rerun its shard) and merge again."
    )


def read_rows(where: object, d: h5py.Dataset, a: int | None, b: int | None) -> np.ndarray:
    """Rows ``[a, b)`` of ``d`` (``a=None``: all of a scalar); a failed read names ``where``."""
    try:
        return np.asarray(d[()] if a is None else d[a:b])
    except OSError as e:
        raise read_failure(where, str(d.name).lstrip("/"), e) from None


def verify_dataset(where: object, name: str, d: h5py.Dataset) -> None:
    """Read every chunk of ``d`` once (bounded memory): fletcher32 checks each, and a failure
    raises :class:`SchemaError` naming ``where`` and the dataset."""
    if not d.shape:
        read_rows(where, d, None, None)
        return
    row = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * d.dtype.itemsize)
    step = max(1, VERIFY_BYTES // row)
    for a in range(0, d.shape[0], step):
        read_rows(where, d, a, a + step)


class PartSources:
    """The parts behind the virtual datasets of the merged file ``path`` (open as ``f``)."""

    def __init__(self, path: Path, f: h5py.File, attrs: dict[str, Any]) -> None:
        self.path, self._f, self._attrs = path, f, attrs
        self.folder = path.parent
        self._pieces: dict[str, tuple[list[guard.Piece], list[int]]] = {}
        self._open: OrderedDict[Path, h5py.File] = OrderedDict()
        self._dsets: dict[tuple[Path, str], h5py.Dataset] = {}  # of the open parts
        self._checked: dict[Path, int] = {}  # part -> its index_start, once checked
        self._checked_dsets: set[tuple[Path, str]] = set()
        self._real: dict[str, Path] = {}  # source name -> checked path, shared by all datasets

    def pieces(self, name: str) -> tuple[list[guard.Piece], list[int]]:
        """(pieces, their start rows) of virtual dataset ``name``, checked."""
        if name not in self._pieces:
            pieces = guard.virtual_pieces(self._f[name], name, self.path, self.folder, self._real)
            self._pieces[name] = (pieces, [p.start for p in pieces])
        return self._pieces[name]

    def check_present(self, name: str) -> None:
        """Every part ``name`` reads exists (libhdf5 would read a missing one as fill values)."""
        for piece in self.pieces(name)[0]:
            if not piece.path.is_file():
                raise SchemaError(
                    f"{self.path} reads its data from part {piece.file}, which is missing ({piece.path}); "
                    "virtual datasets would silently return fill values. Restore the part files "
                    "next to the merged file or merge again."
                )

    def read_into(self, requests: Sequence[tuple[str, np.ndarray, int, int]]) -> None:
        """Fill ``out[r - a]`` for rows ``r`` in ``[a, b)`` of each request ``(name, out, a, b)``,
        opening every part once for all the requests that need it."""
        plan: dict[Path, list[tuple[str, guard.Piece, np.ndarray, int, int, int]]] = {}
        for name, out, a, b in requests:
            pieces, starts = self.pieces(name)
            i = max(0, bisect.bisect_right(starts, a) - 1)
            while i < len(pieces) and pieces[i].start < b:
                p = pieces[i]
                lo, hi = max(a, p.start), min(b, p.stop)
                if lo < hi:
                    plan.setdefault(p.path, []).append((name, p, out, lo, hi, a))
                i += 1
        for path, reads in plan.items():
            src = self._source(path)
            for name, p, out, lo, hi, a in reads:
                d = self._source_dataset(path, src, name, p)
                s0 = p.src_start + lo - p.start
                try:
                    out[lo - a : hi - a] = d[s0 : s0 + hi - lo]
                except OSError as e:
                    raise read_failure(path, p.dset.lstrip("/"), e) from None

    def _source(self, path: Path) -> h5py.File:
        f = self._open.get(path)
        if f is not None:
            self._open.move_to_end(path)
            return f
        if not path.is_file():
            raise SchemaError(
                f"{self.path} reads its data from part {path.name}, which is missing ({path}); "
                "restore the part files next to the merged file or merge again"
            )
        try:
            f = h5py.File(path, "r", locking=False, rdcc_nbytes=PART_CACHE_BYTES)
        except OSError as e:
            raise SchemaError(f"part {path} of {self.path} cannot be opened ({e})") from None
        try:
            if path not in self._checked:
                self._checked[path] = self._check_part(path, f)
        except BaseException:
            f.close()
            raise
        self._open[path] = f
        while len(self._open) > MAX_OPEN_PARTS:
            old, f_old = self._open.popitem(last=False)
            self._dsets = {k: d for k, d in self._dsets.items() if k[0] != old}
            f_old.close()
        return f

    def _check_part(self, path: Path, f: h5py.File) -> int:
        """A plain, complete part of the merged file's fingerprint; returns its ``index_start``.

        Only the attributes the reader relies on are read (a full check per part would cost
        as much as its data): the merge checked the rest, and the fingerprint covers the run.
        """
        guard.check_objects(f, path, allow_virtual=False)
        S.check_version(path, f.attrs)
        attrs = S.decode_attrs({k: f.attrs[k] for k in _PART_ATTRS if k in f.attrs}, path)
        if attrs.get("kind") != S.PART_KIND or not attrs.get("complete"):
            raise SchemaError(f"{self.path} reads {path}, which is not a complete part; merge again")
        if attrs.get("fingerprint") != self._attrs["fingerprint"]:
            raise SchemaError(
                f"{self.path} reads {path}, whose fingerprint {attrs.get('fingerprint')} is not the merged "
                f"file's {self._attrs['fingerprint']}: the part was replaced by another run's. Merge again."
            )
        start = attrs.get("index_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise SchemaError(f"{path}: root attribute index_start {guard.shown(start)} is not an integer")
        return start

    def _source_dataset(self, path: Path, f: h5py.File, name: str, p: guard.Piece) -> h5py.Dataset:
        d = self._dsets.get((path, p.dset))
        if d is None:
            d = f.get(p.dset)
            if not isinstance(d, h5py.Dataset):
                raise SchemaError(f"{self.path} reads dataset {name} from {path}, which has no such dataset")
            self._dsets[path, p.dset] = d
        if (path, name) not in self._checked_dsets:
            merged = self._f[name]
            rows = p.stop - p.start
            if d.dtype != merged.dtype or d.shape[1:] != merged.shape[1:] or d.shape[0] < p.src_start + rows:
                raise SchemaError(
                    f"{path}: dataset {name} has shape {d.shape} {d.dtype}, which does not fit rows "
                    f"[{p.start}, {p.stop}) of {self.path} ({merged.shape} {merged.dtype}); merge again"
                )
            start = self._checked[path] + p.src_start
            if S.is_per_item(name) and start != int(self._attrs["index_start"]) + p.start:
                raise SchemaError(
                    f"{path} holds items from {start}, but {self.path} maps it to item "
                    f"{int(self._attrs['index_start']) + p.start}; merge again"
                )
            self._checked_dsets.add((path, name))
        return d

    def close(self) -> None:
        self._dsets.clear()
        while self._open:
            self._open.popitem()[1].close()
