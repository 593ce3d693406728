"""``launch.py sanity`` and ``pipeline --sanity / --sanity-data``: which jobs, in which run, after what."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cnncam import cli
from cnncam.config import RunConfig, load_config
from cnncam.errors import ConfigError
from cnncam.launch import workflows as W
from cnncam.launch.executors import Launcher
from cnncam.launch.tasks import SanityTask, TrainTask


def _launcher(tmp_path: Path) -> tuple[Launcher, RunConfig]:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=w", "slurm.partition=gpu"])
    return Launcher("slurm", cfg.run_dir, cfg.name, cfg.slurm, dry_run=True, out=io.StringIO()), cfg


def test_pipeline_sanity_data_trains_a_permuted_twin_in_its_own_run(tmp_path: Path) -> None:
    launcher, cfg = _launcher(tmp_path)
    train, cams, merge, sanity, report = W.launch_pipeline(launcher, cfg, 2, sanity_data=True)
    assert (sanity.kind, report.kind) == ("sanity", "report")
    assert sanity.after[0] == train.job_id and len(sanity.after) == 2  # and the permuted training
    assert report.after == [merge.job_id, sanity.job_id]
    out = launcher.out
    assert isinstance(out, io.StringIO)
    assert "permuted-label training: " + str(tmp_path / "w-permuted") in out.getvalue()
    twin = W.permuted_config(cfg)
    assert twin.name == "w-permuted" and twin.data.permute_labels and twin.seed == cfg.seed
    assert twin.model == cfg.model and twin.train == cfg.train


def test_pipeline_sanity_without_the_data_test(tmp_path: Path) -> None:
    launcher, cfg = _launcher(tmp_path)
    jobs = W.launch_pipeline(launcher, cfg, 1, sanity=True)
    assert [j.kind for j in jobs] == ["train", "cam", "merge", "sanity", "report"]
    assert jobs[3].after == [jobs[0].job_id]
    plain = W.launch_pipeline(_launcher(tmp_path)[0], cfg, 1)
    assert [j.kind for j in plain] == ["train", "cam", "merge", "report"]


def test_tasks_carry_config_and_permuted_run(tmp_path: Path) -> None:
    launcher, cfg = _launcher(tmp_path)
    (rec,) = W.launch_sanity(launcher, cfg, str(tmp_path / "other"))
    assert rec.kind == "sanity"
    task = SanityTask(cfg, str(tmp_path / "other"))
    assert task.permuted == str(tmp_path / "other") and isinstance(TrainTask(cfg), TrainTask)


def test_cli_sanity_flags_are_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: demo\nslurm:\n  partition: gpu\n")
    args = cli.build_parser().parse_args(
        ["sanity", "--run", str(run), "--images", "16", "--mode", "cascading"]
    )
    assert cli.overrides_from(args) == ["sanity.images=16", 'sanity.modes=["cascading"]']
    rc = cli.main(["sanity", "--run", str(run), "--executor", "slurm", "--dry-run"])
    assert rc == 0 and "cnncam-demo-sanity" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="sanity.targets"):
        load_config(None, ["sanity.targets=topk:2"])
    with pytest.raises(ConfigError, match="cam.road_percentiles"):
        load_config(None, ["cam.road_percentiles=[0, 50]"])
