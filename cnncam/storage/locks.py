"""Lock files for the part writer and the merge.

A part writer runs next to DataLoader workers that ``fork`` from it.  ``flock`` locks (what libhdf5
takes with ``locking=True``) and Linux's open-file-description locks belong to the open file,
which a forked child shares: after a SIGKILL of the exporter its workers kept the lock for up to
five seconds (their parent-death check), and the re-run was refused with "being written by
another process".  :class:`WriterLock` therefore takes a classic POSIX record lock
(``fcntl.lockf``), which belongs to the process: children never hold it and the kernel releases
it the moment the process dies.  (Its known trap, that closing *any* descriptor of the file drops
the lock, does not apply: the lock file is opened once, by the lock.)

:func:`merge_lock` serialises merges into one folder with ``flock`` on a fresh descriptor, which
also orders threads of one process; a merge forks nothing.  Where the file system has no locks
(``ENOLCK``, ``EOPNOTSUPP``) both degrade to no lock, with a warning, rather than failing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WriterLock:
    """An exclusive POSIX record lock on ``path``, held by this process only (never by children)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock; False when another live process holds it.  Without lock support: True."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                return False
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            log.warning(
                "%s: the file system has no locks (%s); two writers would not be noticed", self.path, e
            )
        self._fd = fd
        return True

    def release(self, remove: bool = False) -> None:
        """Drop the lock; ``remove`` also deletes the lock file (done once the part is final)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def merge_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (waiting for it); yields False without lock support."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            log.warning("%s: the file system has no locks (%s); merging without one", path, e)
            locked = False
        yield locked
    finally:
        os.close(fd)
