"""jobs.json, status parsing and batching, log following, and the task-side signal wiring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission
from train_helpers import StopAfter

from cnncam.errors import CnncamError, LaunchError
from cnncam.launch import jobs as J
from cnncam.launch import slurm_state as SS
from cnncam.launch import tasks as T
from cnncam.launch.probe import ProbeTask, expected_value, next_value, run_probe
from cnncam.runs import RunPaths
from cnncam.stop import StopFlag

# Recorded from the local test cluster (slurm/up.sh): job 4 requeued once, array 3 half done,
# then everything cancelled; sacct still lists the pending range next to the started task.
SACCT = """4|REQUEUED|00:00:01|vm
3_0|COMPLETED|00:00:03|vm
3_1|COMPLETED|00:00:03|vm
3_2|CANCELLED by 0|00:00:03|vm
3_[2-3%1]|CANCELLED by 0|00:00:00|None assigned
4|CANCELLED by 0|00:00:02|vm
"""


def _flat(tasks: dict[str, SS.SlurmTask]) -> dict[str, tuple[str, str, str, int | None]]:
    return {k: (t.state, t.current.elapsed, t.current.node, t.restarts) for k, t in tasks.items()}


def test_parse_sacct_expands_arrays_and_counts_requeues() -> None:
    assert _flat(SS.parse_sacct(SACCT)) == {
        "4": ("CANCELLED", "00:00:02", "vm", 1),
        "3_0": ("COMPLETED", "00:00:03", "vm", 0),
        "3_1": ("COMPLETED", "00:00:03", "vm", 0),
        "3_2": ("CANCELLED", "00:00:03", "vm", 0),
        "3_3": ("CANCELLED", "00:00:00", "", 0),
    }


def test_expand_array_ranges() -> None:
    assert SS._expand("13_[1-3,5%2]") == ["13_1", "13_2", "13_3", "13_5"]
    assert SS._expand("13_4") == ["13_4"] and SS._expand("13") == ["13"]


def _record(kind: str, job_id: str, tasks: list[str], executor: str = "slurm", **kw: object) -> J.JobRecord:
    return J.JobRecord(kind, executor, job_id, tasks, "/runs/x/slurm/%j", f"cnncam-x-{kind}", **kw)  # type: ignore[arg-type]


def test_status_uses_one_sacct_and_one_squeue_call_for_all_jobs() -> None:
    calls: list[list[str]] = []

    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[0] == "sacct":
            return subprocess.CompletedProcess(
                cmd,
                0,
                "7|COMPLETED|00:01:00|n1\n8_[0-2]|PENDING|00:00:00|None assigned\n"
                "9|REQUEUED|00:00:05|n2\n9|PENDING|00:00:00|None assigned\n",
                "",
            )
        return subprocess.CompletedProcess(cmd, 0, "8_0|RUNNING|0:04|n3\n9|RUNNING|0:01|n2\n", "")

    records = [
        _record("train", "7", ["7"]),
        _record("cam", "8", ["8_0", "8_1", "8_2"], shards=[0, 1, 2]),
        _record("merge", "9", ["9"], after=["8"]),
    ]
    rows = J.job_status(records, run=fake)
    assert [c[0] for c in calls] == ["sacct", "squeue"]
    assert calls[0][-1] == "7,8,9" and calls[1][-1] == "7,8,9"
    assert [(r.job_id, r.task, r.shard, r.state, r.node, r.restarts) for r in rows] == [
        ("7", None, None, "COMPLETED", "n1", 0),
        ("8_0", 0, 0, "RUNNING", "n3", 0),  # squeue is live; sacct lagged
        ("8_1", 1, 1, "PENDING", "", 0),
        ("8_2", 2, 2, "PENDING", "", 0),
        ("9", None, None, "RUNNING", "n2", 1),
    ]
    table = J.format_status(rows).splitlines()
    assert table[0].split() == ["JOB", "KIND", "TASK", "SHARD", "STATE", "ELAPSED", "NODE", "RESTARTS"]
    assert table[2].split() == ["8_0", "cam", "0", "0", "RUNNING", "0:04", "n3", "0"]


def test_status_without_accounting_falls_back_to_squeue() -> None:
    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        if cmd[0] == "sacct":
            return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled")
        return subprocess.CompletedProcess(cmd, 0, "5|RUNNING|0:09|n1\n", "")

    rows = J.job_status([_record("train", "5", ["5"]), _record("report", "6", ["6"])], run=fake)
    assert [(r.state, r.restarts) for r in rows] == [("RUNNING", None), ("UNKNOWN", None)]
    assert "?" in J.format_status(rows).splitlines()[1]


def test_jobs_json_round_trip_and_task_lookup(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    assert J.load_records(paths) == []
    with pytest.raises(CnncamError, match="no jobs recorded"):
        J.require_records(paths)
    a = _record("train", "7", ["7"], command="python jobs/launch.py train")
    b = _record("cam", "8", ["8_0", "8_1"], shards=[3, 5], num_shards=6, after=["7"])
    J.append_records(paths, [a])
    J.append_records(paths, [b])
    assert J.load_records(paths) == [a, b]
    assert J.find_task([a, b], None, None) == (b, "8_0")
    assert J.find_task([a, b], "train", None) == (a, "7")
    assert J.find_task([a, b], "8", 1) == (b, "8_1")
    assert J.find_task([a, b], "8_1", None) == (b, "8_1")
    with pytest.raises(CnncamError, match="no recorded job 'report'; recorded: 7 \\(train\\), 8 \\(cam\\)"):
        J.find_task([a, b], "report", None)
    with pytest.raises(CnncamError, match="tasks 0..1; got --task 2"):
        J.find_task([a, b], "cam", 2)
    out, err = J.log_paths(paths, b, "8_1", rank=0)
    assert (out.name, err.name) == ("8_1_0_log.out", "8_1_0_log.err")
    assert out.parent == (tmp_path / "slurm" / "8_1").absolute()  # in this run, whatever jobs.json says


def test_follow_logs_prints_growth_until_done(tmp_path: Path) -> None:
    rec = J.JobRecord("probe", "slurm", "9", ["9"], str(tmp_path / "%j"), "n")
    paths = RunPaths(tmp_path)
    out, err = J.log_paths(paths, rec, "9")
    out.parent.mkdir(parents=True)
    chunks: list[str] = []
    polls = iter(range(100))

    def is_done() -> bool:
        n = next(polls)
        if n == 1:
            out.write_text("line 1\n")
        if n == 2:
            with out.open("a") as f:
                f.write("line 2\n")
            err.write_text("warning\n")
        return n >= 2

    J.follow_logs(paths, rec, "9", 0, chunks.append, is_done, poll_s=0.0)
    assert chunks == ["line 1\n", "line 2\n", "warning\n"]


# ----------------------------------------------------------------------------------------------
# Task side


def test_stop_handlers_only_set_the_flag_then_requeue_through_submitit() -> None:
    calls: list[int] = []
    old_usr, old_term = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's handler
    try:
        stop = StopFlag()
        handlers = T.StopHandlers(stop)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and "SIGUSR2" in stop.reason and calls == []  # submitit's not called yet
        with pytest.raises(SystemExit) as exc:
            handlers.finish_interrupted()
        assert calls == [signal.SIGUSR2] and exc.value.code == 0
        stop2 = StopFlag()
        handlers2 = T.StopHandlers(stop2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop2.requested and "SIGTERM" in stop2.reason
        with pytest.raises(SystemExit) as exc:
            handlers2.finish_interrupted()
        assert exc.value.code == 128 + signal.SIGTERM and calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old_usr)
        signal.signal(signal.SIGTERM, old_term)


def test_checkpoint_returns_a_fresh_task_with_the_same_config(tmp_path: Path) -> None:
    task = ProbeTask(str(tmp_path), steps=3, shard=2)
    delayed = task.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.function == task and delayed.function is not task and delayed.args == ()
    waiting = T.AfterOk(task, (T.LocalDep(1, "x"),)).checkpoint()
    assert waiting.function == T.AfterOk(task, ())  # dependencies were met before the first start


def test_export_local_dist_env_maps_submitit_local_ids() -> None:
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "40123",
    }
    T.export_local_dist_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == (
        "1",
        "1",
        "2",
        "127.0.0.1",
    )
    assert env["MASTER_PORT"] == str(20000 + 40123 % 40000)
    single = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "1"}
    T.export_local_dist_env(single)
    assert "RANK" not in single
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_LOCAL_NTASKS": "2"}
    T.export_local_dist_env(slurm)
    assert "RANK" not in slurm  # under Slurm the training code reads SLURM_* itself


def _state(path: Path, state: str) -> None:
    path.write_text(json.dumps({"state": state, "pid": 1}))


def test_wait_for_local_dependencies_reads_state_files(tmp_path: Path) -> None:
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    _state(ok, "COMPLETED")
    _state(bad, "FAILED")
    me = os.getpid()
    T.wait_for_local((T.LocalDep(me, str(ok)),), poll_s=0.01)
    with pytest.raises(LaunchError, match=f"local job {me}\\) failed"):
        T.wait_for_local((T.LocalDep(me, str(ok)), T.LocalDep(me, str(bad))), poll_s=0.01)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(LaunchError, match="failed"):  # ended without writing a state
        T.wait_for_local((T.LocalDep(dead.pid, str(tmp_path / "none.json")),), poll_s=0.01)
    running = tmp_path / "running.json"
    _state(running, "RUNNING")
    with pytest.raises(LaunchError, match="failed"):  # ended while it said RUNNING: killed
        T.wait_for_local((T.LocalDep(dead.pid, str(running)),), poll_s=0.01)
    late = tmp_path / "late.json"
    _state(late, "RUNNING")
    timer = threading.Timer(0.2, lambda: _state(late, "COMPLETED"))
    timer.start()
    T.wait_for_local((T.LocalDep(me, str(late)),), poll_s=0.01)  # waits while the job runs
    timer.join()


def test_task_state_file_is_written_and_read_as_plain_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "%j"))
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    path = T.state_file(tmp_path / "77", "77")
    seen = []
    with T.recorded_state():
        seen.append(T.read_state(path))
    assert seen == ["RUNNING"] and T.read_state(path) == "COMPLETED"
    with pytest.raises(ValueError), T.recorded_state():
        raise ValueError("boom")
    assert T.read_state(path) == "FAILED" and "ValueError: boom" in json.loads(path.read_text())["error"]
    with pytest.raises(LaunchError), T.recorded_state(final=False):
        raise LaunchError("dependency failed")
    assert T.read_state(path) == "FAILED"
    with T.recorded_state(final=False):  # a wait before the work never says COMPLETED
        pass
    assert T.read_state(path) == "RUNNING"
    # Whatever else lies there is not a state: never unpickled, never trusted.
    for junk in (b"\x80\x04K\x01.", b"[1, 2]", b'{"state": "PWNED"}', b"\xff" * 100):
        path.write_bytes(junk)
        assert T.read_state(path) is None


def test_probe_stops_at_a_step_boundary_and_resumes_exactly(tmp_path: Path) -> None:
    status, state = run_probe(tmp_path, 7, 0.0, StopAfter(3))
    assert status == "interrupted" and state["step"] == 3
    assert state["value"] == next_value(next_value(next_value(0, 0), 1), 2)
    status, state = run_probe(tmp_path, 7, 0.0, StopFlag())
    assert status == "completed" and state["value"] == expected_value(7)
    assert [s["step"] for s in state["starts"]] == [0, 3]


def test_clean_slurm_env_hides_the_parent_job_but_keeps_slurm_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnncam.launch.executors import clean_slurm_env

    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SBATCH_PARTITION", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_CONF", "/opt/slurm/etc/slurm.conf")
    monkeypatch.setenv("PYTHONPATH", "/mine")
    with clean_slurm_env():
        assert "SLURM_JOB_ID" not in os.environ and "SBATCH_PARTITION" not in os.environ
        assert "WORLD_SIZE" not in os.environ
        assert os.environ["SLURM_CONF"] == "/opt/slurm/etc/slurm.conf"
        root = str(Path(T.__file__).resolve().parents[2])
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [root, "/mine"]
    assert os.environ["SLURM_JOB_ID"] == "12" and os.environ["PYTHONPATH"] == "/mine"
    assert os.environ["SBATCH_PARTITION"] == "x" and os.environ["WORLD_SIZE"] == "4"


def test_array_task_cancelled_while_pending_reads_cancelled() -> None:
    # Recorded: `scancel 19_1` on a pending task removes it from the array; no record remains.
    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        text = "19_0|COMPLETED|00:00:02|vm\n19_2|RUNNING|00:00:01|vm\n" if cmd[0] == "sacct" else ""
        return subprocess.CompletedProcess(cmd, 0, text, "")

    rows = J.job_status(
        [_record("cam", "19", ["19_0", "19_1", "19_2"]), _record("train", "20", ["20"])], fake
    )
    assert [r.state for r in rows] == ["COMPLETED", "CANCELLED", "RUNNING", "UNKNOWN"]
