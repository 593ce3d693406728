"""Training through the launcher on a real local Slurm: run dir + status, exact resume after
two forced requeues, and 2-task DDP on CPU (gloo) under srun against a single task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from slurm_fixtures import (
    cli,
    job_id,
    scancel,
    scontrol,
    slurm_cluster,  # noqa: F401  (the fixture, used by name)
    statuses,
    wait_all_done,
    wait_until,
)
from train_helpers import BEST_IS_FIRST, assert_same_run_state, checkpoint, epoch_rows

from cnncam.runs import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    rc, _ = cli("synth", "--out", str(root), "--classes", "3", "--per-class", "12", "--size", "32")
    assert rc == 0
    return root


def _train(tmp_path: Path, data: Path, name: str, *args: str) -> Path:
    rc, out = cli(
        "train",
        "--executor",
        "slurm",
        "--set",
        f"name={name}",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--set",
        f"data.root={data}",
        "--set",
        "data.image_size=32",
        "--set",
        "data.resize=32",
        "--set",
        "data.num_workers=0",
        "--set",
        "model.channels=[8,16]",
        "--set",
        "train.log_every=1",
        *args,
    )
    assert rc == 0, out
    assert "submitted train: job" in out
    return tmp_path / "runs" / name


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]  # type: ignore[no-any-return]


def _assert_same_run(straight: Path, broken: Path, epochs: int) -> None:
    """Whole last.pt, best.pt and every epoch line equal; best.pt is not last.pt (BEST_IS_FIRST)."""
    assert checkpoint(straight)["epoch"] == epochs and checkpoint(straight, "best.pt")["epoch"] == 1
    assert_same_run_state(straight, broken, "last.pt")
    assert_same_run_state(straight, broken, "best.pt")
    assert epoch_rows(straight) == epoch_rows(broken)


def test_train_on_gpu_partition_writes_the_run_dir(tmp_path: Path, shapes: Path) -> None:
    run = _train(tmp_path, shapes, "gpu", "--partition", "gpu", "--set", "train.epochs=1")
    rows = wait_all_done(run, 180)
    assert [(r.kind, r.state) for r in rows] == [("train", "COMPLETED")]
    for name in ("config.yaml", "metrics.jsonl", "provenance.json", "checkpoints/last.pt", "jobs.json"):
        assert (run / name).is_file(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["slurm"]["slurm_job_id"] == job_id(run, "train")
    rc, out = cli("status", "--run", str(run))
    assert rc == 0 and "COMPLETED" in out and "train" in out


def _log(run: Path) -> str:
    jid = job_id(run, "train")
    path = run / "slurm" / jid / f"{jid}_0_log.out"
    return path.read_text() if path.exists() else ""


def _wait_progress(run: Path, resumes: int, steps: int) -> None:
    """Wait until the run has resumed `resumes` times and logged `steps` more steps since."""
    wait_until(lambda: _log(run).count("resumed from") >= resumes, 120, f"resume #{resumes}")
    start = (
        max((r["step"] for r in read_metrics(run / "metrics.jsonl")), default=0)
        if (run / "metrics.jsonl").exists()
        else 0
    )

    def moved() -> bool:
        recs = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        return max((r["step"] for r in recs), default=0) >= start + steps

    wait_until(moved, 120, f"{steps} training steps after resume #{resumes}")


def test_requeued_twice_is_bit_identical_to_uninterrupted(tmp_path: Path, shapes: Path) -> None:
    # ~240 short steps: slow enough to be signalled twice mid-run, even on a fast machine.
    args = ("--partition", "cpu", "--gpus", "0", "--set", "train.epochs=30", "--set", "data.batch_size=4")
    args += ("--set", BEST_IS_FIRST[0])
    straight = _train(tmp_path, shapes, "straight", *args)
    broken = _train(tmp_path, shapes, "broken", *args)
    jid = job_id(broken, "train")
    _wait_progress(broken, 0, 3)
    scancel("--signal=USR2", jid)  # preemption notice: checkpoint + submitit requeue
    _wait_progress(broken, 1, 3)
    scontrol("requeue", jid)  # SIGTERM: checkpoint, Slurm requeues the job
    rows = wait_all_done(broken, 300) + wait_all_done(straight, 300)
    assert [r.state for r in rows] == ["COMPLETED", "COMPLETED"]
    assert statuses(broken)[0].restarts == 2
    log = _log(broken)
    assert "received SIGUSR2" in log and "received SIGTERM" in log and log.count("resumed from") == 2
    _assert_same_run(straight, broken, 30)


def test_ddp_two_cpu_tasks_match_one_task(tmp_path: Path, shapes: Path) -> None:
    args = ("--partition", "cpu", "--gpus", "0", "--set", "train.epochs=2", "--set", "data.batch_size=8")
    single = _train(tmp_path, shapes, "single", *args)
    ddp = _train(tmp_path, shapes, "ddp", *args, "--tasks-per-node", "2")
    rows = wait_all_done(single, 300) + wait_all_done(ddp, 300)
    assert [r.state for r in rows] == ["COMPLETED", "COMPLETED"]
    assert "world 2" in _log(ddp) and "world 1" in _log(single)
    a, b = _model(single), _model(ddp)
    for k in a:
        if "running_" in k:
            # BatchNorm statistics: on CPU (gloo, no SyncBatchNorm) each rank sees half the batch.
            continue
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-2), f"{k} differs beyond tolerance"
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
        for run in (single, ddp)
    ]
    assert len(losses[0]) == len(losses[1]) == 4  # train + val per epoch
    assert all(abs(x - y) < 2e-2 for x, y in zip(*losses))


@pytest.mark.slow
def test_ddp_requeue_resumes_bit_identically(tmp_path: Path, shapes: Path) -> None:
    # Every rank gets USR2 and stops at the same step; rank 0 requeues, rank 1 just leaves.
    args = (
        "--partition",
        "cpu",
        "--gpus",
        "0",
        "--tasks-per-node",
        "2",
        "--set",
        "train.epochs=6",
        "--set",
        "data.batch_size=4",
        "--set",
        BEST_IS_FIRST[0],
    )
    straight = _train(tmp_path, shapes, "ddp-straight", *args)
    broken = _train(tmp_path, shapes, "ddp-broken", *args)
    _wait_progress(broken, 0, 3)
    scancel("--signal=USR2", job_id(broken, "train"))
    rows = wait_all_done(broken, 300) + wait_all_done(straight, 300)
    assert [(r.state, r.restarts) for r in rows] == [("COMPLETED", 1), ("COMPLETED", 0)]
    assert _log(broken).count("resumed from") == 1 and "world 2" in _log(broken)
    _assert_same_run(straight, broken, 6)
