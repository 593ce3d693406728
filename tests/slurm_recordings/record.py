"""Record what sacct and squeue say for each real-world Slurm case, on the local cluster.

    sudo slurm/up.sh     # nodes vm, n1, n2; partitions cpu, mn, mncancel, mnurgent
    PYTHONPATH=$PWD python tests/slurm_recordings/record.py [CASE ...]

Each case submits real jobs (the cnncam probe or training through the CLI, or a plain sbatch
script where cnncam cannot produce the case), drives them into the state it is about (preemption,
a node set DOWN, a memory limit, a time limit, a PATH without scontrol), and writes
``tests/slurm_recordings/<case>.json``: the jobs.json records, and at each moment of interest
the exact ``sacct`` and ``squeue`` commands ``status`` runs, their output, and the state files the
tasks wrote.  ``tests/test_slurm_states.py`` replays them through ``status`` (no cluster needed).
Not a test itself: it takes minutes and needs root's cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnncam.launch.records import load_records, task_folder
from cnncam.launch.slurm_state import sacct_command, squeue_command
from cnncam.launch.tasks import state_file
from cnncam.runs import RunPaths

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import slurm_fixtures as fixtures  # noqa: E402  (tests/ is not a package)

WORK = Path(tempfile.mkdtemp(prefix="cnncam-recordings-"))


def sh(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr}")
    return out.stdout.strip()


def cli(*argv: str) -> None:
    rc, out = fixtures.cli(*argv)
    if rc != 0:
        raise RuntimeError(f"launch.py {' '.join(argv)} failed:\n{out}")


def wait(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    return fixtures.wait_until(pred, timeout_s, what)


def squeue_state(jid: str) -> str:
    return sh("squeue", "-h", "-j", jid, "-o", "%T", check=False)


def sacct_state(jid: str) -> str:
    """The allocation state of the latest run of a job, as sacct has it now."""
    rows = sh("sacct", "-X", "-n", "-P", "-o", "State", "-j", jid, check=False).splitlines()
    return rows[-1].split()[0] if rows else ""


class Recording:
    def __init__(self, case: str, how: str) -> None:
        self.case, self.how = case, how
        self.records: list[dict[str, Any]] = []
        self.captures: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.run: Path | None = None

    def use_run(self, run: Path) -> None:
        self.run = run

    def add_record(self, **rec: Any) -> None:
        self.records.append(rec)

    def capture(self, label: str, ids: list[str]) -> None:
        time.sleep(3)  # sacct lags a few seconds behind the controller
        if self.run is not None:
            self.records = [r.__dict__.copy() for r in load_records(RunPaths(self.run))]
            ids = sorted({r["job_id"] for r in self.records})
        joined = ",".join(ids)
        acct = subprocess.run(sacct_command(joined), capture_output=True, text=True, timeout=60)
        live = subprocess.run(squeue_command(joined), capture_output=True, text=True, timeout=60)
        states: dict[str, Any] = {}
        if self.run is not None:
            for rec in self.records:
                for tid in rec["tasks"]:
                    path = state_file(task_folder(RunPaths(self.run), tid), tid)
                    if path.exists():
                        states[tid] = json.loads(path.read_text())
        self.captures.append(
            {
                "label": label,
                "seconds": round(time.monotonic() - self.t0, 1),
                "sacct": {"argv": acct.args, "rc": acct.returncode, "stdout": acct.stdout},
                "squeue": {"argv": live.args, "rc": live.returncode, "stdout": live.stdout},
                "state_files": states,
            }
        )
        print(f"[{self.case}] {label}:\n{acct.stdout}{live.stdout}", flush=True)

    def save(self) -> None:
        version = sh("sinfo", "--version")
        doc = {
            "case": self.case,
            "how": self.how,
            "recorded": time.strftime("%Y-%m-%d") + f" on the local cluster of slurm/up.sh ({version})",
            "run": str(self.run) if self.run is not None else None,
            "records": self.records,
            "captures": self.captures,
        }
        (HERE / f"{self.case}.json").write_text(json.dumps(doc, indent=1) + "\n")


def probe(name: str, *args: str) -> Path:
    cli("probe", "--executor", "slurm", f"--set=runs_dir={WORK}", f"--set=name={name}", "--gpus", "0", *args)
    return WORK / name


def job_of(run: Path) -> str:
    return load_records(RunPaths(run))[0].job_id


def started(run: Path, jid: str, steps: int = 2) -> None:
    """Wait until the probe is running and has made a few steps (its state file says RUNNING)."""
    wait(lambda: squeue_state(jid) == "RUNNING", 60, f"job {jid} to run")
    time.sleep(steps * 0.5 + 1)


def urgent() -> str:
    """A job in the high-priority partition that needs both two-node machines whole."""
    return sh(
        "sbatch", "--parsable", "-p", "mnurgent", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 8"
    )


def case_preempted_requeued() -> None:
    rec = Recording(
        "preempted_requeued",
        "probe (40 steps of 0.5 s) on partition mn (PreemptMode=REQUEUE); once running, a job in "
        "partition mnurgent (PriorityTier=10, -N2 --exclusive) preempts it; Slurm requeues it and it "
        "completes after the urgent job.  Captured while requeued, running again, and completed.",
    )
    run = probe("preempted-requeued", "--partition", "mn", "--steps", "40", "--step-s", "0.5")
    rec.use_run(run)
    jid = job_of(run)
    started(run, jid)
    urgent()
    wait(lambda: squeue_state(jid) == "PENDING", 60, "the preempted job to be requeued")
    rec.capture("requeued, pending", [jid])
    wait(lambda: squeue_state(jid) == "RUNNING", 120, "the requeued job to run again")
    rec.capture("running again", [jid])
    wait(lambda: sacct_state(jid) == "COMPLETED" and not squeue_state(jid), 180, "completion")
    rec.capture("completed", [jid])
    rec.save()


def case_preempt_cancel() -> None:
    rec = Recording(
        "preempt_cancel",
        "probe (40 steps of 0.5 s) on partition mncancel (PreemptMode=CANCEL); once running, a job in "
        "mnurgent (-N2 --exclusive) preempts it: Slurm sends SIGTERM, the probe saves its state and "
        "exits, and nothing requeues it.",
    )
    run = probe("preempt-cancel", "--partition", "mncancel", "--steps", "40", "--step-s", "0.5")
    rec.use_run(run)
    jid = job_of(run)
    started(run, jid)
    urgent()
    wait(lambda: sacct_state(jid) == "PREEMPTED" and not squeue_state(jid), 60, "the preemption")
    rec.capture("preempted, not requeued", [jid])
    rec.save()


def _node_fail(case: str, *extra: str) -> None:
    requeue = "--no-requeue" not in " ".join(extra)
    rec = Recording(
        case,
        "probe (40 steps of 0.5 s) on partition mn pinned to node n2 (--sbatch-extra=--nodelist=n2"
        + (", --no-requeue" if not requeue else "")
        + "); once running, `scontrol update nodename=n2 state=down` (the node fails under the "
        "job); "
        + (
            "Slurm requeues it (NODE_FAIL); captured pending, then the node is resumed and the job completes."
            if requeue
            else "the job is not requeueable, so NODE_FAIL is final."
        ),
    )
    run = probe(case.replace("_", "-"), "--partition", "mn", "--steps", "40", "--step-s", "0.5", *extra)
    rec.use_run(run)
    jid = job_of(run)
    started(run, jid)
    sh("scontrol", "update", "nodename=n2", "state=down", "reason=recording NODE_FAIL")
    try:
        if requeue:
            wait(lambda: squeue_state(jid) == "PENDING", 60, "the requeue after NODE_FAIL")
            rec.capture("node failed, requeued, pending", [jid])
        else:
            wait(lambda: sacct_state(jid) == "NODE_FAIL" and not squeue_state(jid), 60, "NODE_FAIL")
            rec.capture("node failed, not requeued", [jid])
    finally:
        # ReturnToService=2 may already have returned it (its slurmd never stopped answering).
        sh("scontrol", "update", "nodename=n2", "state=resume", check=False)
    if requeue:
        wait(lambda: sacct_state(jid) == "COMPLETED" and not squeue_state(jid), 240, "completion")
        rec.capture("completed after the node came back", [jid])
    rec.save()


def case_node_fail_requeued() -> None:
    _node_fail("node_fail_requeued", "--sbatch-extra=--nodelist=n2")


def case_node_fail() -> None:
    _node_fail("node_fail", "--sbatch-extra=--nodelist=n2", "--sbatch-extra=--no-requeue")


def case_out_of_memory() -> None:
    rec = Recording(
        "out_of_memory",
        "cnncam training with --mem-gb 0.25 on partition mn (memory is consumable there and "
        "JobAcctGatherParams=OverMemoryKill): importing torch alone needs more, so Slurm kills the "
        "step.  Without cgroups the job reads FAILED and the step CANCELLED; MaxRSS > ReqMem says why.",
    )
    data = WORK / "shapes"
    if not data.exists():
        cli("synth", "--out", str(data), "--classes", "2", "--per-class", "4", "--size", "16")
    cli(
        "train",
        "--executor",
        "slurm",
        f"--set=runs_dir={WORK}",
        "--set=name=oom",
        f"--set=data.root={data}",
        "--set=data.image_size=16",
        "--set=data.resize=16",
        "--set=data.num_workers=0",
        "--partition",
        "mn",
        "--gpus",
        "0",
        "--mem-gb",
        "0.25",
    )
    run = WORK / "oom"
    rec.use_run(run)
    jid = job_of(run)
    wait(
        lambda: sacct_state(jid) not in ("", "PENDING", "RUNNING") and not squeue_state(jid), 120, "the kill"
    )
    rec.capture("killed over its memory", [jid])
    rec.save()


def case_timeout_no_checkpoint() -> None:
    rec = Recording(
        "timeout_no_checkpoint",
        "probe with --time 1 --signal-delay 10 whose single step takes 600 s: USR2 comes 10 s before the "
        "limit, but the step never reaches a boundary to save at, so Slurm kills the job at the time limit "
        "(TIMEOUT) and the task's state file still says RUNNING.  Partition cpu.",
    )
    run = probe(
        "timeout",
        "--partition",
        "cpu",
        "--time",
        "1",
        "--signal-delay",
        "10",
        "--steps",
        "1",
        "--step-s",
        "600",
    )
    rec.use_run(run)
    jid = job_of(run)
    wait(lambda: sacct_state(jid) == "TIMEOUT" and not squeue_state(jid), 200, "the time limit")
    rec.capture("timed out", [jid])
    rec.save()


def case_timeout_no_signal() -> None:
    rec = Recording(
        "timeout_no_signal",
        "a plain sbatch script (no --signal at all, as on a cluster that sends none) with --time=1 on "
        "partition cpu running `srun sleep 600`: TIMEOUT, with no state file (not a cnncam task).",
    )
    script = WORK / "sleep.sh"
    script.write_text("#!/bin/bash\n#SBATCH -p cpu\n#SBATCH --time=1\n#SBATCH -o /dev/null\nsrun sleep 600\n")
    jid = sh("sbatch", "--parsable", str(script))
    rec.add_record(kind="train", executor="slurm", job_id=jid, tasks=[jid], folder="", name="sleep")
    wait(lambda: sacct_state(jid) == "TIMEOUT" and not squeue_state(jid), 200, "the time limit")
    rec.capture("timed out", [jid])
    rec.save()


def case_scontrol_missing() -> None:
    bin_dir = WORK / "bin-without-scontrol"
    bin_dir.mkdir(exist_ok=True)
    srun = shutil.which("srun")
    assert srun is not None
    if not (bin_dir / "srun").exists():
        (bin_dir / "srun").symlink_to(srun)
    rec = Recording(
        "scontrol_missing",
        f"probe (40 steps of 0.5 s) on partition cpu with --setup 'export PATH={bin_dir}' (a folder "
        "holding only srun: scontrol is absent on the node); `scancel --signal=USR2` asks it to "
        "checkpoint and requeue: it saves its state, submitit's `scontrol requeue` fails, and the task "
        "records RequeueFailed before it exits.",
    )
    run = probe(
        "no-scontrol",
        "--partition",
        "cpu",
        "--steps",
        "40",
        "--step-s",
        "0.5",
        "--setup",
        f"export PATH={bin_dir}",
    )
    rec.use_run(run)
    jid = job_of(run)
    started(run, jid)
    sh("scancel", "--signal=USR2", jid)
    wait(lambda: sacct_state(jid) not in ("", "PENDING", "RUNNING") and not squeue_state(jid), 60, "the end")
    rec.capture("checkpointed, requeue failed", [jid])
    rec.save()


def case_dependency_never_satisfied() -> None:
    rec = Recording(
        "dependency_never_satisfied",
        "probe array of 2 shards whose batch script fails (--setup 'exit 3') and the merge job waiting "
        "for them (afterok) on partition cpu: the merge stays PENDING (DependencyNeverSatisfied).",
    )
    run = probe(
        "orphan", "--partition", "cpu", "--shards", "2", "--steps", "1", "--step-s", "0", "--setup", "exit 3"
    )
    rec.use_run(run)
    merge = load_records(RunPaths(run))[1].job_id
    wait(
        lambda: "DependencyNeverSatisfied" in sh("squeue", "-h", "-j", merge, "-o", "%r", check=False),
        120,
        "it",
    )
    rec.capture("merge left waiting", [merge])
    sh("scancel", merge)
    rec.save()


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for case in chosen:
        CASES[case]()
    print(f"recordings in {HERE}; work files in {WORK}")
