"""Which jobs each command submits: shards + merge, --retry-failed decisions, pipeline chaining."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cnncam.config import load_config
from cnncam.errors import CnncamError, LaunchError
from cnncam.launch import workflows as W
from cnncam.launch.executors import Launcher
from cnncam.launch.jobs import load_records
from cnncam.launch.tasks import CamShardTask, LaunchTask, MergeTask, ReportTask, TrainTask
from cnncam.stop import StopFlag


@dataclass(frozen=True)
class Note(LaunchTask):
    """Records that it ran (inline executor: same process)."""

    name: str
    log: list[str] = field(default_factory=list, compare=False)

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        self.log.append(self.name)
        return "completed", self.name


def _launcher(tmp_path: Path, executor: str = "inline", dry_run: bool = False) -> Launcher:
    cfg = load_config(
        None, [f"runs_dir={tmp_path}", "name=w", "slurm.partition=gpu", "slurm.cpu_partition=cpu"]
    )
    return Launcher(executor, cfg.run_dir, cfg.name, cfg.slurm, dry_run=dry_run, out=io.StringIO())


def _step(states: list[str], log: list[str], merged: Path) -> W.ShardedStep:
    return W.ShardedStep(
        "probe",
        len(states),
        lambda k: Note(f"shard{k}", log),
        lambda: Note("merge", log),
        lambda: list(states),
        merged,
    )


def test_retry_failed_resubmits_only_incomplete_shards(tmp_path: Path) -> None:
    log: list[str] = []
    launcher = _launcher(tmp_path)
    recs = W.retry_failed(
        launcher, _step(["complete", "partial", "complete", "missing"], log, tmp_path / "m")
    )
    assert log == ["shard1", "shard3", "merge"]
    assert [(r.kind, r.shards, r.num_shards) for r in recs] == [("probe", [1, 3], 4), ("merge", None, 4)]
    assert load_records(launcher.paths) == recs
    assert "retrying shards [1, 3] of 4" in launcher.out.getvalue()  # type: ignore[attr-defined]


def test_retry_failed_when_all_complete(tmp_path: Path) -> None:
    log: list[str] = []
    launcher = _launcher(tmp_path)
    merged = tmp_path / "merged"
    assert [r.kind for r in W.retry_failed(launcher, _step(["complete"] * 2, log, merged))] == ["merge"]
    merged.write_text("x")
    assert W.retry_failed(launcher, _step(["complete"] * 2, log, merged)) == []
    assert log == ["merge"] and "nothing to retry" in launcher.out.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["foreign", "corrupt"])
def test_retry_failed_refuses_parts_it_cannot_vouch_for(tmp_path: Path, bad: str) -> None:
    log: list[str] = []
    with pytest.raises(LaunchError, match=f"shards {{1: '{bad}'}}.*remove them"):
        W.retry_failed(_launcher(tmp_path), _step(["complete", bad, "missing"], log, tmp_path / "m"))
    assert log == []


def test_recorded_num_shards(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path)
    with pytest.raises(CnncamError, match="no cam array recorded.*pass --shards N"):
        W.recorded_num_shards(launcher, "cam")
    W.submit_sharded(launcher, _step(["missing"] * 3, [], tmp_path / "m"))
    assert W.recorded_num_shards(launcher, "probe") == 3
    with pytest.raises(CnncamError, match="--shards must be >= 1"):
        W.submit_sharded(launcher, _step([], [], tmp_path / "m"))


def test_pipeline_chains_train_cam_merge_report(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path, "slurm", dry_run=True)
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=w"])
    train, cams, merge, report = W.launch_pipeline(launcher, cfg, 3)
    assert (train.kind, cams.kind, merge.kind, report.kind) == ("train", "cam", "merge", "report")
    assert cams.after == [train.job_id] and merge.after == [cams.job_id] and report.after == [merge.job_id]
    assert cams.shards == [0, 1, 2] and len(cams.tasks) == 3 and merge.num_shards == 3
    assert not launcher.paths.jobs.exists()  # dry run records nothing


def test_cam_tasks_carry_the_shard_and_config(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=w", "cam.methods=[gradcam, layercam]"])
    step = W.cam_step(cfg, 4)
    assert step.shard_task(2) == CamShardTask(cfg, 2, 4) and step.merge_task() == MergeTask(cfg, 4)
    assert step.merged == tmp_path / "w" / "cams" / "cams.h5"
    launcher = _launcher(tmp_path, "slurm", dry_run=True)
    [one] = W.launch_cam(launcher, cfg, None, (2, 4), retry=False)
    assert (one.kind, one.shards, one.num_shards) == ("cam", [2], 4)
    assert W.launch_train(launcher, cfg)[0].kind == "train"
    assert W.launch_report(launcher, cfg, "c.h5", None)[0].kind == "report"
    assert ReportTask(cfg, "c.h5").cams == "c.h5" and TrainTask(cfg).cfg is cfg
