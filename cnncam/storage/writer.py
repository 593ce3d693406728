"""Write one part file from a background thread; commit after every batch; resume after SIGKILL.

Files of shard ``i`` of ``n`` in ``out_dir``::

    part-0000i-of-0000n.h5                  final and complete; only ever created by os.replace
    part-0000i-of-0000n.h5.partial          being written (resumable)
    part-0000i-of-0000n.h5.partial.commit   JSON commit record {fingerprint, n_committed, n_items, extras}

Commit protocol: after each batch the writer thread sets the root attribute ``n_committed``,
flushes, fsyncs, and only then atomically replaces the commit record.  An HDF5 flush is not
atomic (a SIGKILL mid-flush can leave the attribute updated but chunks or index nodes
unwritten), so the record - written after the flush returned - is the trustworthy "these rows
are on disk" marker; the attribute is kept for h5dump users.  On restart the committed prefix is
verified (fletcher32 chunk checksums, ``samples/index`` continuity) and copied into a fresh
file, so a half-updated chunk index of the killed run never leaks into the resumed file.
Recovery (the partial and commit-record names, verifying and copying the committed prefix)
lives in :mod:`cnncam.storage.recover`; :class:`PartWriter` inherits it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

from cnncam.errors import SchemaError, choice_message
from cnncam.storage import schema as S
from cnncam.storage.batch import PartBatch, convert_extras, convert_rows
from cnncam.storage.locks import WriterLock
from cnncam.storage.recover import (
    PartRecovery,
    ResumeState,
    _write_commit,
    commit_path,
    lock_path,
    partial_path,
)

log = logging.getLogger(__name__)
_DONE = object()
_OPEN: set[Path] = set()  # partials held by live writers of this process (HDF5 locks are per process)
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class PartSpec:
    """Which slice of which run one part file holds: items ``[index_start, index_stop)``."""

    run: S.RunInfo
    shard_index: int
    num_shards: int
    index_start: int
    index_stop: int

    def __post_init__(self) -> None:
        S.shard_range(0, self.shard_index, self.num_shards)  # validates the shard numbers
        if not 0 <= self.index_start <= self.index_stop:
            raise SchemaError(f"part range [{self.index_start}, {self.index_stop}) is invalid")

    @classmethod
    def for_shard(cls, run: S.RunInfo, n_total: int, shard_index: int, num_shards: int) -> PartSpec:
        return cls(run, shard_index, num_shards, *S.shard_range(n_total, shard_index, num_shards))

    @property
    def n_items(self) -> int:
        return self.index_stop - self.index_start

    @property
    def filename(self) -> str:
        return S.part_filename(self.shard_index, self.num_shards)


class PartWriter(PartRecovery):
    """Writes the batches of one shard to its part file from a background thread.

    Use :meth:`open_or_resume`, ``put`` batches from ``state.next_index`` on, then ``close()``.
    ``put`` blocks only while ``queue_size`` batches wait for the disk; an error in the writer
    thread is raised by the next ``put``/``close``.  As a context manager, an exception in the
    producer stops the thread after its current batch and keeps the partial file resumable.
    """

    def __init__(
        self, out_dir: Path, spec: PartSpec, *, batch_size: int, queue_size: int = 4, durable: bool = True
    ) -> None:
        if batch_size < 1 or queue_size < 1:
            raise SchemaError(f"batch_size and queue_size must be >= 1, got {batch_size} and {queue_size}")
        self.spec, self.durable = spec, durable
        self.path = Path(out_dir) / spec.filename
        self.partial, self.commit = partial_path(self.path), commit_path(self.path)
        self.commit_rows = max(1, min(batch_size, spec.n_items))  # = rows per chunk (or a multiple)
        self.fingerprint = spec.run.fingerprint()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._f: h5py.File | None = None
        self._fd: int | None = None
        self._layout: S.Layout = {}
        self._closed = self._finalized = False
        self._committed, self._inode = 0, -1
        self._done_extras: tuple[str, ...] = ()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _OPEN_LOCK:
            if self.partial.resolve() in _OPEN:
                raise SchemaError(f"{self.partial} is already open in a writer of this process")
            _OPEN.add(self.partial.resolve())
        # A process lock, not libhdf5's flock: forked DataLoader workers must never hold it.
        self._lock = WriterLock(lock_path(self.path))
        try:
            if not self._lock.try_acquire():
                raise SchemaError(f"{self.partial} is being written by another process; not touching it")
            self.state = self._prepare()
        except BaseException:
            self._shutdown()
            raise
        self._next = self.state.next_index
        self._extras = set(self.state.extras)
        self._thread = threading.Thread(target=self._run, name=f"cnncam-h5-{self.path.name}", daemon=True)
        if self.state.done:
            self._shutdown()
        else:
            self._thread.start()

    @classmethod
    def open_or_resume(
        cls, out_dir: Path, spec: PartSpec, *, batch_size: int, queue_size: int = 4, durable: bool = True
    ) -> PartWriter:
        """Open the part, keeping a verified committed prefix; ``.state`` says where to go on.

        Raises :class:`SchemaError` when the partial or final file belongs to another fingerprint.
        """
        return cls(out_dir, spec, batch_size=batch_size, queue_size=queue_size, durable=durable)

    # -- producer side ---------------------------------------------------------------------

    def put(self, batch: PartBatch | dict[str, Any]) -> None:
        """Queue one batch (items ``next_index ...``); arrays are copied, so buffers may be reused."""
        self._check_open()
        rows = batch.rows() if isinstance(batch, PartBatch) else convert_rows(batch)
        n = self._check_rows(rows)
        if n:
            self._enqueue(("rows", rows))
            self._next += n

    def put_extras(
        self,
        *,
        activations: dict[str, np.ndarray] | None = None,
        activation_index: np.ndarray | None = None,
        first_conv: np.ndarray | None = None,
    ) -> None:
        """Queue once-per-part data: activations ``{layer: (M, C', h, w)}`` of the items with global
        indices ``activation_index`` (M,), and the first conv layer's filters ``(O, I, kh, kw)``."""
        self._check_open()
        rows = convert_extras(activations, activation_index, first_conv)
        idx = rows.get(S.ACTIVATIONS_INDEX)
        lo, hi = self.spec.index_start, self.spec.index_stop
        if idx is not None and idx.size and (idx.min() < lo or idx.max() >= hi):
            raise SchemaError(
                f"activation_index must lie in this part's range [{lo}, {hi}), got {idx.min()}..{idx.max()}"
            )
        again = sorted(set(rows) & self._extras)
        if again:
            raise SchemaError(f"{self.partial}: {', '.join(again)} already written (see state.extras)")
        self._extras |= set(rows)
        self._enqueue(("extras", rows))

    def close(self) -> Path:
        """Wait until every queued batch is committed, mark complete, rename to the final name."""
        if self.state.done or self._finalized:
            return self.path
        self._check_open()
        if self._next != self.spec.index_stop:
            self.abort()
            raise SchemaError(
                f"{self.partial}: only items [{self.spec.index_start}, {self._next}) of "
                f"[{self.spec.index_start}, {self.spec.index_stop}) were put; the partial file "
                "is kept and the next run resumes it"
            )
        self._enqueue(_DONE)
        self._thread.join()
        self._raise_if_failed()
        self._finalize()
        return self.path

    def abort(self) -> None:
        """Stop the thread after its current batch (queued ones are dropped); keep the partial."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._shutdown()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close() if et is None else self.abort()

    def _check_open(self) -> None:
        if self.state.done:
            raise SchemaError(f"{self.path} is already complete; nothing to write (check state.done)")
        self._raise_if_failed()
        if self._closed:
            raise SchemaError(f"the writer of {self.partial} was aborted or closed; open a new one to resume")

    def _check_rows(self, rows: dict[str, np.ndarray]) -> int:
        need = [S.INDEX, S.PATH, *(S.sample_path(k) for k in ("label", "pred", "logits", "targets"))]
        missing = [p for p in need if p not in rows]
        if missing or not any(p.startswith(S.CAMS + "/") for p in rows):
            raise SchemaError(f"a batch needs {', '.join(missing) or 'at least one cams/<method>/<layer>'}")
        n = len(rows[S.INDEX])
        for name, arr in rows.items():
            self._check_name(name)
            if arr.shape[0] != n:
                raise SchemaError(f"{name} has {arr.shape[0]} rows but samples/index has {n}")
        layout = {k: (v.shape[1:], v.dtype) for k, v in rows.items()}
        if self._layout and layout != self._layout:
            raise SchemaError(
                S.layout_diff("this batch", layout, f"the first batch of {self.partial}", self._layout)
            )
        self._layout = layout
        if not np.array_equal(rows[S.INDEX], np.arange(self._next, self._next + n)):
            raise SchemaError(
                f"batch samples/index must continue at {self._next} (contiguous, ascending); "
                f"got {rows[S.INDEX][:5].tolist()}..."
            )
        if self._next + n > self.spec.index_stop:
            raise SchemaError(
                f"batch ends at item {self._next + n}, past this part's end {self.spec.index_stop}"
            )
        if n and n != self.commit_rows and self._next + n != self.spec.index_stop:
            raise SchemaError(
                f"every batch but the last must have batch_size={self.commit_rows} rows (chunks "
                f"are aligned to commits); got {n}"
            )
        return n

    def _check_name(self, name: str) -> None:
        parts, run = name.split("/"), self.spec.run
        if parts[0] in (S.CAMS, S.UPSAMPLED, S.METRICS):
            if parts[1] not in run.methods:
                raise SchemaError(f"{name}: " + choice_message("method for this run", parts[1], run.methods))
            if parts[2] not in run.layers:
                raise SchemaError(f"{name}: " + choice_message("layer for this run", parts[2], run.layers))

    def _enqueue(self, item: Any) -> None:
        while True:  # timed puts: a dead writer thread surfaces its error instead of hanging us
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise SchemaError(f"the writer thread of {self.partial} has stopped")
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._shutdown()
            raise self._error

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                self._write(*item)
                self._commit_batch()
        except BaseException as e:  # re-raised in the producer by put()/close()
            if hasattr(e, "add_note"):
                e.add_note(f"(raised in the HDF5 writer thread of {self.partial})")
            self._error = e

    def _write(self, kind: str, rows: dict[str, np.ndarray]) -> None:
        assert self._f is not None
        if kind == "extras":
            for name, arr in rows.items():
                kwargs = S.dataset_kwargs(name, arr.shape[1:], len(arr), None)
                self._f.create_dataset(name, **kwargs)[...] = arr
            self._done_extras = (*self._done_extras, *rows)
            return
        n0, n = self._committed, len(rows[S.INDEX])
        for name, arr in rows.items():
            d = self._f.get(name)
            if d is None:
                d = self._f.create_dataset(name, **S.dataset_kwargs(name, arr.shape[1:], 0, self.commit_rows))
            d.resize(n0 + n, axis=0)
            d[n0 : n0 + n] = arr
        self._committed = n0 + n

    def _commit_batch(self) -> None:
        assert self._f is not None
        self._f.attrs["n_committed"] = np.int64(self._committed)
        self._f.flush()
        if self._fd is not None:
            os.fsync(self._fd)
        _write_commit(
            self.commit,
            {
                "fingerprint": self.fingerprint,
                "n_committed": self._committed,
                "n_items": self.spec.n_items,
                "extras": sorted(self._done_extras),
            },
        )

    # -- opening, resuming, finishing --------------------------------------------------------

    def _prepare(self) -> ResumeState:
        sp = self.spec
        if self.path.exists():
            self._check_final()
            log.info("%s is already complete; nothing to do", self.path)
            if not self.partial.exists():  # killed between the final rename and this cleanup
                self.commit.unlink(missing_ok=True)
            return ResumeState("complete", self.path, sp.index_stop, sp.n_items, ())
        existed = self.partial.exists()
        kept = self._recover() if existed else None
        status: Literal["new", "resumed", "restarted"] = (
            "resumed" if kept else "restarted" if existed else "new"
        )
        if kept is None:
            self.commit.unlink(missing_ok=True)
            self._rebuild(None, 0, (), S.utc_now())
        self._committed, self._done_extras = kept or (0, ())
        self._f = h5py.File(self.partial, "r+", libver=S.LIBVER, locking=False)
        self._f.attrs.update({k: v for k, v in S.run_attrs(sp.run)[0].items() if k.startswith("slurm_")})
        self._fd = os.open(self.partial, os.O_RDONLY) if self.durable else None
        self._inode = os.stat(self.partial).st_ino
        self._layout = {
            k: (d.shape[1:], d.dtype) for k, d in S.list_datasets(self._f).items() if S.is_per_item(k)
        }
        self._commit_batch()
        if status != "new":
            log.info(
                "%s: %s at item %d of [%d, %d)",
                self.partial,
                status,
                sp.index_start + self._committed,
                sp.index_start,
                sp.index_stop,
            )
        return ResumeState(
            status, self.path, sp.index_start + self._committed, self._committed, self._done_extras
        )

    def _finalize(self) -> None:
        assert self._f is not None
        self._f.attrs["complete"] = np.int8(1)
        self._f.flush()
        self._shutdown(keep_lock=True)  # closes and fsyncs: "complete" is on disk before the rename
        if os.stat(self.partial).st_ino != self._inode:  # never publish another process's file
            self._lock.release()
            raise SchemaError(f"{self.partial} was replaced by another process while being written")
        os.replace(self.partial, self.path)
        self._finalized = True
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            fd = os.open(self.path.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        self.commit.unlink(missing_ok=True)
        self._lock.release(remove=True)

    def _shutdown(self, keep_lock: bool = False) -> None:
        self._closed = True
        with _OPEN_LOCK:
            _OPEN.discard(self.partial.resolve())
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception as e:  # a failing file must not hide the error that brought us here
                log.warning("closing %s failed: %s", self.partial, e)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)
        if not keep_lock:
            self._lock.release()
