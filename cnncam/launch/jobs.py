"""``jobs.json`` and what works from any later shell: status, logs, cancel.

Status costs at most two batched calls whatever the number of jobs: one ``sacct`` (states,
elapsed time, nodes, and restarts counted from ``--duplicates`` records) and one ``squeue``
for what sacct does not know yet or reports stale (sacct lags a few seconds).  sacct storms
are a known pain on shared clusters (submitit#1759, #1659).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnncam.errors import CnncamError, LaunchError
from cnncam.launch.tasks import pid_alive, read_state, state_file
from cnncam.runs import RunPaths, atomic_write_json, read_json, require_run_folder

TERMINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)
Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


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
        if not all(isinstance(v, str) for v in [rec.kind, rec.executor]) or not all(map(_valid_id, ids)):
            raise CnncamError(
                f"{paths.jobs} is not a cnncam jobs file: job ids must look like 12, 13_4 or inline"
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


# ----------------------------------------------------------------------------------------------
# Status


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

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _expand(job_id: str) -> list[str]:
    """``13_[1-3,5%2]`` → ``13_1 13_2 13_3 13_5``; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]%]+)(?:%\d+)?\]", job_id)
    if m is None:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_sacct(text: str) -> dict[str, tuple[str, str, str, int]]:
    """``sacct -X -D -P -n -o JobID,State,Elapsed,NodeList`` → id: (state, elapsed, node, restarts)."""
    seen: dict[str, list[tuple[str, str, str]]] = {}
    explicit: set[str] = set()
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4:
            continue
        jid, state, elapsed, node = parts[:4]
        state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0"
        ids = _expand(jid)
        if ids == [jid]:
            explicit.add(jid)
        for i in ids:
            # A pending range ("13_[2-3]") may lag behind explicit task records: those win.
            if i in explicit and ids != [jid]:
                continue
            seen.setdefault(i, []).append((state, elapsed, node))
    out = {}
    for jid, recs in seen.items():
        current = [r for r in recs if r[0] != "REQUEUED"] or recs
        state, elapsed, node = current[-1]
        out[jid] = (state, elapsed, "" if node == "None assigned" else node, len(recs) - 1)
    return out


def parse_squeue(text: str) -> dict[str, tuple[str, str, str]]:
    """``squeue -h -a --states=all -o %i|%T|%M|%N`` → id: (state, elapsed, node)."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            for i in _expand(parts[0]):
                out[i] = (parts[1], parts[2], parts[3])
    return out


def slurm_states(job_ids: Sequence[str], run: Runner = _run) -> dict[str, tuple[str, str, str, int | None]]:
    """States of many Slurm jobs/arrays with one sacct and (if needed) one squeue call."""
    if not job_ids:
        return {}
    ids = ",".join(sorted(set(job_ids)))
    out: dict[str, tuple[str, str, str, int | None]] = {}
    acct = run(["sacct", "-X", "-D", "-P", "-n", "-o", "JobID,State,Elapsed,NodeList", "-j", ids])
    if acct.returncode == 0:
        out.update(parse_sacct(acct.stdout))
    live = run(["squeue", "-h", "-a", "--states=all", "-o", "%i|%T|%M|%N", "-j", ids])
    if live.returncode == 0:
        for jid, (state, elapsed, node) in parse_squeue(live.stdout).items():
            restarts = out[jid][3] if jid in out else None
            out[jid] = (state, elapsed, node, restarts)  # squeue is live; sacct lags (~5 s)
    return out


def task_folder(paths: RunPaths, task_id: str) -> Path:
    """submitit's folder of one task: always under the run given (never the ``folder`` that
    jobs.json names, which may be the original of a copied run, or anything at all)."""
    return paths.slurm_logs.absolute() / task_id


def _local_state(rec: JobRecord, pid: str, paths: RunPaths | None) -> str:
    # PIDs and the state file the task wrote: never submitit's result pickle, which would
    # run code from the run folder (issue 9, B1).
    if pid_alive(int(pid)):
        return "RUNNING"
    state = read_state(state_file(task_folder(paths, pid), pid)) if paths is not None else None
    if state in ("COMPLETED", "FAILED", "CANCELLED"):
        return state
    return "CANCELLED" if rec.cancelled else "FAILED"


def job_status(
    records: Sequence[JobRecord], run: Runner = _run, paths: RunPaths | None = None
) -> list[TaskStatus]:
    """One row per task of every recorded job, oldest first (``paths``: the run, for local jobs)."""
    slurm_ids = [r.job_id for r in records if r.executor == "slurm"]
    states = slurm_states(slurm_ids, run)
    rows = []
    for rec in records:
        # A pending array task cancelled before it started is simply dropped from the array:
        # neither sacct nor squeue knows it any more, while its siblings are listed.
        dropped = rec.executor == "slurm" and len(rec.tasks) > 1 and any(t in states for t in rec.tasks)
        for i, tid in enumerate(rec.tasks):
            shard = rec.shards[i] if rec.shards else None
            index = i if len(rec.tasks) > 1 else None
            if rec.executor == "slurm":
                missing = ("CANCELLED", "", "", 0) if dropped else ("UNKNOWN", "", "", None)
                state, elapsed, node, restarts = states.get(tid, missing)
            elif rec.executor == "local" and tid.isdigit():
                state, elapsed, node, restarts = _local_state(rec, tid, paths), "", "localhost", 0
            else:
                state, elapsed, node, restarts = rec.state or "UNKNOWN", "", rec.executor, 0
            rows.append(TaskStatus(rec.kind, tid, index, shard, state, elapsed, node, restarts))
    return rows


def format_status(rows: Sequence[TaskStatus]) -> str:
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
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


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
    from submitit.core.utils import JobPaths

    if rec.executor == "inline":
        raise CnncamError(
            f"the {rec.kind} job ran inline: its output went to the terminal that ran it, and "
            "cnncam keeps no log files for inline jobs"
        )
    jp = JobPaths(task_folder(paths, task_id), job_id=task_id, task_id=rank)
    return jp.stdout, jp.stderr


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


def cancel_jobs(paths: RunPaths, run: Runner = _run) -> list[str]:
    """Cancel every unfinished job of the run (one scancel call); returns the cancelled ids."""
    records = require_records(paths)
    rows = job_status(records, run, paths)
    active = {r.job_id for r in rows if not r.done}
    cancelled: list[str] = []
    slurm_ids = sorted(
        {rec.job_id for rec in records if rec.executor == "slurm" and any(t in active for t in rec.tasks)}
    )
    if slurm_ids:
        res = run(["scancel", *slurm_ids])
        # A job that ended meanwhile makes scancel complain; that is not a failure to cancel.
        benign = ("already completing or completed", "Invalid job id")
        if res.returncode != 0 and not all(any(b in ln for b in benign) for ln in res.stderr.splitlines()):
            raise LaunchError(f"scancel {' '.join(slurm_ids)} failed: {res.stderr.strip()}")
        cancelled += slurm_ids
    for rec in records:
        if rec.executor == "local" and any(t in active for t in rec.tasks):
            for pid in rec.tasks:
                if pid.isdigit() and _is_local_controller(int(pid)):
                    os.kill(int(pid), signal.SIGINT)  # what submitit's LocalJob.cancel sends
            rec.cancelled = True
            cancelled.append(rec.job_id)
    for rec in records:
        if rec.job_id in cancelled:
            rec.cancelled = True
    save_records(paths, records)
    return cancelled


def _is_local_controller(pid: int) -> bool:
    # PIDs get reused: only signal a process that still is a submitit local controller.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return pid_alive(pid) and "submitit.local._local" in cmdline
