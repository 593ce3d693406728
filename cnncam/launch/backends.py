"""One type per executor behind one interface: submit, status, log paths, cancel.

:class:`SlurmBackend` (sbatch through submitit), :class:`LocalBackend` (submitit's local
processes) and :class:`InlineBackend` (this process) are the only places that know how their
jobs are started, found and stopped; the launcher, ``status``, ``logs`` and ``cancel`` ask the
backend named by each ``jobs.json`` record (:func:`backend`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cnncam.errors import CnncamError, ConfigError, LaunchError, choice_message
from cnncam.launch import params as P
from cnncam.launch import submitit_api as S
from cnncam.launch.next_steps import explain
from cnncam.launch.records import JobRecord, TaskStatus, task_folder
from cnncam.launch.slurm_state import Runner, slurm_tasks
from cnncam.launch.tasks import (
    AfterOk,
    LaunchTask,
    LocalDep,
    TaskState,
    pid_alive,
    read_task_state,
    state_file,
)
from cnncam.runs import RunPaths

if TYPE_CHECKING:
    from cnncam.config import SlurmConfig


def run_command(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Submission:
    """One launcher call's job: what to run and how to start it."""

    kind: str
    tasks: Sequence[LaunchTask]
    after: Sequence[JobRecord]
    folder: Path  # submitit folder, with %j, absolute
    slurm: SlurmConfig
    run_name: str
    python: str  # how the job starts python (the interpreter, plus -P when running a snapshot)
    env: Callable[[], contextlib.AbstractContextManager[None]]  # the environment jobs are submitted with
    on_failure: Callable[[JobRecord], None] | None = None  # inline: record a failed run

    @property
    def name(self) -> str:
        return P.job_name(self.kind, self.slurm, self.run_name)

    @property
    def after_ids(self) -> list[str]:
        return [r.job_id for r in self.after]


class Backend(ABC):
    name: ClassVar[str]
    in_process: ClassVar[bool] = False  # runs the tasks in the launcher's process
    takes_snapshot: ClassVar[bool] = True  # jobs start later, in another process: they get a code snapshot

    @abstractmethod
    def submit(self, sub: Submission) -> JobRecord:
        """Queue (or run) the tasks as one job or array; return the record for jobs.json."""

    def preview(self, sub: Submission) -> str:
        """What ``--dry-run`` prints for this job."""
        deps = f", after {', '.join(sub.after_ids)}" if sub.after else ""
        return f"# --- {sub.kind}: {len(sub.tasks)} task(s) with the {self.name} executor{deps}\n"

    @abstractmethod
    def status(self, records: Sequence[JobRecord], paths: RunPaths | None, run: Runner) -> list[TaskStatus]:
        """One row per task of ``records`` (all of this backend), in order."""

    def log_paths(self, paths: RunPaths, rec: JobRecord, task_id: str, rank: int) -> tuple[Path, Path]:
        return S.log_files(task_folder(paths, task_id), task_id, rank)

    @abstractmethod
    def cancel(self, records: Sequence[JobRecord], active: set[str], run: Runner) -> list[str]:
        """Stop the records' unfinished tasks (``active``); return the job ids cancelled."""


def _rows(rec: JobRecord, per_task: Callable[[int, str], TaskStatus]) -> list[TaskStatus]:
    return [per_task(i, tid) for i, tid in enumerate(rec.tasks)]


def _where(rec: JobRecord, i: int) -> tuple[int | None, int | None]:
    """(array task index, shard) of task ``i``."""
    return (i if len(rec.tasks) > 1 else None), (rec.shards[i] if rec.shards else None)


class SlurmBackend(Backend):
    name = "slurm"

    def preview(self, sub: Submission) -> str:
        script = S.sbatch_text(_slurm_params(sub), sub.folder, sub.python, len(sub.tasks))
        array = f" (array of {len(sub.tasks)} tasks)" if len(sub.tasks) > 1 else ""
        return f"# --- sbatch script for {sub.kind}{array}, job id <{sub.kind}-job-id> ---\n{script}\n"

    def submit(self, sub: Submission) -> JobRecord:
        executor = S.slurm_executor(sub.folder, sub.slurm.max_requeues, sub.python)
        params = _slurm_params(sub)
        executor.update_parameters(**params)
        with sub.env():
            try:
                jobs = executor.submit_array(list(sub.tasks))
            except Exception as e:  # submitit raises FailedJobError/CalledProcessError with sbatch's text
                raise LaunchError(f"sbatch refused the {sub.kind} job: {e}") from None
        ids = [j.job_id for j in jobs]
        return JobRecord(
            sub.kind, self.name, ids[0].split("_")[0], ids, str(sub.folder), sub.name, after=sub.after_ids
        )

    def status(self, records: Sequence[JobRecord], paths: RunPaths | None, run: Runner) -> list[TaskStatus]:
        known = slurm_tasks([r.job_id for r in records], run)
        rows: list[TaskStatus] = []
        for rec in records:
            # A pending array task cancelled before it started is simply dropped from the array:
            # neither sacct nor squeue knows it any more, while its siblings are listed.
            dropped = len(rec.tasks) > 1 and any(t in known for t in rec.tasks)

            def row(i: int, tid: str, rec: JobRecord = rec, dropped: bool = dropped) -> TaskStatus:
                index, shard = _where(rec, i)
                task = known.get(tid)
                if task is None:
                    state = "CANCELLED" if dropped else "UNKNOWN"
                    base = TaskStatus(rec.kind, tid, index, shard, state, "", "", 0 if dropped else None)
                    return base
                own = read_task_state(state_file(task_folder(paths, tid), tid)) if paths is not None else None
                detail, next_step = explain(rec, task.state, task, own, paths)
                cur = task.current
                return TaskStatus(
                    rec.kind,
                    tid,
                    index,
                    shard,
                    task.state,
                    cur.elapsed,
                    cur.node,
                    task.restarts,
                    detail,
                    next_step,
                )

            rows += _rows(rec, row)
        return rows

    def cancel(self, records: Sequence[JobRecord], active: set[str], run: Runner) -> list[str]:
        ids = sorted({rec.job_id for rec in records if any(t in active for t in rec.tasks)})
        if not ids:
            return []
        res = run(["scancel", *ids])
        # A job that ended meanwhile makes scancel complain; that is not a failure to cancel.
        benign = ("already completing or completed", "Invalid job id")
        if res.returncode != 0 and not all(any(b in ln for b in benign) for ln in res.stderr.splitlines()):
            raise LaunchError(f"scancel {' '.join(ids)} failed: {res.stderr.strip()}")
        return ids


def _slurm_params(sub: Submission) -> dict[str, object]:
    return P.slurm_parameters(sub.kind, sub.slurm, sub.run_name, P.afterok(sub.after_ids))


class LocalBackend(Backend):
    name = "local"

    def submit(self, sub: Submission) -> JobRecord:
        executor = S.local_executor(sub.folder, sub.slurm.max_requeues, sub.python)
        executor.update_parameters(**P.local_parameters(sub.kind, sub.slurm))
        deps = tuple(
            LocalDep(int(pid), str(state_file(S.job_folder(sub.folder, pid), pid)))
            for r in sub.after
            for pid in r.tasks
        )
        # No --dependency locally: each task waits for its dependencies itself (AfterOk).
        fns = [AfterOk(t, deps) if deps else t for t in sub.tasks]
        with sub.env(), _sigint_not_ignored():
            ids = [executor.submit(fn).job_id for fn in fns]
        return JobRecord(sub.kind, self.name, ids[0], ids, str(sub.folder), sub.name, after=sub.after_ids)

    def status(self, records: Sequence[JobRecord], paths: RunPaths | None, run: Runner) -> list[TaskStatus]:
        rows: list[TaskStatus] = []
        for rec in records:

            def row(i: int, tid: str, rec: JobRecord = rec) -> TaskStatus:
                index, shard = _where(rec, i)
                own = read_task_state(state_file(task_folder(paths, tid), tid)) if paths is not None else None
                state = self._state(rec, tid, own) if tid.isdigit() else (rec.state or "UNKNOWN")
                detail, next_step = explain(rec, state, None, own, paths)
                return TaskStatus(rec.kind, tid, index, shard, state, "", "localhost", 0, detail, next_step)

            rows += _rows(rec, row)
        return rows

    @staticmethod
    def _state(rec: JobRecord, pid: str, own: TaskState | None) -> str:
        # PIDs and the state file the task wrote (``own``): never submitit's result pickle, which
        # would run code from the run folder (issue 9, B1).
        if pid_alive(int(pid)):
            return "RUNNING"
        if own is not None and own.state in ("COMPLETED", "FAILED", "CANCELLED"):
            return own.state
        return "CANCELLED" if rec.cancelled else "FAILED"

    def cancel(self, records: Sequence[JobRecord], active: set[str], run: Runner) -> list[str]:
        cancelled = []
        for rec in records:
            if any(t in active for t in rec.tasks):
                for pid in rec.tasks:
                    if pid.isdigit() and _is_local_controller(int(pid)):
                        os.kill(int(pid), signal.SIGINT)  # what submitit's LocalJob.cancel sends
                cancelled.append(rec.job_id)
        return cancelled


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """``cancel`` stops a local job with SIGINT.  A launcher started in the background of a
    non-interactive shell (``nohup ... &``, a CI step) ignores SIGINT, and an ignored signal stays
    ignored across ``exec``: its local jobs could then never be cancelled.  Spawn them with the
    default disposition (Python turns it into KeyboardInterrupt in the child)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if before is signal.SIG_IGN:
            signal.signal(signal.SIGINT, before)


def _is_local_controller(pid: int) -> bool:
    # PIDs get reused: only signal a process that still is a submitit local controller.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return pid_alive(pid) and "submitit.local._local" in cmdline


class InlineBackend(Backend):
    name = "inline"
    in_process = True
    takes_snapshot = False  # the code runs now, in this process: nothing can change under it

    def submit(self, sub: Submission) -> JobRecord:
        r = P.resources(sub.kind, sub.slurm)
        if r.nodes * r.tasks_per_node > 1:
            raise ConfigError(
                f"--executor inline runs one process, but {sub.kind} asks for {r.nodes} node(s) x "
                f"{r.tasks_per_node} task(s); use --executor local or slurm for several tasks"
            )
        rec = JobRecord(
            sub.kind,
            self.name,
            "inline",
            ["inline"] * len(sub.tasks),
            str(sub.folder),
            sub.name,
            submitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            state="RUNNING",
        )
        try:
            for task in sub.tasks:
                task()
        except BaseException:
            rec.state = "FAILED"
            if sub.on_failure is not None:
                sub.on_failure(rec)
            raise
        rec.state = "COMPLETED"
        return rec

    def status(self, records: Sequence[JobRecord], paths: RunPaths | None, run: Runner) -> list[TaskStatus]:
        rows: list[TaskStatus] = []
        for rec in records:

            def row(i: int, tid: str, rec: JobRecord = rec) -> TaskStatus:
                index, shard = _where(rec, i)
                state = rec.state or "UNKNOWN"
                detail, next_step = explain(rec, state, None, None, paths)
                return TaskStatus(rec.kind, tid, index, shard, state, "", self.name, 0, detail, next_step)

            rows += _rows(rec, row)
        return rows

    def log_paths(self, paths: RunPaths, rec: JobRecord, task_id: str, rank: int) -> tuple[Path, Path]:
        raise CnncamError(
            f"the {rec.kind} job ran inline: its output went to the terminal that ran it, and "
            "cnncam keeps no log files for inline jobs"
        )

    def cancel(self, records: Sequence[JobRecord], active: set[str], run: Runner) -> list[str]:
        return []  # it ran to its end in the process that started it


_BACKENDS: dict[str, Backend] = {b.name: b for b in (SlurmBackend(), LocalBackend(), InlineBackend())}


def backend(name: str) -> Backend:
    """The backend of an executor name (``slurm``, ``local`` or ``inline``)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(choice_message("executor", name, tuple(_BACKENDS))) from None
