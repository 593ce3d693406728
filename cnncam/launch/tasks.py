"""The callables submitit pickles and runs on the node: train, CAM shard, merge, report.

Each task holds only its (small, frozen) config; the entry points are imported inside
``run`` so the pickle stays small and the node imports the code it runs.  State lives in
the run directory, never in the pickle (fairchem#1055): ``checkpoint()`` returns a *fresh*
task with the same config, which resumes from ``checkpoints/last.pt`` when requeued.

Preemption (issue #4, point 4).  submitit installs its USR2 handler before calling us; we
keep it (``signal.getsignal``) and install our own for USR2 and SIGTERM that only sets the
:class:`~cnncam.stop.StopFlag` — heavy I/O inside a signal handler can deadlock or tear files
(Lightning #21406).  The work loop notices the flag at its next step boundary, writes its
checkpoint and returns "interrupted".  Then:

* USR2 (``--signal`` before the time limit, or a preemption): rank 0 calls submitit's saved
  handler, which calls ``checkpoint()``, dumps the fresh task, runs ``scontrol requeue`` and
  exits; other ranks exit without a result.  When that requeue fails (``scontrol`` missing on
  the node, or refused), the task fails with :class:`RequeueFailed` in its state file, which
  ``status`` turns into "checkpointed, but not requeued: resume by hand".
* SIGTERM (``scontrol requeue`` or ``scancel``): Slurm itself requeues or cancels the job,
  so every rank just exits without writing a result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from cnncam.config import RunConfig
from cnncam.errors import LaunchError
from cnncam.launch import submitit_api as S
from cnncam.runlock import hold_run
from cnncam.runlock import pid_alive as pid_alive
from cnncam.runs import atomic_write_json
from cnncam.stop import StopFlag

log = logging.getLogger(__name__)

TERMINATED_EXIT = 128 + signal.SIGTERM
# Set by the launcher at submission (kept by Slurm across requeues): the code snapshot this job
# must import cnncam from.
CODE_ENV = "CNNCAM_CODE"


class RequeueFailed(LaunchError):
    """The checkpoint is on disk, but the job could not put itself back in the queue."""


def check_code_snapshot(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Refuse to work with other code than the snapshot this job was submitted with.

    The launcher puts the snapshot first on PYTHONPATH and starts Python with ``-P``; on Python
    3.10 (no ``-P``) a ``cnncam`` folder in the job's working directory would still win.
    """
    expected = env.get(CODE_ENV)
    if not expected:
        return
    from cnncam.launch.snapshot import source_root

    here = source_root()
    if here.resolve() != Path(expected).resolve():
        raise LaunchError(
            f"this job imports cnncam from {here}, not from the code snapshot it was submitted with "
            f"({expected}); submit from another directory than a cnncam checkout, use Python >= 3.11, "
            "or set slurm.snapshot_code=false"
        )


class StopHandlers:
    """Route USR2/SIGTERM into a StopFlag; after the loop stopped, requeue or exit."""

    def __init__(self, stop: StopFlag) -> None:
        self.stop = stop
        self.usr = S.requeue_signal()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        self.saved_usr = signal.getsignal(self.usr)
        self.signum: int | None = None
        signal.signal(self.usr, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flip flags here: no logging, no I/O (Lightning #21406).
        self.signum = signum
        self.stop.request(f"received {signal.Signals(signum).name}")

    def finish_interrupted(self) -> None:
        """Called once the work loop returned "interrupted" (its checkpoint is on disk)."""
        if self.signum == self.usr and callable(self.saved_usr):
            # Rank 0: checkpoint() + requeue + sys.exit.  Other ranks: it logs and returns.
            try:
                self.saved_usr(self.usr, None)
            except (OSError, subprocess.SubprocessError) as e:  # `scontrol requeue` missing or refused
                raise RequeueFailed(f"checkpoint saved, but the job could not requeue itself: {e}") from None
            raise SystemExit(0)
        raise SystemExit(TERMINATED_EXIT)


def export_local_dist_env(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Map submitit's local-executor task ids to torch's RANK/WORLD_SIZE/MASTER_* variables.

    Under Slurm the training code reads SLURM_PROCID/SLURM_NTASKS itself; the local executor
    only sets SUBMITIT_LOCAL_*, so several local tasks would each think they are alone.
    """
    if env.get("SUBMITIT_EXECUTOR") != "local" or "RANK" in env:
        return
    ntasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if ntasks <= 1:
        return
    job_id = int(env.get("SUBMITIT_LOCAL_JOB_ID", "0"))
    env.update(
        RANK=env.get("SUBMITIT_LOCAL_GLOBALID", "0"),
        LOCAL_RANK=env.get("SUBMITIT_LOCAL_LOCALID", "0"),
        WORLD_SIZE=str(ntasks),
        MASTER_ADDR="127.0.0.1",
        # Seeded by the job id, like submitit and DINOv2, so two local jobs do not collide.
        MASTER_PORT=str(20000 + job_id % 40000),
    )


# ----------------------------------------------------------------------------------------------
# Task state: plain JSON the task writes itself, so that `status` never unpickles a result.

TASK_STATES = ("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED")


def state_file(folder: Path, job_id: str, rank: int = 0) -> Path:
    """``<submitit folder>/<job id>_<rank>_state.json``, beside submitit's logs."""
    return Path(folder) / f"{job_id}_{rank}_state.json"


@dataclass(frozen=True)
class TaskState:
    """What a task wrote about itself: its state, and the error that ended it."""

    state: str
    error: str = ""
    host: str = ""


def read_task_state(path: Path) -> TaskState | None:
    """The state a task recorded, or None (no file, or not one of ours).  Read bounded: the
    file is run-folder content, possibly foreign, and only plain JSON is ever parsed."""
    try:
        with Path(path).open("rb") as f:
            raw = json.loads(f.read(65536))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("state") not in TASK_STATES:
        return None
    error, host = raw.get("error"), raw.get("host")
    return TaskState(
        raw["state"],
        error[:2000] if isinstance(error, str) else "",
        host[:200] if isinstance(host, str) else "",
    )


def read_state(path: Path) -> str | None:
    """Only the state of :func:`read_task_state`."""
    info = read_task_state(path)
    return info.state if info is not None else None


def _own_state_file() -> Path | None:
    if not S.in_job():
        return None
    folder, job_id, rank = S.job_identity()
    return state_file(folder, job_id, rank)


def _write_state(path: Path, state: str, error: str = "") -> None:
    info = {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    try:
        atomic_write_json(path, {**info, **({"error": error[:2000]} if error else {})})
    except OSError as e:  # the task's own outcome matters more than its bookkeeping
        log.warning("could not record the task state in %s: %s", path, e)


@contextlib.contextmanager
def recorded_state(final: bool = True) -> Iterator[None]:
    """Record RUNNING, then how the work ended, in this task's state file (inside jobs only).

    ``final=False`` (a wait before the work) records a failure but never COMPLETED, which would
    start the jobs waiting for this one too early.
    """
    path = _own_state_file()
    if path is None:
        yield
        return
    _write_state(path, "RUNNING")
    try:
        yield
    except KeyboardInterrupt:  # `cancel` of a local job sends SIGINT
        _write_state(path, "CANCELLED")
        raise
    except SystemExit:  # requeued or terminated at a checkpoint
        _write_state(path, "INTERRUPTED")
        raise
    except BaseException as e:
        _write_state(path, "FAILED", f"{type(e).__name__}: {e}")
        raise
    if final:
        _write_state(path, "COMPLETED")


@dataclass(frozen=True)
class LaunchTask(Checkpointable):
    """Base class: state file, run lock and signal wiring around :meth:`run`, which subclasses
    implement."""

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        """Do the work; return ("completed" | "interrupted", result)."""
        raise NotImplementedError

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The run lock this task holds while it works (see :mod:`cnncam.runlock`); none by default."""
        return contextlib.nullcontext()

    def __call__(self) -> Any:
        stop = StopFlag()
        handlers = StopHandlers(stop) if S.in_job() else None
        export_local_dist_env()
        with recorded_state(), self.lock():
            check_code_snapshot()
            status, result = self.run(stop)
            if status == "interrupted" and handlers is not None:
                handlers.finish_interrupted()
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # A fresh task, same config: the restart reads its state from the run directory.
        return DelayedSubmission(dataclasses.replace(self))


@dataclass(frozen=True)
class TrainTask(LaunchTask):
    cfg: RunConfig

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return hold_run(self.cfg.run_dir, "exclusive", "train")

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.train import run_training

        result = run_training(self.cfg, stop)
        return result.status, result


@dataclass(frozen=True)
class CamShardTask(LaunchTask):
    cfg: RunConfig
    shard: int
    num_shards: int

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return hold_run(self.cfg.run_dir, "shared", "cam export")

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.cam.export import export_shard

        path = export_shard(self.cfg, self.shard, self.num_shards, stop)
        # Stopped early, export_shard returns the resumable ``.partial``; a stop that came after
        # the last batch leaves a complete part, and there is nothing to requeue.
        return ("interrupted" if path.name.endswith(".partial") else "completed"), path


@dataclass(frozen=True)
class MergeTask(LaunchTask):
    cfg: RunConfig
    num_shards: int

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return hold_run(self.cfg.run_dir, "shared", "merge")

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.storage.runmerge import merge_run  # no torch: the merge job starts fast

        return "completed", merge_run(self.cfg, self.num_shards)


@dataclass(frozen=True)
class ReportTask(LaunchTask):
    cfg: RunConfig
    cams: str | None = None
    out: str | None = None

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.report import build_report

        cams = Path(self.cams) if self.cams else None
        out = Path(self.out) if self.out else None
        # The whole config, as the CLI resolved it (--run folder, --set cam.out / data.root...).
        return "completed", build_report(self.cfg.run_dir, cams, out, self.cfg.report, self.cfg)


@dataclass(frozen=True)
class SanityTask(LaunchTask):
    """Sanity checks of a trained run (``launch.py sanity``); ``permuted`` = the permuted-label run."""

    cfg: RunConfig
    permuted: str | None = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        # Reads both runs' checkpoints: neither may be (re)trained meanwhile.
        with hold_run(self.cfg.run_dir, "shared", "sanity"):
            if self.permuted is None:
                yield
            else:
                with hold_run(Path(self.permuted), "shared", "sanity"):
                    yield

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.cam.sanity_run import run_sanity

        return "completed", run_sanity(self.cfg, Path(self.permuted) if self.permuted else None)


# ----------------------------------------------------------------------------------------------
# Dependencies for the local executor, which has no `--dependency`.


@dataclass(frozen=True)
class LocalDep:
    """A local job to wait for: its controller PID and the state file of its task 0."""

    pid: int
    state: str


_PENDING = ("RUNNING", "INTERRUPTED", None)  # a local job being requeued says INTERRUPTED meanwhile


def wait_for_local(deps: tuple[LocalDep, ...], poll_s: float = 0.5) -> None:
    """Block until every dependency completed (``afterok``); raise if one failed or vanished."""
    pending = list(deps)
    while pending:
        for dep in list(pending):
            state = read_state(Path(dep.state))
            if state in _PENDING and not pid_alive(dep.pid):
                state = read_state(Path(dep.state))
                state = "FAILED" if state in _PENDING else state  # it ended without saying so
            if state in _PENDING:
                continue
            if state != "COMPLETED":
                raise LaunchError(f"dependency (local job {dep.pid}) failed, so this job does not run")
            pending.remove(dep)
        if pending:
            time.sleep(poll_s)


@dataclass(frozen=True)
class AfterOk(Checkpointable):
    """Local executor: run ``task`` once every dependency job has succeeded."""

    task: LaunchTask
    deps: tuple[LocalDep, ...]

    def __call__(self) -> Any:
        print(f"waiting for local jobs {[d.pid for d in self.deps]}", file=sys.stderr, flush=True)
        with recorded_state(final=False):  # a failed dependency fails this job too
            wait_for_local(self.deps)
        return self.task()

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        return DelayedSubmission(AfterOk(dataclasses.replace(self.task), ()))
