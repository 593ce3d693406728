"""The launcher against a real local Slurm, driven by the probe task (no model, no data).

Covers submit-and-exit + status, GPUs via gres, 2-task rendezvous, preemption by USR2 and
by ``scontrol requeue`` with exact resume, arrays with ``--retry-failed``, cancel, logs,
dry-run == submitted script, and names that try to inject shell code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_fixtures import (
    cli,
    job_id,
    read_json,
    records,
    scancel,
    scontrol,
    slurm_cluster,  # noqa: F401  (the fixture, used by name)
    squeue_ids,
    statuses,
    wait_all_done,
    wait_until,
)

from cnncam.launch.probe import expected_value

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _probe(tmp_path: Path, name: str, *args: str) -> Path:
    rc, out = cli(
        "probe",
        "--set",
        f"name={name}",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--executor",
        "slurm",
        *args,
    )
    assert rc == 0, out
    assert "executor: slurm" in out and "submitted probe" in out
    return tmp_path / "runs" / name


def test_probe_on_gpu_partition_completes_and_status_reads_it(tmp_path: Path) -> None:
    run = _probe(tmp_path, "gpu1", "--partition", "gpu", "--gpus", "1", "--steps", "2", "--step-s", "0.1")
    rows = wait_all_done(run, 60)
    assert [(r.kind, r.state, r.restarts) for r in rows] == [("probe", "COMPLETED", 0)]
    info = read_json(run / "probe" / "rank0.json")
    assert info["SLURM_JOB_PARTITION"] == "gpu"
    assert info["CUDA_VISIBLE_DEVICES"] in ("0", "1")  # one fake GPU bound by gres
    assert info["SLURM_JOB_ID"] == job_id(run, "probe")
    assert read_json(run / "probe" / "state.json")["value"] == expected_value(2)
    rc, out = cli("status", "--run", str(run))
    assert rc == 0 and "COMPLETED" in out and job_id(run, "probe") in out
    rec = records(run)[0]
    assert rec.command.startswith("python jobs/launch.py probe") and rec.executor == "slurm"


def test_two_tasks_rendezvous_with_gloo(tmp_path: Path) -> None:
    run = _probe(
        tmp_path,
        "ddp",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--tasks-per-node",
        "2",
        "--allreduce",
        "--steps",
        "1",
        "--step-s",
        "0.1",
    )
    rows = wait_all_done(run, 120)
    assert rows[0].state == "COMPLETED"
    infos = [read_json(run / "probe" / f"rank{r}.json") for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1] and all(i["world_size"] == 2 for i in infos)
    assert all(i["allreduce_sum"] == 1 + 2 for i in infos)  # ranks 0 and 1 each sent rank+1
    assert "CUDA_VISIBLE_DEVICES" not in infos[0] or infos[0]["CUDA_VISIBLE_DEVICES"] == ""


def _wait_step(run: Path, restart: int, min_step: int) -> None:
    """Wait until the probe's start number `restart` is running past `min_step`."""

    def ok() -> bool:
        log = run / "slurm" / job_id(run, "probe") / f"{job_id(run, 'probe')}_0_log.out"
        return log.exists() and f"restart {restart}" in log.read_text()

    wait_until(ok, 60, f"probe start with restart {restart}")
    wait_until(lambda: statuses(run)[0].state == "RUNNING", 30, "probe running")
    import time

    time.sleep(min_step * 0.3)


def test_requeue_twice_resumes_exactly(tmp_path: Path) -> None:
    steps = 30
    run = _probe(
        tmp_path, "requeue", "--partition", "cpu", "--gpus", "0", "--steps", str(steps), "--step-s", "0.3"
    )
    jid = job_id(run, "probe")
    _wait_step(run, 0, 4)
    scancel("--signal=USR2", jid)  # preemption / time-limit warning: submitit requeues the job
    _wait_step(run, 1, 4)
    scontrol("requeue", jid)  # SIGTERM, then Slurm requeues the job itself
    rows = wait_all_done(run, 120)
    assert rows[0].state == "COMPLETED" and rows[0].restarts == 2
    state = read_json(run / "probe" / "state.json")
    assert state["step"] == steps and state["value"] == expected_value(steps)
    starts = state["starts"]
    assert [s["restart"] for s in starts] == [0, 1, 2]
    assert 0 == starts[0]["step"] < starts[1]["step"] < starts[2]["step"] < steps  # resumed, not restarted
    log = (run / "slurm" / jid / f"{jid}_0_log.out").read_text()
    assert "received SIGUSR2" in log and "received SIGTERM" in log


def test_array_retry_failed_resubmits_only_the_killed_shard(tmp_path: Path) -> None:
    run = _probe(
        tmp_path,
        "shards",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--shards",
        "3",
        "--steps",
        "6",
        "--step-s",
        "0.5",
    )
    array = records(run)[0]
    assert array.kind == "probe" and len(array.tasks) == 3 and array.shards == [0, 1, 2]
    assert records(run)[1].kind == "merge" and records(run)[1].after == [array.job_id]
    wait_until(lambda: statuses(run)[1].state == "RUNNING", 60, "shard 1 running")
    scancel(array.tasks[1])
    wait_until(
        lambda: [r.state for r in statuses(run)[:3]] == ["COMPLETED", "CANCELLED", "COMPLETED"],
        90,
        "shards 0 and 2 done, shard 1 cancelled",
    )
    assert not (run / "probe" / "merged.json").exists()

    rc, out = cli(
        "probe",
        "--set",
        "name=shards",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--executor",
        "slurm",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--steps",
        "6",
        "--step-s",
        "0.5",
        "--retry-failed",
    )
    assert rc == 0, out
    retry, merge = records(run)[2:]
    assert retry.kind == "probe" and retry.shards == [1] and len(retry.tasks) == 1
    assert merge.kind == "merge" and merge.after == [retry.job_id]
    assert "cancelled merge jobs left waiting" in out  # the first merge could never run
    rows = wait_all_done(run, 120)
    assert [r.state for r in rows] == [
        "COMPLETED",
        "CANCELLED",
        "COMPLETED",
        "CANCELLED",
        "COMPLETED",
        "COMPLETED",
    ]
    assert read_json(run / "probe" / "merged.json")["values"] == [expected_value(6)] * 3


def test_cancel_leaves_no_job_in_the_queue(tmp_path: Path) -> None:
    run = _probe(tmp_path, "cancel", "--partition", "cpu", "--gpus", "0", "--steps", "200", "--step-s", "1")
    rc, _ = cli(
        "probe",
        "--set",
        "name=cancel",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--executor",
        "slurm",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--shards",
        "2",
        "--steps",
        "200",
    )
    assert rc == 0
    ids = {t for r in records(run) for t in r.tasks}
    assert len(ids) == 4  # probe, 2 shards, merge
    wait_until(lambda: statuses(run)[0].state == "RUNNING", 60, "probe running")
    rc, out = cli("cancel", "--run", str(run))
    assert rc == 0 and "cancelled:" in out
    wait_until(
        lambda: not {i.split("_")[0] for i in ids} & {q.split("_")[0] for q in squeue_ids()},
        60,
        "cancelled jobs to leave the queue",
    )
    rows = wait_all_done(run, 60)
    assert {r.state for r in rows} == {"CANCELLED"}
    rc, out = cli("cancel", "--run", str(run))
    assert rc == 0 and "nothing to cancel" in out


def test_failed_job_is_reported_failed(tmp_path: Path) -> None:
    run = _probe(tmp_path, "fail", "--partition", "cpu", "--gpus", "0", "--steps", "1", "--fail")
    assert wait_all_done(run, 60)[0].state == "FAILED"
    rc, out = cli("logs", "--run", str(run))
    assert rc == 0 and "probe asked to fail" in out


def test_logs_follow_ends_with_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _probe(tmp_path, "follow", "--partition", "cpu", "--gpus", "0", "--steps", "4", "--step-s", "0.5")
    rc, out = cli("logs", "--run", str(run), "--job", "probe", "--follow")
    assert rc == 0
    assert "probe start: rank 0/1" in out and "probe done: step 4" in out
    assert statuses(run)[0].done


def test_dry_run_prints_exactly_the_submitted_script(tmp_path: Path) -> None:
    args = (
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--steps",
        "1",
        "--job-name",
        "dry",
        "--time",
        "0:10:00",
        "--signal-delay",
        "45",
        "--setup",
        "export CNNCAM_PROBE=1",
        "--sbatch-extra=--comment=a b",
    )
    base = ("probe", "--set", "name=dry", "--set", f"runs_dir={tmp_path / 'runs'}", "--executor", "slurm")
    rc, dry = cli(*base, *args, "--dry-run")
    assert rc == 0 and "nothing submitted" in dry
    assert not (tmp_path / "runs" / "dry" / "jobs.json").exists()
    script = dry.split("---\n", 1)[1].rsplit("\ndry run:", 1)[0].rstrip("\n") + "\n"
    run = _probe(tmp_path, "dry", *args)
    jid = job_id(run, "probe")
    submitted = (run / "slurm" / jid / f"{jid}_submission.sh").read_text()
    assert script.strip() == submitted.strip()
    assert "#SBATCH --signal=USR2@45" in script and "#SBATCH --time=10" in script
    wait_all_done(run, 60)


def test_names_with_quotes_and_substitutions_cannot_inject(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    name = f'it\'s "x" $(touch {marker}) `touch {marker}`;'
    run = _probe(
        tmp_path,
        "inject",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--steps",
        "1",
        "--job-name",
        name,
        "--sbatch-extra=--comment=$(touch " + str(marker) + ")",
    )
    assert wait_all_done(run, 60)[0].state == "COMPLETED"
    assert read_json(run / "probe" / "rank0.json")["SLURM_JOB_NAME"] == name + "-probe"
    assert not marker.exists()


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues(tmp_path: Path) -> None:
    # 40 s of work under a 1-minute limit, USR2 at least 30 s before it (Slurm may send it
    # up to 60 s early): the job must checkpoint, requeue itself and finish on a later start.
    steps = 80
    run = _probe(
        tmp_path,
        "timeout",
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--time",
        "1",
        "--signal-delay",
        "30",
        "--steps",
        str(steps),
        "--step-s",
        "0.5",
    )
    rows = wait_all_done(run, 300)
    assert rows[0].state == "COMPLETED" and rows[0].restarts is not None and rows[0].restarts >= 1
    state = read_json(run / "probe" / "state.json")
    assert state["value"] == expected_value(steps) and len(state["starts"]) == rows[0].restarts + 1
    jid = job_id(run, "probe")
    log = (run / "slurm" / jid / f"{jid}_0_log.out").read_text()
    assert "received SIGUSR2" in log and "this job is timed-out" in log


def test_gpus_give_one_task_per_gpu(tmp_path: Path) -> None:
    run = _probe(tmp_path, "gpu2", "--partition", "gpu", "--gpus", "2", "--steps", "1", "--step-s", "0")
    assert wait_all_done(run, 60)[0].state == "COMPLETED"
    infos = [read_json(run / "probe" / f"rank{r}.json") for r in (0, 1)]
    assert [(i["SLURM_PROCID"], i["SLURM_LOCALID"], i["SLURM_NTASKS"]) for i in infos] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    # Both GPUs visible to each task: training binds cuda:<local rank> (local_rank % device_count).
    assert all(sorted(i["CUDA_VISIBLE_DEVICES"].split(",")) == ["0", "1"] for i in infos)


def test_submitting_from_inside_a_job_does_not_leak_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a job that submits jobs would have: its own ids, and sbatch input variables, which
    # override #SBATCH lines (submitit#1782).  SLURM_CONF must survive (submitit#1814).
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "7")
    monkeypatch.setenv("SBATCH_PARTITION", "cpu")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    run = _probe(tmp_path, "nested", "--partition", "gpu", "--gpus", "0", "--steps", "1", "--step-s", "0")
    assert wait_all_done(run, 60)[0].state == "COMPLETED"
    info = read_json(run / "probe" / "rank0.json")
    assert info["SLURM_JOB_PARTITION"] == "gpu" and info["SLURM_CPUS_PER_TASK"] == "4"
    assert info["SLURM_JOB_ID"] != "999999" and "RANK" not in info
