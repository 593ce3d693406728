"""What Slurm says about a job, read truthfully (:mod:`cnncam.launch.next_steps` words it).

One batched ``sacct -D`` (every run of every job, with its steps) and one ``squeue`` (live, since
sacct lags a few seconds) per ``status``, whatever the number of jobs (sacct storms are a known
pain on shared clusters: submitit#1759, #1659).  The cases below were recorded on the local
cluster (``tests/slurm_recordings/``) and each one has a test:

* a job preempted or failed on a node and then **requeued**: ``sacct -D`` keeps a PREEMPTED or
  NODE_FAIL row for every earlier run next to the current one (and right after the requeue it has
  no row for the new run yet, while squeue shows it PENDING); the current run is the one that
  counts, the earlier ones are its history and its restart count;
* **PreemptMode=CANCEL**: PREEMPTED is final, nothing requeues the job;
* **NODE_FAIL**: the node died under the job, so no checkpoint signal came;
* **out of memory**: with cgroups the job reads OUT_OF_MEMORY; with polled ``OverMemoryKill`` it
  reads FAILED, its step CANCELLED, and only the step's MaxRSS above ReqMem tells why;
* **TIMEOUT without a checkpoint**: the time limit came before the job could save (no USR2, or
  the step + save took longer than ``--signal-delay``);
* the job **could not requeue itself** (``scontrol`` missing on the node): the task's own state
  file says so, since Slurm only sees FAILED.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]

SACCT_FIELDS = (
    "JobID",
    "State",
    "Elapsed",
    "NodeList",
    "ExitCode",
    "Start",
    "Partition",
    "Timelimit",
    "ReqMem",
    "MaxRSS",
)
SQUEUE_FORMAT = "%i|%T|%M|%N|%r"
# States a job never leaves (sacct's job state codes).
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
# squeue states that, after a run that ended, mean the job was requeued and waits or runs again
# (COMPLETING is the end of the same run: sacct is simply faster there).
NEW_RUN_STATES = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUE_HOLD", "REQUEUE_FED", "REQUEUED")


def sacct_command(ids: str) -> list[str]:
    return ["sacct", "-D", "-P", "-n", "-o", ",".join(SACCT_FIELDS), "-j", ids]


def squeue_command(ids: str) -> list[str]:
    return ["squeue", "-h", "-a", "--states=all", "-o", SQUEUE_FORMAT, "-j", ids]


@dataclass(frozen=True)
class SlurmStep:
    """One step of a run: ``batch``, ``extern`` or the srun step ``0``."""

    name: str
    state: str
    exit_code: str = ""
    max_rss: str = ""  # the largest resident size of one of its tasks (e.g. 625104K)


@dataclass(frozen=True)
class SlurmRun:
    """One run (start) of a task, as sacct recorded it, with its steps."""

    state: str
    elapsed: str = ""
    node: str = ""
    exit_code: str = ""
    start: str = ""
    partition: str = ""
    timelimit: str = ""
    req_mem: str = ""
    steps: tuple[SlurmStep, ...] = ()

    @property
    def over_memory(self) -> bool:
        """A step's tasks grew past the job's memory: killed for it, whatever the state says.

        With cgroups Slurm marks such a job OUT_OF_MEMORY; with ``JobAcctGatherParams=
        OverMemoryKill`` (polled, no cgroups) the job reads FAILED and its step CANCELLED, and only
        the step's MaxRSS above ReqMem tells why (recorded on the local cluster).
        """
        if self.state == "OUT_OF_MEMORY" or any(s.state == "OUT_OF_MEMORY" for s in self.steps):
            return True
        limit = size_bytes(self.req_mem)
        return limit is not None and any((size_bytes(s.max_rss) or 0) > limit for s in self.steps)


@dataclass(frozen=True)
class SlurmTask:
    """Everything known about one task: its current run and the runs before it."""

    current: SlurmRun
    earlier: tuple[SlurmRun, ...] = ()
    reason: str = ""  # squeue's reason while pending (Resources, BeginTime, launch failed ...)
    accounted: bool = True  # False: only squeue knew it (accounting off, or sacct lagging)

    @property
    def state(self) -> str:
        return self.current.state

    @property
    def restarts(self) -> int | None:
        return len(self.earlier) if self.accounted else None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(text: str) -> int | None:
    """sacct sizes: ``625104K``, ``100M``, ``4Gn`` (per node) → bytes; None for per-CPU (``c``)
    values, which need the CPU count, and for anything else."""
    m = re.fullmatch(r"([0-9.]+)([KMGT]?)(n?)", text.strip())
    if m is None:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


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


def _state_word(text: str) -> str:
    return text.split()[0] if text.strip() else "UNKNOWN"  # "CANCELLED by 0" → CANCELLED


def parse_sacct(text: str) -> dict[str, SlurmTask]:
    """``sacct -D -P -n -o <SACCT_FIELDS>`` → task id: its runs, oldest first.

    Rows without a step suffix are allocations (one per run; ``-D`` keeps them all), rows like
    ``12.batch`` / ``12.0`` / ``13_2.extern`` are steps of the allocation row above them.  A
    pending range (``13_[2-3]``) may lag behind explicit task rows: those win.
    """
    runs: dict[str, list[SlurmRun]] = {}
    explicit: set[str] = set()
    for line in text.splitlines():
        parts = line.rstrip("\n").split("|")
        if len(parts) < 4:
            continue
        f = dict(zip(SACCT_FIELDS, parts + [""] * (len(SACCT_FIELDS) - len(parts))))
        base, dot, step = f["JobID"].partition(".")
        if dot:  # a step of the latest run of `base`
            if runs.get(base):
                done = SlurmStep(step, _state_word(f["State"]), f["ExitCode"], f["MaxRSS"])
                last = runs[base][-1]
                runs[base][-1] = dataclasses.replace(last, steps=(*last.steps, done))
            continue
        ids = _expand(base)
        if ids == [base] and base not in explicit:
            runs.pop(base, None)  # a pending-range row seen before the explicit ones
            explicit.add(base)
        node = "" if f["NodeList"] == "None assigned" else f["NodeList"]
        run = SlurmRun(
            _state_word(f["State"]),
            f["Elapsed"],
            node,
            f["ExitCode"],
            f["Start"],
            f["Partition"],
            f["Timelimit"],
            f["ReqMem"],
        )
        for i in ids:
            if i in explicit and ids != [base]:
                continue
            runs.setdefault(i, []).append(run)
    return {jid: _task(recs) for jid, recs in runs.items()}


def _task(recs: list[SlurmRun]) -> SlurmTask:
    # sacct lists the runs of one job oldest first; a REQUEUED row is an earlier run too.
    return SlurmTask(recs[-1], tuple(recs[:-1]))


def parse_squeue(text: str) -> dict[str, tuple[str, str, str, str]]:
    """``squeue -h -a --states=all -o %i|%T|%M|%N|%r`` → id: (state, elapsed, node, reason)."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            reason = parts[4] if len(parts) > 4 else ""
            for i in _expand(parts[0]):
                out[i] = (parts[1], parts[2], parts[3], reason)
    return out


def slurm_tasks(job_ids: Sequence[str], run: Runner) -> dict[str, SlurmTask]:
    """What sacct and squeue know of many jobs/arrays: one call of each."""
    if not job_ids:
        return {}
    ids = ",".join(sorted(set(job_ids)))
    out: dict[str, SlurmTask] = {}
    acct = run(sacct_command(ids))
    if acct.returncode == 0:
        out.update(parse_sacct(acct.stdout))
    live = run(squeue_command(ids))
    if live.returncode == 0:
        for jid, (state, elapsed, node, reason) in parse_squeue(live.stdout).items():
            # squeue is live; sacct lags (~5 s), and without accounting it is all we have.
            old = out.get(jid)
            if old is None:
                out[jid] = SlurmTask(SlurmRun(state, elapsed, node), (), reason, accounted=False)
            elif old.state in (*TERMINAL, "REQUEUED") and state in NEW_RUN_STATES:
                # Requeued (preempted, node failure): sacct has no row for the new run yet, and
                # its last row is an earlier run that ended (recorded: preempted_requeued).
                new = SlurmRun(state, elapsed, node, partition=old.current.partition)
                out[jid] = SlurmTask(new, (*old.earlier, old.current), reason)
            else:
                current = dataclasses.replace(old.current, state=state, elapsed=elapsed, node=node)
                out[jid] = SlurmTask(current, old.earlier, reason)
    return out
