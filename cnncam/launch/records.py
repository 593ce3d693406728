"""``jobs.json``: what was submitted for a run, and one status row per task.

The file may be foreign (run folders are copied and handed over): its ids end up in
``sacct``/``scancel`` arguments and in paths, so they are checked on every load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnncam.errors import CnncamError
from cnncam.launch.params import EXECUTORS
from cnncam.launch.slurm_state import TERMINAL
from cnncam.runs import RunPaths, atomic_write_json, read_json, require_run_folder


@dataclass
class JobRecord:
    """One submission: a job, or an array of tasks (one per shard)."""

    kind: str
    executor: str  # slurm | local | inline
    job_id: str  # Slurm job or array id; local: controller PID of task 0; inline: "inline"
    tasks: list[str]  # full id of each task: "12", or "13_0", "13_1"...; local: PIDs
    folder: str  # submitit folder, with %j
    name: str
    shards: list[int] | None = None  # shard handled by each array task
    num_shards: int | None = None
    after: list[str] = field(default_factory=list)  # job ids this one waits for (afterok)
    submitted: str = ""
    command: str = ""
    state: str | None = None  # final state when known at submit time (inline)
    cancelled: bool = False
    code: str | None = None  # the code snapshot the job runs, relative to the run folder


@dataclass(frozen=True)
class TaskStatus:
    kind: str
    job_id: str  # full task id ("13_2")
    task: int | None  # array task index
    shard: int | None
    state: str
    elapsed: str
    node: str
    restarts: int | None
    detail: str = ""  # what happened, in words (e.g. "preempted and not requeued")
    next_step: str = ""  # what to do about it; empty when nothing is needed

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def load_records(paths: RunPaths) -> list[JobRecord]:
    if not paths.jobs.exists():
        return []
    raw = read_json(paths.jobs)
    names = {f.name for f in dataclasses.fields(JobRecord)}
    try:
        records = [JobRecord(**{k: v for k, v in r.items() if k in names}) for r in raw["jobs"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise CnncamError(f"{paths.jobs} is not a cnncam jobs file: {e}") from None
    for rec in records:  # the file may be foreign: ids end up in sacct/scancel arguments and paths
        ids = [rec.job_id, *(rec.tasks if isinstance(rec.tasks, list) else [None])]
        if not isinstance(rec.kind, str) or not all(map(_valid_id, ids)):
            raise CnncamError(
                f"{paths.jobs} is not a cnncam jobs file: job ids must look like 12, 13_4 or inline"
            )
        if rec.executor not in EXECUTORS:
            raise CnncamError(
                f"{paths.jobs} is not a cnncam jobs file: executor {rec.executor!r} is not one of "
                f"{', '.join(EXECUTORS)}"
            )
    return records


def _valid_id(job_id: object) -> bool:
    return isinstance(job_id, str) and re.fullmatch(r"[A-Za-z0-9_]+(_\[[0-9,%-]+\])?", job_id) is not None


def save_records(paths: RunPaths, records: Sequence[JobRecord]) -> None:
    atomic_write_json(paths.jobs, {"version": 1, "jobs": [dataclasses.asdict(r) for r in records]})


def append_records(paths: RunPaths, new: Sequence[JobRecord]) -> None:
    save_records(paths, [*load_records(paths), *new])


def require_records(paths: RunPaths) -> list[JobRecord]:
    paths = require_run_folder(paths.root)
    records = load_records(paths)
    if not records:
        raise CnncamError(f"no jobs recorded in {paths.jobs}; submit something first (train, cam, ...)")
    return records


def task_folder(paths: RunPaths, task_id: str) -> Path:
    """submitit's folder of one task: always under the run given (never the ``folder`` that
    jobs.json names, which may be the original of a copied run, or anything at all)."""
    return paths.slurm_logs.absolute() / task_id
