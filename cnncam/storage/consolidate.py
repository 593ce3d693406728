"""A merged file that holds its data: the parts copied into one physical, checksummed file.

Virtual datasets are cheap to build but every reader other than cnncam's pays for them: libhdf5
keeps each source open (past ``ulimit -n`` the rest reads as fill values, h5py #1597/#2155),
opens thousands of sources slowly, and reads through them several times slower than from a plain
dataset.  A consolidated ``cams.h5`` has the same paths, dtypes, chunking rules, filters and root
attributes as a virtual one (``kind = merged``), plus ``consolidated = 1`` and ``parts = []``
(the part names stay in ``part_provenance``), so it moves and is shared on its own.

The copy goes window by window (bounded memory; a chunk cache holds the output chunks that a
window fills only partly), every part chunk read is checked by fletcher32 on the way, and the
result is read back and checked (every chunk, ``samples/index``) before ``merge_parts`` publishes
it with ``os.replace``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage import schema as S
from cnncam.storage.sources import read_rows, verify_dataset

if TYPE_CHECKING:
    from cnncam.storage.merge import Part

COPY_BYTES = 64 << 20  # rows copied per read (bounded memory)
# Rows per chunk (at most ~1 MiB each, schema.chunk_rows): the parts' own chunks follow their
# batch size, which may be tiny (a 1-item part has 1-row chunks); a copy is never appended to.
CHUNK_ROWS = 1024
OUT_CACHE_BYTES = 64 << 20  # chunk cache of the output file: partly filled chunks stay in memory


def write_consolidated(tmp: Path, parts: list[Part], write_attrs: Callable[[h5py.File], None]) -> None:
    """Write the consolidated file ``tmp`` from the checked ``parts`` (sorted, covering [0, N));
    ``write_attrs`` writes the merged file's root attributes (``merge.merged_attrs``)."""
    filled = [p for p in parts if p.stop > p.start]
    with h5py.File(tmp, "w", libver=S.LIBVER, locking=False, rdcc_nbytes=OUT_CACHE_BYTES) as f:
        write_attrs(f)
        f.attrs.update({"parts": json.dumps([]), "consolidated": np.int8(1)})
        if filled:
            _copy(f, filled, parts[-1].stop, CHUNK_ROWS)
        f.flush()
    with h5py.File(tmp, "r", locking=False) as f:  # read back: every chunk, and the index
        for name, d in S.list_datasets(f).items():
            verify_dataset(tmp, name, d)
        n = parts[-1].stop
        if n and not np.array_equal(f[S.INDEX][:], np.arange(n)):
            raise SchemaError(f"{tmp}: samples/index does not read 0..{n - 1} after copying; not published")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(f: h5py.File, filled: list[Part], n_total: int, chunk_rows: int) -> None:
    """Copy the parts in order, each opened once; rows are gathered in memory (at most
    :data:`COPY_BYTES`) and written in large sequential blocks, whole chunks at a time."""
    ref = filled[0]
    per_item = ref.tails(True)
    extras = {k: v for k, v in ref.tails(False).items() if k != S.FILTERS_FIRST_CONV}
    for name, (tail, _) in per_item.items():
        f.create_dataset(name, **S.dataset_kwargs(name, tail, n_total, chunk_rows))
    for name, (tail, _) in extras.items():
        rows = sum(p.shapes[name][0][0] for p in filled)
        f.create_dataset(name, **S.dataset_kwargs(name, tail, rows, None))
    outs = [_Out(f[name]) for name in (*per_item, *extras)]
    for p in filled:
        with h5py.File(p.path, "r", locking=False) as src:
            for out in outs:
                d = src[out.d.name]
                row = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * d.dtype.itemsize)
                step = max(1, COPY_BYTES // row)
                for a in range(0, d.shape[0], step):
                    out.add(read_rows(f"part {p.path}", d, a, a + step))
                    if sum(o.nbytes for o in outs) >= COPY_BYTES:
                        for o in outs:
                            o.flush()
    for out in outs:
        out.flush()
    with_filters = [p for p in filled if S.FILTERS_FIRST_CONV in p.shapes]
    if with_filters:  # small and identical in every part: copied from the first that has them
        with h5py.File(with_filters[0].path, "r", locking=False) as src:
            w = read_rows(f"part {with_filters[0].path}", src[S.FILTERS_FIRST_CONV], 0, None)
        kw = S.dataset_kwargs(S.FILTERS_FIRST_CONV, w.shape[1:], len(w), None)
        f.create_dataset(S.FILTERS_FIRST_CONV, **kw)[...] = w


class _Out:
    """One output dataset written front to back from blocks gathered in memory."""

    def __init__(self, d: h5py.Dataset) -> None:
        self.d, self.at, self.nbytes = d, 0, 0
        self.pending: list[np.ndarray] = []

    def add(self, block: np.ndarray) -> None:
        self.pending.append(block)
        self.nbytes += block.nbytes

    def flush(self) -> None:
        if self.pending:
            data = np.concatenate(self.pending)
            self.d[self.at : self.at + len(data)] = data
            self.at += len(data)
        self.pending, self.nbytes = [], 0
