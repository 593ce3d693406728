"""The CLI: flags as config overrides, profiles, errors before any work, dry-run golden, inline runs."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

from cnncam import cli
from cnncam.config import load_config
from cnncam.launch.jobs import load_records
from cnncam.launch.probe import expected_value
from cnncam.runs import RunPaths

GOLDEN = Path(__file__).parent / "golden"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _args(*argv: str) -> list[str]:
    return cli.overrides_from(cli.build_parser().parse_args(list(argv)))


def test_flags_are_sugar_for_overrides() -> None:
    overrides = _args(
        "cam",
        "--run",
        "r",
        "--partition",
        "gpu",
        "--gpus",
        "2",
        "--tasks-per-node",
        "2",
        "--time",
        "1:30:00",
        "--mem-gb",
        "16",
        "--job-name",
        "a b",
        "--setup",
        "module load x",
        "--setup",
        "source 'v e'/bin/activate",
        "--sbatch-extra=--exclusive",
        "--signal-delay",
        "300",
        "--method",
        "gradcam",
        "--method",
        "gradcam_pp",
        "--metrics",
        "--activations",
        "l1",
        "l2",
        "--executor",
        "local",
        "--set",
        "slurm.gpus_per_node=3",
    )
    assert overrides == [
        "slurm.partition=gpu",
        "slurm.gpus_per_node=2",
        "slurm.tasks_per_node=2",
        "slurm.mem_gb=16.0",
        "slurm.time_min=90",
        "slurm.job_name=a b",
        'slurm.extra_sbatch=["--exclusive"]',
        'slurm.setup=["module load x", "source \'v e\'/bin/activate"]',
        "slurm.signal_delay_s=300",
        "slurm.executor=local",
        'cam.methods=["gradcam", "gradcam_pp"]',
        "cam.metrics=true",
        'cam.activations=["l1", "l2"]',
        "slurm.gpus_per_node=3",
    ]
    cfg = load_config(None, overrides)
    assert cfg.slurm.gpus_per_node == 3  # --set comes last and wins
    assert cfg.slurm.setup == ("module load x", "source 'v e'/bin/activate")
    assert cfg.cam.methods == ("gradcam", "gradcam_pp") and cfg.cam.activations == ("l1", "l2")


def test_profile_then_flags_then_set(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(
        "slurm:\n  partition: big\n  time_min: 600\n  setup: [module load cuda]\n  mem_gb: null\n"
    )
    cfg = load_config(None, _args("train", "--profile", str(prof), "--time", "30"))
    assert (cfg.slurm.partition, cfg.slurm.time_min, cfg.slurm.setup) == ("big", 30, ("module load cuda",))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n")
    with pytest.raises(cli.ConfigError, match="only a 'slurm:' mapping"):
        _args("train", "--profile", str(bad))
    with pytest.raises(cli.ConfigError, match="does not exist"):
        _args("train", "--profile", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("profile", sorted((Path(__file__).parents[1] / "configs" / "slurm").glob("*.yaml")))
def test_shipped_profiles_load(profile: Path) -> None:
    cfg = load_config(None, _args("train", "--profile", str(profile)))
    assert cfg.slurm.time_min > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "slurm.partition=gpu\nrm -rf ~"], "slurm.partition"),
        (["--set", "train.epohcs=3"], "did you mean 'train.epochs'"),
        (["--time", "soon"], "time limit 'soon' is not understood"),
        (["--sbatch-extra=--output=x"], "may not set --output"),
        (["--executor", "inline", "--tasks-per-node", "2", "--gpus", "0"], "inline runs one process"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path: Path, argv: list[str], message: str) -> None:
    rc, out, err = run("probe", "--set", f"runs_dir={tmp_path}", "--executor", "inline", *argv)
    assert rc == 2 and message in err and err.startswith("error: ")
    assert not (tmp_path / "run" / "jobs.json").exists()


def test_argparse_rejects_unknown_executor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--executor", "pbs"])
    assert exc.value.code == 2 and "invalid choice: 'pbs'" in capsys.readouterr().err


def test_parse_shard() -> None:
    assert cli.parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "x", "1/2/3", "-1/3"):
        with pytest.raises(cli.argparse.ArgumentTypeError):
            cli.parse_shard(bad)


def test_inline_probe_runs_in_process_and_is_recorded(tmp_path: Path) -> None:
    rc, out, _ = run(
        "probe",
        "--executor",
        "inline",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=p",
        "--steps",
        "3",
        "--step-s",
        "0",
    )
    assert rc == 0 and "executor: inline (requested)" in out and "probe: ran inline, COMPLETED" in out
    root = tmp_path / "p" / "probe"
    assert f'"value": {expected_value(3)}' in (root / "state.json").read_text()
    [rec] = load_records(RunPaths(tmp_path / "p"))
    assert (rec.kind, rec.executor, rec.state) == ("probe", "inline", "COMPLETED")
    rc, out, _ = run("status", "--run", str(tmp_path / "p"))
    assert rc == 0 and out.splitlines()[1].split()[:5] == ["inline", "probe", "-", "-", "COMPLETED"]


def test_inline_sharded_probe_merges(tmp_path: Path) -> None:
    rc, out, _ = run(
        "probe",
        "--executor",
        "inline",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=s",
        "--shards",
        "3",
        "--steps",
        "2",
        "--step-s",
        "0",
    )
    assert rc == 0, out
    merged = (tmp_path / "s" / "probe" / "merged.json").read_text()
    assert f"{expected_value(2)}" in merged
    rc, out, _ = run(
        "probe", "--executor", "inline", "--set", f"runs_dir={tmp_path}", "--set", "name=s", "--retry-failed"
    )
    assert rc == 0 and "all 3 shards complete and merged; nothing to retry" in out


def test_inline_failure_is_recorded_and_reported(tmp_path: Path) -> None:
    rc, _, err = run(
        "probe",
        "--executor",
        "inline",
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "name=f",
        "--steps",
        "1",
        "--step-s",
        "0",
        "--fail",
    )
    assert rc == 2 and "probe asked to fail" in err
    assert load_records(RunPaths(tmp_path / "f"))[0].state == "FAILED"


def test_run_commands_need_a_run_dir(tmp_path: Path) -> None:
    rc, _, err = run("cam", "--run", str(tmp_path / "nope"), "--dry-run")
    assert rc == 2 and f"run folder {tmp_path / 'nope'} does not exist" in err
    rc, _, err = run("cam", "--run", str(tmp_path), "--dry-run")
    assert rc == 2 and "not a cnncam run directory" in err
    rc, _, err = run("status", "--run", str(tmp_path))
    assert rc == 2 and "no jobs recorded" in err


def _fake_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: demo\nruns_dir: elsewhere\nslurm:\n  partition: gpu\n")
    return run_dir


def _normalise(text: str, tmp_path: Path) -> str:
    return text.replace(str(tmp_path), "<tmp>").replace(cli.shlex.quote(sys.executable), "<python>")


def test_pipeline_dry_run_matches_golden(tmp_path: Path) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(
        f"name: demo\nruns_dir: {tmp_path / 'runs'}\nslurm:\n  partition: gpu\n  gpus_per_node: 2\n"
    )
    rc, out, _ = run(
        "pipeline",
        "--config",
        str(cfg),
        "--executor",
        "slurm",
        "--dry-run",
        "--shards",
        "3",
        "--cpu-partition",
        "cpu",
        "--time",
        "2:00:00",
        "--job-name",
        "demo",
        "--method",
        "gradcam_pp",
    )
    assert rc == 0
    text = _normalise(out, tmp_path)
    path = GOLDEN / "pipeline_dry_run.txt"
    if os.environ.get("CNNCAM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    assert not (tmp_path / "runs" / "demo" / "jobs.json").exists()
    assert text.count("#!/bin/bash") == 4  # train, cam array, merge, report


def test_cam_dry_run_uses_the_run_folder(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path)
    rc, out, _ = run("cam", "--run", str(run_dir), "--executor", "slurm", "--dry-run", "--shards", "2")
    assert rc == 0
    # The folder given wins over the runs_dir saved in config.yaml (the run may have moved).
    assert f"{run_dir.absolute()}/slurm/%A_%a/%A_%a_0_log.out" in out
    assert "#SBATCH --array=0-1%2" in out and "#SBATCH --dependency='afterok:<cam-job-id>'" in out


def test_shim_runs_from_any_directory_without_install(tmp_path: Path) -> None:
    import subprocess

    shim = Path(__file__).parents[1] / "jobs" / "launch.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [
            sys.executable,
            str(shim),
            "probe",
            "--executor",
            "inline",
            "--set",
            "name=shim",
            "--steps",
            "1",
            "--step-s",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "probe: ran inline, COMPLETED" in res.stdout
    assert (tmp_path / "runs" / "shim" / "probe" / "state.json").exists()  # relative to the caller's cwd
