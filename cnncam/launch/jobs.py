"""What works on a run's jobs from any later shell: status, logs, cancel.

Each ``jobs.json`` record names its executor; the matching backend
(:mod:`cnncam.launch.backends`) knows how to read, find and stop its jobs.  Status costs at most
two batched calls for all Slurm jobs together, one ``sacct`` and one ``squeue``
(:mod:`cnncam.launch.slurm_state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnncam.errors import CnncamError
from cnncam.launch.backends import Runner, backend, run_command
from cnncam.launch.records import (
    TERMINAL,
    JobRecord,
    TaskStatus,
    append_records,
    load_records,
    require_records,
    save_records,
    task_folder,
)
from cnncam.runs import RunPaths

# Re-exported: jobs.json records are part of this module's interface.
__all__ = [
    "TERMINAL",
    "JobRecord",
    "TaskStatus",
    "append_records",
    "cancel_jobs",
    "find_task",
    "follow_logs",
    "format_status",
    "job_status",
    "load_records",
    "log_paths",
    "require_records",
    "save_records",
    "task_folder",
]

# ----------------------------------------------------------------------------------------------
# Status


def job_status(
    records: Sequence[JobRecord], run: Runner = run_command, paths: RunPaths | None = None
) -> list[TaskStatus]:
    """One row per task of every recorded job, oldest first (``paths``: the run, for the tasks'
    own state files)."""
    by_backend: dict[str, list[JobRecord]] = {}
    for rec in records:
        by_backend.setdefault(rec.executor, []).append(rec)
    rows: dict[int, list[TaskStatus]] = {}
    for name, recs in by_backend.items():
        found = backend(name).status(recs, paths, run)
        for rec in recs:
            rows[id(rec)], found = found[: len(rec.tasks)], found[len(rec.tasks) :]
    return [row for rec in records for row in rows[id(rec)]]


def format_status(rows: Sequence[TaskStatus]) -> str:
    """The status table, then one line per distinct problem and what to do about it."""
    header = ("JOB", "KIND", "TASK", "SHARD", "STATE", "ELAPSED", "NODE", "RESTARTS")
    table = [header] + [
        (
            r.job_id,
            r.kind,
            "-" if r.task is None else str(r.task),
            "-" if r.shard is None else str(r.shard),
            r.state,
            r.elapsed or "-",
            r.node or "-",
            "?" if r.restarts is None else str(r.restarts),
        )
        for r in rows
    ]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    # Array tasks that share a story are told once: "13_0, 13_4 (cam): out of memory ...".
    notes: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r.detail or r.next_step:
            notes.setdefault((r.kind, r.detail, r.next_step), []).append(r.job_id)
    if notes:
        lines.append("")
    for (kind, detail, next_step), ids in notes.items():
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        lines.append(
            f"{shown} ({kind}): {detail or 'note'}" + (f"\n  next: {next_step}" if next_step else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Logs and cancel


def find_task(records: Sequence[JobRecord], job: str | None, task: int | None) -> tuple[JobRecord, str]:
    """The record and full task id chosen by ``--job`` (id or kind; default: the latest) and ``--task``."""
    chosen = records[-1]
    if job is not None:
        matches = [r for r in records if job in (r.job_id, r.kind) or job in r.tasks]
        if not matches:
            ids = ", ".join(f"{r.job_id} ({r.kind})" for r in records)
            raise CnncamError(f"no recorded job {job!r}; recorded: {ids}")
        chosen = matches[-1]
        if job in chosen.tasks and task is None:
            return chosen, job
    index = 0 if task is None else task
    if not 0 <= index < len(chosen.tasks):
        raise CnncamError(f"job {chosen.job_id} has tasks 0..{len(chosen.tasks) - 1}; got --task {index}")
    return chosen, chosen.tasks[index]


def log_paths(paths: RunPaths, rec: JobRecord, task_id: str, rank: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of one task (``rank`` = srun task of a multi-task job), in this run."""
    return backend(rec.executor).log_paths(paths, rec, task_id, rank)


def read_from(path: Path, offset: int) -> tuple[str, int]:
    """New text of ``path`` after byte ``offset`` (the file may not exist yet)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return "", offset
    return data.decode("utf-8", errors="replace"), offset + len(data)


def follow_logs(
    paths: RunPaths,
    rec: JobRecord,
    task_id: str,
    rank: int,
    write: Callable[[str], Any],
    is_done: Callable[[], bool],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> None:
    """Print stdout and stderr as they grow until the task ends (or ``timeout_s``)."""
    out, err = log_paths(paths, rec, task_id, rank)
    offsets = {out: 0, err: 0}
    start = time.monotonic()
    while True:
        finished = is_done()  # checked before reading, so the last lines are always printed
        for path in (out, err):
            text, offsets[path] = read_from(path, offsets[path])
            if text:
                write(text)
        if finished or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return
        time.sleep(poll_s)


def cancel_jobs(paths: RunPaths, run: Runner = run_command) -> list[str]:
    """Cancel every unfinished job of the run (one scancel call for Slurm); returns the cancelled ids."""
    records = require_records(paths)
    rows = job_status(records, run, paths)
    active = {r.job_id for r in rows if not r.done}
    cancelled: list[str] = []
    for name in dict.fromkeys(rec.executor for rec in records):
        cancelled += backend(name).cancel([r for r in records if r.executor == name], active, run)
    for rec in records:
        if rec.job_id in cancelled:
            rec.cancelled = True
    save_records(paths, records)
    return cancelled
