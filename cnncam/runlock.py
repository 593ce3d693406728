"""The run lock: a run folder is trained by one process at a time, and never exported while trained.

Modes (taken per job by :mod:`cnncam.launch.tasks`, see ``docs/slurm.md``)::

    train              exclusive   nothing else may use the run
    cam shard, merge   shared      any number at once (a job array exports one run in parallel)
    report             none        it only reads, and replaces its own files atomically

The lock is a POSIX record lock (``fcntl.lockf``) on ``<run>/.lock``.  Not ``flock``: a forked
DataLoader worker inherits ``flock`` locks and keeps them for seconds after its parent was
killed, which blocked the next start; POSIX locks belong to the process and die with it, so a
killed job never leaves a lock behind.  Who holds it is written beside it, one JSON file per
holder in ``<run>/.lock.holders/`` (host, pid, job id, mode, purpose, since), for the error the
next user gets.  Where the file system has no locks, a warning is logged and only those files
are checked (best effort).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from cnncam.errors import CnncamError
from cnncam.runs import atomic_write_json

log = logging.getLogger(__name__)

LockMode = Literal["exclusive", "shared"]
LOCK_FILE = ".lock"
HOLDERS_DIR = ".lock.holders"
# errno of file systems without POSIX locks (NFS without lockd, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunBusyError(CnncamError):
    """Another process uses the run folder in a way that excludes this one."""


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a finished child not yet reaped still passes ``kill -0``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def job_identity(env: Mapping[str, str] = os.environ) -> str | None:
    """This job as ``status`` shows it (``13_2``, ``local 4711``) and its restart; None outside jobs."""
    if "SLURM_JOB_ID" in env:
        array = env.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{env.get('SLURM_ARRAY_TASK_ID')}" if array else env["SLURM_JOB_ID"]
        restarts = env.get("SLURM_RESTART_COUNT", "0")
        return job if restarts in ("", "0") else f"{job} restart {restarts}"
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        return f"local {env['SUBMITIT_LOCAL_JOB_ID']}"
    return None


def global_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank in its job (torch's, Slurm's or submitit-local's variable)."""
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    job: str | None
    mode: str
    purpose: str
    since: str

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"{self.purpose} ({self.mode}) by pid {self.pid} on {self.host}{job} since {self.since}"

    def stale(self) -> bool:
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def _holder_files(root: Path) -> list[tuple[Path, LockHolder | None]]:
    """Every holder file and what it says (None: not a holder record).

    The files are run-folder content, possibly foreign: read bounded, as plain JSON.
    """
    folder = Path(root) / HOLDERS_DIR
    out: list[tuple[Path, LockHolder | None]] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            with path.open("rb") as f:
                raw = json.loads(f.read(4096))
            job = raw.get("job")
            holder = LockHolder(
                str(raw["host"])[:100],
                int(raw["pid"]),
                None if job is None else str(job)[:100],
                str(raw["mode"])[:20],
                str(raw["purpose"])[:40],
                str(raw["since"])[:40],
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            holder = None
        out.append((path, holder))
    return out


def read_holders(root: Path) -> list[LockHolder]:
    """The recorded holders of the run's lock, without dead processes of this host."""
    return [h for _, h in _holder_files(root) if h is not None and not h.stale()]


class RunLock:
    """The lock of one run folder in one mode; a context manager (see the module docstring)."""

    # POSIX locks never conflict within one process, and closing any descriptor of the file drops
    # them: so this process opens the file once and counts its holds here.
    _held: ClassVar[dict[Path, list[int | str]]] = {}  # lock file -> [fd, mode, count]

    def __init__(self, root: Path, mode: LockMode, purpose: str) -> None:
        self.root, self.mode, self.purpose = Path(root), mode, purpose
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.holder = LockHolder(socket.gethostname(), os.getpid(), job_identity(), mode, purpose, since)

    @property
    def path(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def holder_file(self) -> Path:
        return self.root / HOLDERS_DIR / f"{self.holder.host}-{self.holder.pid}.json"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if self.mode == "shared" and self.root.is_dir() and not os.access(self.root, os.W_OK):
            # Exporting someone else's run into your own cam.out: there is no lock to share.
            log.warning("run folder %s is read-only: %s runs without the run lock", self.root, self.purpose)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        held = RunLock._held.get(key)
        if held is not None:
            if "exclusive" in (held[1], self.mode):
                mine = dataclasses.replace(self.holder, mode=str(held[1]), purpose="another task")
                raise self._busy([mine])
            held[2] = int(held[2]) + 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            self._lock(fd)
            self._record()
        except BaseException:
            os.close(fd)  # drops the lock too, if it was taken
            raise
        RunLock._held[key] = [fd, self.mode, 1]

    def release(self) -> None:
        key = self.path.resolve()
        held = RunLock._held.get(key)
        if held is None:
            return
        held[2] = int(held[2]) - 1
        if int(held[2]) > 0:
            return
        del RunLock._held[key]
        try:
            self.holder_file.unlink(missing_ok=True)
        finally:
            os.close(int(held[0]))

    def _lock(self, fd: int) -> None:
        op = (fcntl.LOCK_EX if self.mode == "exclusive" else fcntl.LOCK_SH) | fcntl.LOCK_NB
        try:
            fcntl.lockf(fd, op)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise self._busy(read_holders(self.root)) from None
            log.warning("%s: this file system has no locks (%s); checking holder files only", self.path, e)
            rivals = [h for h in read_holders(self.root) if "exclusive" in (h.mode, self.mode)]
            if rivals:
                raise self._busy(rivals) from None

    def _record(self) -> None:
        # We hold the lock: files of holders in a conflicting mode (and of dead ones) are leftovers.
        for path, old in _holder_files(self.root):
            if old is None or old.stale() or "exclusive" in (old.mode, self.mode):
                path.unlink(missing_ok=True)
        atomic_write_json(self.holder_file, dataclasses.asdict(self.holder))

    def _busy(self, holders: list[LockHolder]) -> RunBusyError:
        who = (
            "; ".join(h.describe() for h in holders) or f"another process (no holder file in {HOLDERS_DIR}/)"
        )
        need = "alone" if self.mode == "exclusive" else "while it is trained"
        return RunBusyError(
            f"run folder {self.root} is in use: {who}. {self.purpose} cannot use it {need}; wait for "
            f"that job to end or cancel it (launch.py cancel --run {self.root})"
        )


@contextlib.contextmanager
def hold_run(root: Path, mode: LockMode, purpose: str, wait_s: float = 120.0) -> Iterator[None]:
    """Hold the run lock for one job: rank 0 takes it; the job's other ranks check that it did.

    The other ranks wait (up to ``wait_s``) until a holder file names their own job.  When rank 0
    was refused they give up with an error instead of waiting for a rendezvous that never comes.
    """
    if global_rank() == 0:
        with RunLock(root, mode, purpose):
            yield
        return
    me = job_identity()
    deadline = time.monotonic() + wait_s
    while me is not None and not any(h.job == me for h in read_holders(root)):
        if time.monotonic() > deadline:
            who = "; ".join(h.describe() for h in read_holders(root)) or "nobody"
            raise RunBusyError(
                f"rank 0 of job {me} did not get the lock of run folder {root}; held by: {who}"
            )
        time.sleep(0.2)
    yield
