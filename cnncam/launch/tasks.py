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
  exits; other ranks exit without a result.
* SIGTERM (``scontrol requeue`` or ``scancel``): Slurm itself requeues or cancels the job,
  so every rank just exits without writing a result.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from cnncam.config import RunConfig
from cnncam.errors import LaunchError
from cnncam.stop import StopFlag

TERMINATED_EXIT = 128 + signal.SIGTERM


class StopHandlers:
    """Route USR2/SIGTERM into a StopFlag; after the loop stopped, requeue or exit."""

    def __init__(self, stop: StopFlag) -> None:
        from submitit import JobEnvironment

        self.stop = stop
        self.usr = JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
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
            self.saved_usr(self.usr, None)
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


@dataclass(frozen=True)
class LaunchTask(Checkpointable):
    """Base class: signal wiring around :meth:`run`, which subclasses implement."""

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        """Do the work; return ("completed" | "interrupted", result)."""
        raise NotImplementedError

    def __call__(self) -> Any:
        stop = StopFlag()
        in_job = os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        handlers = StopHandlers(stop) if in_job else None
        export_local_dist_env()
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

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        from cnncam.train import run_training

        result = run_training(self.cfg, stop)
        return result.status, result


@dataclass(frozen=True)
class CamShardTask(LaunchTask):
    cfg: RunConfig
    shard: int
    num_shards: int

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
        return "completed", build_report(self.cfg.run_dir, cams, out, self.cfg.report)


# ----------------------------------------------------------------------------------------------
# Dependencies for the local executor, which has no `--dependency`.


@dataclass(frozen=True)
class LocalDep:
    """A local job to wait for: its controller PID and the result pickle of its task 0."""

    pid: int
    result: str


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a finished child not yet reaped still passes ``kill -0``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def read_result(path: Path) -> tuple[str, Any] | None:
    """submitit's ``("success" | "error", value)`` result pickle, or None when absent."""
    from submitit.core.utils import pickle_load

    if not path.exists():
        return None
    return pickle_load(path)  # type: ignore[no-any-return]


def wait_for_local(deps: tuple[LocalDep, ...], poll_s: float = 0.5) -> None:
    """Block until every dependency succeeded (``afterok``); raise if one failed or vanished."""
    pending = list(deps)
    while pending:
        for dep in list(pending):
            outcome = read_result(Path(dep.result))
            if outcome is None and not pid_alive(dep.pid):
                outcome = read_result(Path(dep.result)) or ("error", "ended without a result")
            if outcome is None:
                continue
            if outcome[0] != "success":
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
        wait_for_local(self.deps)
        return self.task()

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        return DelayedSubmission(AfterOk(dataclasses.replace(self.task), ()))
