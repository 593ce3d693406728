"""Resuming a part after a kill: where it stands, its partial and commit-record files, the rebuild.

Moved out of :mod:`cnncam.storage.writer` (whose docstring describes the files and the commit
protocol) to keep the writer short.  :class:`PartRecovery` holds the :class:`PartWriter` methods
that check an existing final file, verify a partial's committed prefix (fletcher32 checksums,
``samples/index`` continuity) and copy it into a fresh partial that is swapped in atomically.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage import schema as S

if TYPE_CHECKING:  # annotations only: writer imports this module at run time
    from cnncam.storage.writer import PartSpec

log = logging.getLogger(__name__)
COPY_BYTES = 64 << 20  # rows copied per read when resuming (bounded memory)


@dataclass(frozen=True)
class ResumeState:
    """Where a part stands when its writer opens; the producer continues from ``next_index``.

    status: ``new`` (nothing on disk), ``resumed`` (committed prefix kept), ``restarted`` (an
    unusable partial was discarded) or ``complete`` (the final file exists: nothing to do).
    """

    status: Literal["new", "resumed", "restarted", "complete"]
    path: Path
    next_index: int
    n_committed: int
    extras: tuple[str, ...]  # activation/filter datasets already committed

    @property
    def done(self) -> bool:
        return self.status == "complete"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def commit_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial.commit")


def lock_path(final: Path) -> Path:
    """The writer's lock file (:class:`cnncam.storage.locks.WriterLock`); removed once final."""
    return final.with_name(final.name + ".lock")


def read_commit(path: Path) -> dict[str, Any] | None:
    """The commit record, or None when absent or unreadable (then nothing counts as committed)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("n_committed"), int) else None


def _write_commit(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")  # one writer per part: a fixed temp name never litters
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PartRecovery:
    """Mixin of :class:`~cnncam.storage.writer.PartWriter`: its checks of the final file and its
    recovery of a partial file; uses the writer's attributes below."""

    spec: PartSpec
    path: Path
    partial: Path
    commit: Path
    fingerprint: str
    commit_rows: int

    def _check_final(self) -> None:
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                attrs = S.decode_attrs(f.attrs)
        except OSError as e:
            raise SchemaError(
                f"{self.path} exists but cannot be opened ({e}); delete it to recompute"
            ) from None
        S.check_version(self.path, attrs)
        if attrs.get("fingerprint") != self.fingerprint:
            raise SchemaError(_foreign(self.path, attrs.get("fingerprint"), self.fingerprint))
        want = (True, self.spec.index_start, self.spec.index_stop)
        if (attrs.get("complete"), attrs.get("index_start"), attrs.get("index_stop")) != want:
            raise SchemaError(
                f"{self.path} is not a complete part for items [{want[1]}, {want[2]}); delete it"
            )

    def _recover(self) -> tuple[int, tuple[str, ...]] | None:
        """Keep the verified committed prefix of the partial; None = start over. Raises when foreign."""
        kept, why = self._try_recover()
        if why:  # content is deterministic: starting over gives the identical file, so warn only
            msg = f"{self.partial} {why}; starting this part over"
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            log.warning(msg)
        return kept

    def _try_recover(self) -> tuple[tuple[int, tuple[str, ...]] | None, str | None]:
        record = read_commit(self.commit)
        try:  # the writer holds the part's lock: no other live process writes this file
            src = h5py.File(self.partial, "r", locking=False)
        except OSError as e:
            return None, f"cannot be opened ({e})"
        with src:
            try:
                attrs = S.decode_attrs(src.attrs, self.partial)
            except SchemaError as e:
                return None, f"has damaged attributes ({e})"
            found = attrs.get("fingerprint")
            if found is None:
                return None, "has no fingerprint (killed while being created)"
            if found != self.fingerprint:
                committed = record["n_committed"] if record and record.get("fingerprint") == found else None
                if committed == 0 or (committed is None and not attrs.get("n_committed")):
                    # Nothing of value: e.g. the empty part of a run refused with bad targets.
                    return None, f"belongs to another config ({found}) but holds no committed rows"
                raise SchemaError(_foreign(self.partial, found, self.fingerprint))
            if record is None or record.get("fingerprint") != found or record["n_committed"] <= 0:
                lost = attrs.get("n_committed", 0) > 0  # warn only if committed-looking rows are dropped
                return None, "has no matching commit record" if lost else None
            n, extras = int(record["n_committed"]), tuple(record.get("extras", ()))
            problem = _resume_problem(attrs, n, self.spec, self.commit_rows)
            if problem:
                return None, problem
            try:
                self._rebuild(src, n, extras, str(attrs.get("created_utc", S.utc_now())))
            except (OSError, KeyError, ValueError, SchemaError) as e:
                return None, f"is corrupt ({e})"
        return (n, extras), None

    def _rebuild(self, src: h5py.File | None, n: int, extras: tuple[str, ...], created: str) -> None:
        """Build a fresh partial (holding the first ``n`` rows of ``src``) and swap it in atomically."""
        tmp, sp = self.partial.with_name(self.partial.name + ".new"), self.spec
        attrs, big_config = S.run_attrs(sp.run)
        with h5py.File(tmp, "w", libver=S.LIBVER, locking=False) as dst:
            dst.attrs.update(attrs)
            dst.attrs.update(
                {
                    "kind": S.PART_KIND,
                    "complete": np.int8(0),
                    "n_items": np.int64(sp.n_items),
                    "n_committed": np.int64(n),
                    "commit_rows": np.int64(self.commit_rows),
                    "shard_index": np.int64(sp.shard_index),
                    "num_shards": np.int64(sp.num_shards),
                    "index_start": np.int64(sp.index_start),
                    "index_stop": np.int64(sp.index_stop),
                    "created_utc": created,
                }
            )
            if big_config is not None:
                dst.create_dataset(S.META_CONFIG, data=big_config, dtype=S.dtype_for(S.META_CONFIG))
            if src is not None:
                _copy_prefix(src, dst, n, extras, self.commit_rows)
                if n and not np.array_equal(dst[S.INDEX][:], np.arange(sp.index_start, sp.index_start + n)):
                    raise SchemaError(f"samples/index is not {sp.index_start}..{sp.index_start + n - 1}")
        os.replace(tmp, self.partial)


def _resume_problem(a: dict[str, Any], n: int, spec: PartSpec, commit_rows: int) -> str | None:
    if (a.get("index_start"), a.get("index_stop")) != (spec.index_start, spec.index_stop):
        got = f"[{a.get('index_start')}, {a.get('index_stop')})"
        return f"covers {got}, not [{spec.index_start}, {spec.index_stop})"
    if a.get("commit_rows") != commit_rows:
        return f"was written with batch_size {a.get('commit_rows')}, not {commit_rows}"
    if a.get("n_committed", -1) < n:
        return f"records n_committed={a.get('n_committed')} < {n} in its commit record"
    return None


def _copy_prefix(src: h5py.File, dst: h5py.File, n: int, extras: tuple[str, ...], commit_rows: int) -> None:
    """Copy the first ``n`` rows of every per-item dataset and the committed extras; fletcher32
    checks every chunk read, so a damaged committed chunk raises instead of being copied."""
    for name, d in S.list_datasets(src).items():
        if S.is_per_item(name):
            if d.shape[0] < n:
                raise SchemaError(f"{name} has {d.shape[0]} rows, fewer than the {n} committed")
            out = dst.create_dataset(name, **S.dataset_kwargs(name, d.shape[1:], n, commit_rows))
            step = max(commit_rows, COPY_BYTES // max(1, d.dtype.itemsize * int(np.prod(d.shape[1:]))))
            for a in range(0, n, step):
                out[a : min(a + step, n)] = d[a : min(a + step, n)]
        elif name in extras:
            dst.create_dataset(name, **S.dataset_kwargs(name, d.shape[1:], d.shape[0], None))[...] = d[...]


def _foreign(path: Path, found: Any, expected: str) -> str:
    return (
        f"{path} belongs to another run/config/checkpoint/split (fingerprint {found}, this run has "
        f"{expected}); refusing to overwrite it. Use another output folder or delete the file."
    )
