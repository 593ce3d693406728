"""The local executor (real processes, no Slurm): submit-and-exit, dependencies, 2 tasks, cancel."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from pathlib import Path

from cnncam.cli import main
from cnncam.config import load_config
from cnncam.launch.executors import Launcher
from cnncam.launch.jobs import TaskStatus, job_status, load_records
from cnncam.launch.probe import ProbeMergeTask, ProbeTask, expected_value
from cnncam.launch.tasks import pid_alive
from cnncam.runs import RunPaths


def cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


def wait_done(run: Path, timeout_s: float = 90) -> list[TaskStatus]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = job_status(load_records(RunPaths(run)), paths=RunPaths(run))
        if rows and all(r.done for r in rows):
            return rows
        time.sleep(0.2)
    logs = "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*/*_log.*")))
    raise AssertionError(f"local jobs of {run} did not finish in {timeout_s} s:\n{logs}")


def test_local_probe_submits_and_returns(tmp_path: Path) -> None:
    out = cli(
        "probe",
        "--executor",
        "local",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=p",
        "--steps",
        "3",
        "--step-s",
        "0.05",
    )
    assert "executor: local (requested)" in out and "submitted probe: job" in out
    rows = wait_done(tmp_path / "p")
    assert [(r.kind, r.state, r.node) for r in rows] == [("probe", "COMPLETED", "localhost")]
    state = json.loads((tmp_path / "p" / "probe" / "state.json").read_text())
    assert state["value"] == expected_value(3)
    logs = cli("logs", "--run", str(tmp_path / "p"))
    assert "probe done: step 3" in logs


def test_local_shards_then_merge_wait_for_each_other(tmp_path: Path) -> None:
    cli(
        "probe",
        "--executor",
        "local",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=s",
        "--shards",
        "2",
        "--steps",
        "3",
        "--step-s",
        "0.1",
    )
    shards, merge = load_records(RunPaths(tmp_path / "s"))
    assert len(shards.tasks) == 2 and merge.after == [shards.job_id]
    rows = wait_done(tmp_path / "s")
    assert [r.state for r in rows] == ["COMPLETED"] * 3
    merged = json.loads((tmp_path / "s" / "probe" / "merged.json").read_text())
    assert merged["values"] == [expected_value(3)] * 2
    merge_log = cli("logs", "--run", str(tmp_path / "s"), "--job", "merge")
    assert "waiting for local jobs" in merge_log


def test_local_dependency_failure_stops_the_dependent(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=f"])
    launcher = Launcher("local", cfg.run_dir, cfg.name, cfg.slurm)
    root = str(cfg.run_dir / "probe")
    first = launcher.submit("probe", [ProbeTask(root, steps=1, step_s=0.0, fail=True)])
    launcher.submit("merge", [ProbeMergeTask(root, 1)], [first])
    rows = wait_done(cfg.run_dir)
    assert [r.state for r in rows] == ["FAILED", "FAILED"]
    log = cli("logs", "--run", str(cfg.run_dir), "--job", "merge")
    assert f"dependency (local job {first.job_id}) failed" in log
    assert not (cfg.run_dir / "probe" / "merged.json").exists()


def test_local_two_tasks_get_torch_ranks(tmp_path: Path) -> None:
    cli(
        "probe",
        "--executor",
        "local",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=d",
        "--gpus",
        "0",
        "--tasks-per-node",
        "2",
        "--allreduce",
        "--steps",
        "1",
        "--step-s",
        "0",
    )
    assert wait_done(tmp_path / "d", 120)[0].state == "COMPLETED"
    infos = [json.loads((tmp_path / "d" / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["RANK"], i["WORLD_SIZE"]) for i in infos] == [("0", "2"), ("1", "2")]
    assert [i["allreduce_sum"] for i in infos] == [3, 3]


def test_local_cancel(tmp_path: Path) -> None:
    cli(
        "probe",
        "--executor",
        "local",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=c",
        "--steps",
        "500",
        "--step-s",
        "0.2",
    )
    [rec] = load_records(RunPaths(tmp_path / "c"))
    assert pid_alive(int(rec.job_id))
    out = cli("cancel", "--run", str(tmp_path / "c"))
    assert f"cancelled: {rec.job_id}" in out
    assert wait_done(tmp_path / "c", 30)[0].state == "CANCELLED"
    assert "nothing to cancel" in cli("cancel", "--run", str(tmp_path / "c"))


def test_second_training_of_a_busy_run_is_refused(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=b"])
    launcher = Launcher("local", cfg.run_dir, cfg.name, cfg.slurm)
    launcher.submit("train", [ProbeTask(str(cfg.run_dir / "probe"), steps=200, step_s=0.1)])
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(["train", "--executor", "local", "--set", f"runs_dir={tmp_path}", "--set", "name=b"])
    assert rc == 2 and "still queued or running" in buf.getvalue() and "(train, RUNNING)" in buf.getvalue()
    assert len(load_records(RunPaths(cfg.run_dir))) == 1  # nothing submitted
    cli("cancel", "--run", str(cfg.run_dir))
    assert wait_done(cfg.run_dir, 30)[0].state == "CANCELLED"


def test_local_jobs_of_a_launcher_that_ignores_sigint_can_be_cancelled(tmp_path: Path) -> None:
    """`nohup launch.py ... &` (or a CI step) ignores SIGINT, and an ignored signal stays ignored
    across exec: the local jobs must still be spawned so that `cancel` (SIGINT) stops them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = ("--set", f"runs_dir={tmp_path}", "--set", "name=n", "--steps", "500", "--step-s", "0.2")
        cli("probe", "--executor", "local", *run)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the launcher's own is left alone
    finally:
        signal.signal(signal.SIGINT, previous)
    [rec] = load_records(RunPaths(tmp_path / "n"))
    assert pid_alive(int(rec.job_id))
    assert f"cancelled: {rec.job_id}" in cli("cancel", "--run", str(tmp_path / "n"))
    assert wait_done(tmp_path / "n", 30)[0].state == "CANCELLED"
