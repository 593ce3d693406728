"""What happened to a task, and what to do about it, in plain words (``status`` prints both).

The input is what Slurm says (:class:`~cnncam.launch.slurm_state.SlurmTask`: the current run, the
runs before it, squeue's reason) and what the task wrote itself (its state file: Slurm cannot
tell "checkpointed but could not requeue" from any other failure).
"""

from __future__ import annotations

import shlex

from cnncam.launch.records import JobRecord
from cnncam.launch.slurm_state import SlurmTask
from cnncam.launch.tasks import TaskState
from cnncam.runs import RunPaths

PROG = "python jobs/launch.py"
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING")


def resume_advice(rec: JobRecord, paths: RunPaths | None) -> str:
    """How to pick the work up again, by job kind (every step resumes from what is on disk)."""
    run = shlex.quote(str(paths.root)) if paths is not None else "<run>"
    if rec.kind == "train":
        again = (
            f"`{rec.command}`" if rec.command.startswith(f"{PROG} train") else f"`{PROG} train` (same config)"
        )
        return f"run {again} again: it resumes from checkpoints/last.pt"
    if rec.kind == "cam":
        return f"`{PROG} cam --run {run} --retry-failed` resubmits the unfinished shards, then the merge"
    if rec.kind == "probe" and rec.shards is not None:
        return f"`{PROG} probe ... --retry-failed` (same options) resubmits the shards that are not complete"
    if rec.kind in ("merge", "report"):
        return f"`{PROG} {rec.kind} --run {run}`"
    return f"run `{rec.command}` again" if rec.command else "submit it again"


def _error_line(own: TaskState | None) -> str:
    if own is None or not own.error:
        return ""
    return own.error.strip().splitlines()[-1][:300] if own.error.strip() else ""


def explain(
    rec: JobRecord, state: str, slurm: SlurmTask | None, own: TaskState | None, paths: RunPaths | None
) -> tuple[str, str]:
    """(what happened, what to do next) for a task of ``rec``; ("", "") when all is well.

    Worded the same for every task of an array, so that ``status`` tells a story once.
    """
    earlier = [r.state for r in slurm.earlier] if slurm is not None else []
    node = slurm.current.node if slurm is not None else ""
    on = f" on {node}" if node else ""
    resume = resume_advice(rec, paths)
    run = shlex.quote(str(paths.root)) if paths is not None else "<run>"
    if state == "COMPLETED":
        return (f"completed after {len(earlier)} restart(s): {', '.join(earlier)}" if earlier else ""), ""
    if state in ACTIVE:
        return _active(rec, state, slurm, earlier, run)
    if slurm is not None and slurm.current.over_memory:
        mem = slurm.current.req_mem or "the default"
        return (
            f"out of memory{on}: a step used more than its memory ({mem}) and Slurm killed it",
            f"raise --mem-gb (or lower data.batch_size / data.num_workers), then {resume}",
        )
    if state == "PREEMPTED":
        return (
            "preempted and not requeued (the partition cancels preempted jobs, PreemptMode=CANCEL, "
            "or the job is not requeueable)",
            resume,
        )
    if state == "NODE_FAIL":
        return (
            f"node {node or '?'} failed under the job; no checkpoint signal came, so it stopped where "
            "its last periodic checkpoint left it",
            resume,
        )
    error = _error_line(own)
    if state == "TIMEOUT":
        limit = f" ({slurm.current.timelimit})" if slurm is not None and slurm.current.timelimit else ""
        if own is not None and own.state == "INTERRUPTED":
            return f"hit its time limit{limit} after saving a checkpoint, and was not requeued", resume
        return (
            f"hit its time limit{limit} before it could checkpoint: no USR2 came, or one step plus the "
            "save took longer than --signal-delay",
            f"raise --time or --signal-delay, then {resume}",
        )
    if own is not None and own.error.startswith("RequeueFailed"):
        return (
            f"{error.removeprefix('RequeueFailed: ')} (is `scontrol` on the compute nodes' PATH?)",
            resume,
        )
    if "timed-out too many times" in error:
        return (
            "gave up after slurm.max_requeues time-limit requeues",
            f"raise --time or --set slurm.max_requeues=<n>, then {resume}",
        )
    if state == "CANCELLED":
        return "cancelled", f"to continue: {resume}"
    if state in ("FAILED", "BOOT_FAIL", "DEADLINE"):
        code = slurm.current.exit_code if slurm is not None and slurm.current.exit_code else ""
        what = error or (f"exit code {code}" if code else state.lower())
        if rec.executor == "inline":
            return what, f"see the traceback in the terminal that ran it; fix it, then {resume}"
        task = " --task <TASK>" if len(rec.tasks) > 1 else ""
        return what, f"read `{PROG} logs --run {run} --job {rec.job_id}{task}`; fix it, then {resume}"
    if state == "UNKNOWN":
        return "neither sacct nor squeue knows this job (accounting off, or the record was purged)", ""
    return state.lower(), resume


def _active(
    rec: JobRecord, state: str, slurm: SlurmTask | None, earlier: list[str], run: str
) -> tuple[str, str]:
    reason = slurm.reason if slurm is not None else ""
    if "DependencyNeverSatisfied" in reason:
        return (
            "waits for a job that failed, and never will start",
            f"`{PROG} cancel --run {run}`, then resubmit"
            + (
                f"; for a CAM export `{PROG} cam --run {run} --retry-failed` does both"
                if rec.kind == "merge"
                else ""
            ),
        )
    if "held" in reason.lower():
        return f"held by Slurm ({reason})", f"`scontrol release {rec.job_id}` once the cause is fixed"
    if earlier:
        return (
            f"requeued after {earlier[-1]} (restart {len(earlier)}): it resumes from its checkpoint itself",
            "",
        )
    return "", ""
