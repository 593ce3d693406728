"""The run lock (cnncam.runlock): modes, holder info in the error, dead holders, forks, ranks, fallback."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cnncam import runlock as L
from cnncam.config import load_config
from cnncam.launch.tasks import CamShardTask, MergeTask, ReportTask, TrainTask
from cnncam.runlock import HOLDERS_DIR, RunBusyError, RunLock, hold_run, read_holders

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import os, sys, time
from pathlib import Path
from cnncam.runlock import RunLock
RunLock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]).acquire()
if sys.argv[4:] == ["fork"]:
    child = os.fork()
    if child == 0:  # like a DataLoader worker: inherits every descriptor, outlives a killed parent
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def hold(procs: list[subprocess.Popen[str]], root: Path, mode: str, purpose: str, *extra: str) -> list[str]:
    """Start a process holding the lock; return what it printed up to "held"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242"}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), mode, purpose, *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs.append(p)
    lines = []
    while True:
        line = p.stdout.readline().strip() if p.stdout else ""
        assert line or p.poll() is None, "the holder process died"
        lines.append(line)
        if line == "held":
            return lines


def test_training_excludes_everything_and_the_error_names_the_holder(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    hold(holders, tmp_path, "exclusive", "train")
    pid = holders[0].pid
    for mode in ("exclusive", "shared"):
        with pytest.raises(RunBusyError) as e:
            RunLock(tmp_path, mode, "cam export").acquire()  # type: ignore[arg-type]
        msg = str(e.value)
        assert (
            f"run folder {tmp_path} is in use: train (exclusive) by pid {pid} on {socket.gethostname()}"
            in msg
        )
        assert "job 4242" in msg and "cancel --run" in msg
    assert [h.pid for h in read_holders(tmp_path)] == [pid]


def test_exports_share_the_run_but_exclude_training(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    hold(holders, tmp_path, "shared", "cam export")
    hold(holders, tmp_path, "shared", "cam export")  # a second array task at the same time
    with RunLock(tmp_path, "shared", "merge"):
        assert len(read_holders(tmp_path)) == 3
    with pytest.raises(RunBusyError, match=r"cam export \(shared\) by pid \d+.*; cam export \(shared\)"):
        RunLock(tmp_path, "exclusive", "train").acquire()


def test_a_killed_holder_leaves_no_lock_and_its_file_is_cleaned(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    hold(holders, tmp_path, "exclusive", "train")
    holders[0].send_signal(signal.SIGKILL)
    holders[0].wait()
    assert len(list((tmp_path / HOLDERS_DIR).glob("*.json"))) == 1  # no clean-up ran
    assert read_holders(tmp_path) == []  # ... but a dead pid of this host is no holder
    with RunLock(tmp_path, "exclusive", "train") as lock:
        assert [p.name for p in (tmp_path / HOLDERS_DIR).glob("*.json")] == [lock.holder_file.name]
    assert list((tmp_path / HOLDERS_DIR).glob("*.json")) == []


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    child = int(hold(holders, tmp_path, "exclusive", "train", "fork")[0])
    try:
        holders[0].send_signal(signal.SIGKILL)
        holders[0].wait()
        assert L.pid_alive(child)  # the "DataLoader worker" still runs, with the lock file open
        with RunLock(tmp_path, "exclusive", "train"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_within_one_process_modes_are_counted(tmp_path: Path) -> None:
    outer = RunLock(tmp_path, "shared", "cam export")
    with outer, RunLock(tmp_path, "shared", "merge"):
        with pytest.raises(RunBusyError, match="another task"):
            RunLock(tmp_path, "exclusive", "train").acquire()
    assert not RunLock._held and read_holders(tmp_path) == []
    with RunLock(tmp_path, "exclusive", "train"):  # released: free again
        assert read_holders(tmp_path)[0].purpose == "train"


def test_without_file_system_locks_holder_files_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(L.fcntl, "lockf", no_locks)
    with caplog.at_level(logging.WARNING, logger="cnncam.runlock"), RunLock(tmp_path, "exclusive", "train"):
        pass
    assert "has no locks" in caplog.text
    other = {"host": "elsewhere", "pid": 1, "job": "9", "mode": "exclusive", "purpose": "train", "since": "x"}
    (tmp_path / HOLDERS_DIR).mkdir(exist_ok=True)
    (tmp_path / HOLDERS_DIR / "elsewhere-1.json").write_text(json.dumps(other))
    with pytest.raises(RunBusyError, match="train \\(exclusive\\) by pid 1 on elsewhere, job 9"):
        RunLock(tmp_path, "shared", "cam export").acquire()


def test_foreign_holder_files_are_never_trusted_beyond_plain_fields(tmp_path: Path) -> None:
    folder = tmp_path / HOLDERS_DIR
    folder.mkdir()
    (folder / "a-1.json").write_bytes(b"\x80\x04K\x01.")  # a pickle: not JSON, ignored
    (folder / "b-2.json").write_text(json.dumps({"host": "b", "pid": "x"}))
    (folder / "c-3.json").write_text(
        json.dumps({"host": "c" * 1000, "pid": 3, "mode": "m", "purpose": "p", "since": "s"})
    )
    (folder / "d-4.json").write_text(json.dumps({"host": "d" * 10_000, "pid": 4}))  # read bounded: ignored
    [h] = read_holders(tmp_path)
    assert len(h.host) == 100 and h.pid == 3
    with RunLock(tmp_path, "exclusive", "train"):  # holds the lock: the leftovers go
        assert len(list(folder.glob("*.json"))) == 1


def test_only_rank_zero_takes_the_lock_and_other_ranks_check_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holders: list[subprocess.Popen[str]]
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(RunBusyError, match="rank 0 of job 4242 did not get the lock"):
        with hold_run(tmp_path, "exclusive", "train", wait_s=0.3):
            pass
    hold(holders, tmp_path, "exclusive", "train")  # rank 0 of job 4242 (its SLURM_JOB_ID)
    with hold_run(tmp_path, "exclusive", "train", wait_s=5):
        assert not RunLock._held  # rank 1 holds nothing itself
    monkeypatch.setenv("SLURM_JOB_ID", "5000")  # another job's rank 1: rank 0 never got it
    with pytest.raises(RunBusyError, match="held by: train \\(exclusive\\) by pid"):
        with hold_run(tmp_path, "exclusive", "train", wait_s=0.3):
            pass


def _cfg(tmp_path: Path) -> Any:
    return load_config(None, [f"runs_dir={tmp_path}", "name=r"])


@pytest.mark.parametrize(
    ("task_factory", "target", "blocked_by", "runs_beside"),
    [
        (lambda c: TrainTask(c), "cnncam.train.trainer.run_training", "shared", None),
        (lambda c: CamShardTask(c, 0, 1), "cnncam.cam.export.export_shard", "exclusive", "shared"),
        (lambda c: MergeTask(c, 1), "cnncam.storage.runmerge.merge_run", "exclusive", "shared"),
    ],
)
def test_tasks_take_the_lock_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    holders: list[subprocess.Popen[str]],
    task_factory: Any,
    target: str,
    blocked_by: str,
    runs_beside: str | None,
) -> None:
    cfg = _cfg(tmp_path)
    calls: list[object] = []
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(
        __import__(module, fromlist=[name]), name, lambda *a, **k: calls.append(a) or Path("x")
    )
    if runs_beside is not None:  # e.g. another shard of the same array
        hold(holders, cfg.run_dir, runs_beside, "other shard")
        task_factory(cfg)()
        assert len(calls) == 1
        holders.pop().kill()
        calls.clear()
    hold(holders, cfg.run_dir, blocked_by, "other")
    with pytest.raises(RunBusyError):
        task_factory(cfg)()
    assert calls == []


def test_the_report_takes_no_lock(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    cfg = _cfg(tmp_path)
    hold(holders, cfg.run_dir, "exclusive", "train")
    with ReportTask(cfg).lock():  # reading a run that trains is fine: its files are replaced atomically
        pass


def test_a_read_only_run_is_exported_without_a_lock_but_never_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A colleague's run, exported into your own cam.out: nothing to write in it, nothing to lock.
    monkeypatch.setattr(L.os, "access", lambda path, mode: False)
    with caplog.at_level(logging.WARNING, logger="cnncam.runlock"), RunLock(tmp_path, "shared", "cam export"):
        assert not (tmp_path / ".lock").exists()
    assert "is read-only: cam export runs without the run lock" in caplog.text
    with RunLock(tmp_path, "exclusive", "train"):  # training needs the lock (and to write) anyway
        assert (tmp_path / ".lock").exists()
