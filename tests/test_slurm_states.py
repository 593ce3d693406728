"""``status`` replayed from real sacct/squeue output (issue 12, item 5); no cluster needed.

Each ``tests/slurm_recordings/<case>.json`` was recorded on the local cluster by
``tests/slurm_recordings/record.py`` (its ``how`` field says how); ``hand_written_*.json`` are
the cases this machine cannot produce, written from Slurm's documented output format.  The
replay feeds the recorded output to ``job_status`` through the exact commands it runs, with the
task state files the jobs wrote, and checks the state, the restarts and the advice.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cnncam.launch.jobs import JobRecord, TaskStatus, format_status, job_status
from cnncam.launch.records import task_folder
from cnncam.launch.tasks import state_file
from cnncam.runs import RunPaths

RECORDINGS = Path(__file__).parent / "slurm_recordings"


def _doc(case: str) -> dict[str, Any]:
    return json.loads((RECORDINGS / f"{case}.json").read_text())  # type: ignore[no-any-return]


def replay(case: str, label: str, tmp_path: Path) -> tuple[list[TaskStatus], str]:
    doc = _doc(case)
    capture = next(c for c in doc["captures"] if c["label"] == label)
    paths = RunPaths(tmp_path / case)
    for tid, state in capture["state_files"].items():
        path = state_file(task_folder(paths, tid), tid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state))
    records = [JobRecord(**r) for r in doc["records"]]

    def recorded(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        out = capture[cmd[0]]
        assert cmd == out["argv"], "status no longer runs the command this case was recorded with"
        return subprocess.CompletedProcess(cmd, out["rc"], out["stdout"], "")

    rows = job_status(records, recorded, paths)
    return rows, format_status(rows)


def test_every_recording_says_how_it_was_made() -> None:
    cases = sorted(RECORDINGS.glob("*.json"))
    assert len(cases) >= 10
    for path in cases:
        doc = json.loads(path.read_text())
        assert doc["case"] == path.stem and len(doc["how"]) > 80 and doc["captures"]
        assert ("hand-written" in doc["recorded"]) == path.stem.startswith("hand_written_")


def test_preempted_then_requeued_counts_the_preemption_and_ends_completed(tmp_path: Path) -> None:
    [row], text = replay("preempted_requeued", "requeued, pending", tmp_path)
    # sacct's only row is the PREEMPTED run; squeue already shows the requeued job waiting.
    assert (row.state, row.restarts) == ("PENDING", 1)
    assert "requeued after PREEMPTED" in row.detail and row.next_step == ""
    [row], _ = replay("preempted_requeued", "running again", tmp_path)
    assert (row.state, row.restarts, row.node) == ("RUNNING", 1, "n1")
    [row], text = replay("preempted_requeued", "completed", tmp_path)
    # The stale PREEMPTED row is history, not the outcome.
    assert (row.state, row.restarts, row.next_step) == ("COMPLETED", 1, "")
    assert row.detail == "completed after 1 restart(s): PREEMPTED"
    assert "COMPLETED" in text.splitlines()[1]


def test_preempt_mode_cancel_is_final_and_says_how_to_resume(tmp_path: Path) -> None:
    [row], text = replay("preempt_cancel", "preempted, not requeued", tmp_path)
    assert (row.state, row.restarts) == ("PREEMPTED", 0) and row.done
    assert row.detail.startswith("preempted and not requeued")
    assert row.next_step.startswith("run `python jobs/launch.py probe") and "again" in row.next_step
    assert "next: run `python jobs/launch.py probe" in text


def test_node_failure_requeued_then_completed(tmp_path: Path) -> None:
    [row], _ = replay("node_fail_requeued", "node failed, requeued, pending", tmp_path)
    assert (row.state, row.restarts) == ("PENDING", 1) and "requeued after NODE_FAIL" in row.detail
    [row], _ = replay("node_fail_requeued", "completed after the node came back", tmp_path)
    assert (row.state, row.restarts) == ("COMPLETED", 1) and "NODE_FAIL" in row.detail


def test_node_failure_without_requeue(tmp_path: Path) -> None:
    [row], _ = replay("node_fail", "node failed, not requeued", tmp_path)
    assert row.state == "NODE_FAIL" and row.done
    assert row.detail.startswith("node n2 failed under the job") and "again" in row.next_step


def test_over_memory_reads_failed_but_is_explained_as_out_of_memory(tmp_path: Path) -> None:
    [row], _ = replay("out_of_memory", "killed over its memory", tmp_path)
    assert row.state == "FAILED"  # what sacct says without cgroups
    assert row.detail.startswith("out of memory") and "256M" in row.detail
    assert row.next_step.startswith("raise --mem-gb") and "checkpoints/last.pt" in row.next_step


def test_out_of_memory_state_with_cgroups(tmp_path: Path) -> None:
    [row], _ = replay("hand_written_out_of_memory_cgroup", "killed by the cgroup", tmp_path)
    assert row.state == "OUT_OF_MEMORY" and row.detail.startswith("out of memory")
    assert "raise --mem-gb" in row.next_step


def test_timeout_before_a_checkpoint(tmp_path: Path) -> None:
    for case in ("timeout_no_checkpoint", "timeout_no_signal"):
        [row], _ = replay(case, "timed out", tmp_path)
        assert row.state == "TIMEOUT" and "before it could checkpoint" in row.detail, case
        assert row.next_step.startswith("raise --time or --signal-delay"), case


def test_scontrol_missing_on_the_node_fails_with_the_checkpoint_kept(tmp_path: Path) -> None:
    [row], _ = replay("scontrol_missing", "checkpointed, requeue failed", tmp_path)
    assert row.state == "FAILED"
    assert row.detail.startswith("checkpoint saved, but the job could not requeue itself")
    assert "scontrol" in row.detail and "again" in row.next_step


def test_a_merge_waiting_on_failed_shards_is_flagged(tmp_path: Path) -> None:
    rows, text = replay("dependency_never_satisfied", "merge left waiting", tmp_path)
    assert [(r.kind, r.state) for r in rows] == [
        ("probe", "FAILED"),
        ("probe", "FAILED"),
        ("merge", "PENDING"),
    ]
    assert "waits for a job that failed" in rows[2].detail and "cancel --run" in rows[2].next_step
    assert "exit code 3:0" in rows[0].detail and "logs --run" in rows[0].next_step
    assert text.count("exit code 3:0") == 1  # the two shards share one note


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cam", "cam --run"),
        ("merge", "merge --run"),
        ("report", "report --run"),
    ],
)
def test_advice_names_the_command_of_each_step(tmp_path: Path, kind: str, expected: str) -> None:
    doc = _doc("node_fail")
    doc["records"][0]["kind"] = kind
    rows = job_status(
        [JobRecord(**doc["records"][0])],
        lambda cmd: subprocess.CompletedProcess(cmd, 0, doc["captures"][0][cmd[0]]["stdout"], ""),
        RunPaths(tmp_path / "run"),
    )
    assert expected in rows[0].next_step and str(tmp_path / "run") in rows[0].next_step
