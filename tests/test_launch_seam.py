"""The executor seam (issue 12, item 7) and the code snapshot wired into submission (item 3).

One backend type per executor behind one interface; submitit's private API used in one module
only; jobs import cnncam from the snapshot taken at submission; provenance says which code ran.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from git_helpers import committed_checkout, git
from test_launch_local import cli, wait_done

from cnncam.config import load_config
from cnncam.errors import CnncamError, ConfigError, LaunchError
from cnncam.launch import backends as B
from cnncam.launch import snapshot as snap_mod
from cnncam.launch import submitit_api as S
from cnncam.launch import tasks as T
from cnncam.launch.executors import Launcher, clean_slurm_env
from cnncam.launch.jobs import JobRecord, load_records
from cnncam.launch.probe import ProbeTask
from cnncam.runs import RunPaths
from cnncam.stop import StopFlag

PACKAGE = Path(snap_mod.__file__).resolve().parents[1]


def test_one_backend_per_executor_and_no_other() -> None:
    assert {name: type(B.backend(name)).__name__ for name in ("slurm", "local", "inline")} == {
        "slurm": "SlurmBackend",
        "local": "LocalBackend",
        "inline": "InlineBackend",
    }
    assert [B.backend(n).in_process for n in ("slurm", "local", "inline")] == [False, False, True]
    with pytest.raises(ConfigError, match="executor 'pbs'.*slurm, local, inline"):
        B.backend("pbs")


def test_a_jobs_file_naming_another_executor_is_refused(tmp_path: Path) -> None:
    record = {"kind": "train", "executor": "pbs", "job_id": "1", "tasks": ["1"], "folder": "", "name": "x"}
    (tmp_path / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [record]}))
    with pytest.raises(CnncamError, match="executor 'pbs' is not one of slurm, local, inline"):
        load_records(RunPaths(tmp_path))


def test_submitits_private_api_is_used_in_one_module_only() -> None:
    private = re.compile(r"_make_sbatch_string|_usr_sig|JobPaths|submitit\.core|JobEnvironment\b")
    users = sorted(
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if private.search(p.read_text())
    )
    assert users == ["launch/submitit_api.py"]


def test_the_installed_submitit_is_in_the_tested_range_and_its_private_api_is_where_we_expect() -> None:
    major, minor = (int(x) for x in metadata.version("submitit").split(".")[:2])
    assert (1, 5) <= (major, minor) < (1, 6) and S.TESTED == ">=1.5,<1.6"
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"submitit>=1.5,<1.6"' in pyproject
    folder = Path("/runs/x/slurm/%j")
    script = S.sbatch_text({"job_name": "j", "time": 5}, folder, "py")
    assert script.startswith("#!/bin/bash") and S.submit_command(folder, "py") in script
    assert "#SBATCH --output=/runs/x/slurm/%j/%j_0_log.out" in script
    assert S.requeue_signal() == signal.SIGUSR2
    assert S.log_files(Path("/r/12"), "12", rank=1) == (
        Path("/r/12/12_1_log.out"),
        Path("/r/12/12_1_log.err"),
    )
    assert S.job_folder(folder, "13_2") == Path("/runs/x/slurm/13_2")


def test_requeue_failure_is_recorded_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint written, `scontrol requeue` missing: RequeueFailed in the state file, which
    status turns into "resume by hand" (tests/test_slurm_states.py)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "%j"))
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")

    def submitit_handler(signum: int, frame: object) -> None:  # what submitit does without scontrol
        subprocess.check_call(["scontrol-that-is-not-installed", "requeue", "77"])

    old = signal.signal(signal.SIGUSR2, submitit_handler)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        handlers = T.StopHandlers(StopFlag())
        os.kill(os.getpid(), signal.SIGUSR2)
        with (
            pytest.raises(T.RequeueFailed, match="could not requeue itself: .*No such file"),
            T.recorded_state(),
        ):
            handlers.finish_interrupted()
    finally:
        signal.signal(signal.SIGUSR2, old)
        signal.signal(signal.SIGTERM, old_term)
    state = T.read_task_state(T.state_file(tmp_path / "77", "77"))
    assert state is not None and state.state == "FAILED"
    assert state.error.startswith("RequeueFailed: checkpoint saved, but the job could not requeue itself")


def test_a_job_refuses_code_other_than_its_snapshot(tmp_path: Path) -> None:
    T.check_code_snapshot({})  # no snapshot (inline, snapshot_code=false): nothing to check
    T.check_code_snapshot({T.CODE_ENV: str(snap_mod.source_root())})
    with pytest.raises(LaunchError, match="not from the code snapshot it was submitted with"):
        T.check_code_snapshot({T.CODE_ENV: str(tmp_path)})


def test_submission_environment_puts_the_snapshot_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/mine")
    monkeypatch.delenv(T.CODE_ENV, raising=False)
    with clean_slurm_env(tmp_path / "code" / "abc"):
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "code" / "abc"), "/mine"]
        assert os.environ[T.CODE_ENV] == str(tmp_path / "code" / "abc")
    assert os.environ["PYTHONPATH"] == "/mine" and T.CODE_ENV not in os.environ


def _probe_local(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    out = cli(
        "probe",
        "--executor",
        "local",
        f"--set=runs_dir={tmp_path}",
        f"--set=name={name}",
        "--steps",
        "1",
        "--step-s",
        "0",
        *extra,
    )
    run = tmp_path / name
    assert [r.state for r in wait_done(run)] == ["COMPLETED"]
    return run, out


def test_local_jobs_import_cnncam_from_the_snapshot_taken_at_submission(tmp_path: Path) -> None:
    run, out = _probe_local(tmp_path, "snap")
    [rec] = load_records(RunPaths(run))
    assert rec.code is not None and re.fullmatch(r"code/[0-9a-f]{16}", rec.code)
    info = json.loads((run / "probe" / "rank0.json").read_text())
    assert Path(info["cnncam"]) == (run / rec.code).resolve()
    assert f"code: jobs import cnncam from {run / rec.code}" in out
    manifest = json.loads((run / rec.code / "manifest.json").read_text())
    assert manifest["source"] == str(snap_mod.source_root())
    assert (run / rec.code / "cnncam" / "launch" / "probe.py").read_bytes() == (
        PACKAGE / "launch" / "probe.py"
    ).read_bytes()


def test_snapshot_code_false_runs_the_checkout(tmp_path: Path) -> None:
    run, out = _probe_local(tmp_path, "nosnap", "--set", "slurm.snapshot_code=false")
    [rec] = load_records(RunPaths(run))
    info = json.loads((run / "probe" / "rank0.json").read_text())
    assert rec.code is None and not (run / "code").exists() and "code:" not in out
    assert Path(info["cnncam"]) == snap_mod.source_root()


def test_one_snapshot_per_launcher_call_and_none_inline(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=two"])
    launcher = Launcher("local", cfg.run_dir, cfg.name, cfg.slurm)
    root = str(cfg.run_dir / "probe")
    first = launcher.submit("probe", [ProbeTask(root, steps=1, step_s=0.0)])
    second = launcher.submit("merge", [ProbeTask(root, steps=1, step_s=0.0)], [first])
    wait_done(cfg.run_dir)
    assert first.code == second.code and len(list((cfg.run_dir / "code").iterdir())) == 1
    inline = Launcher("inline", tmp_path / "in", "in", cfg.slurm)
    rec = inline.submit("probe", [ProbeTask(str(tmp_path / "in" / "probe"), steps=1, step_s=0.0)])
    assert rec.state == "COMPLETED" and rec.code is None and inline.snapshot is None


class _Queued(B.LocalBackend):
    """Records what would be submitted, starts nothing (the jobs would import a fake package)."""

    def submit(self, sub: B.Submission) -> JobRecord:
        return JobRecord(sub.kind, self.name, "1", ["1"], str(sub.folder), sub.name)


def test_code_edited_between_two_jobs_of_one_call_is_not_picked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline's CAM job runs the code its training job was submitted with."""
    repo = committed_checkout(tmp_path / "src", {"cnncam/__init__.py": "A = 1\n"})
    monkeypatch.setattr(snap_mod, "source_root", lambda: repo)
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=p"])
    launcher = Launcher("local", cfg.run_dir, cfg.name, cfg.slurm)
    launcher.backend = _Queued()
    task = ProbeTask(str(tmp_path / "probe"))
    first = launcher.submit("train", [task])
    (repo / "cnncam" / "__init__.py").write_text("A = 2\n")
    second = launcher.submit("cam", [task], [first])
    assert first.code == second.code and [p.name for p in (cfg.run_dir / "code").iterdir()] == [
        Path(first.code or "").name
    ]
    assert (cfg.run_dir / (first.code or "") / "cnncam" / "__init__.py").read_text() == "A = 1\n"


def test_provenance_of_a_checkout_keeps_its_uncommitted_diff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = committed_checkout(tmp_path / "src", {"cnncam/__init__.py": "A = 1\n"})
    monkeypatch.setattr(snap_mod, "source_root", lambda: repo)
    run = tmp_path / "run"
    clean = snap_mod.code_provenance(run)
    assert clean == {
        "commit": git(repo, "rev-parse", "HEAD"),
        "dirty": False,
        "snapshot": None,
        "digest": None,
        "diff": None,
    }
    (repo / "cnncam" / "__init__.py").write_text("A = 2\n")  # an inline run of edited code
    dirty = snap_mod.code_provenance(run)
    assert dirty["dirty"] is True and re.fullmatch(r"code/dirty-[0-9a-f]{16}\.diff", dirty["diff"])
    assert "+A = 2" in (run / dirty["diff"]).read_text()


def test_provenance_of_a_snapshot_points_into_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = committed_checkout(tmp_path / "src", {"cnncam/__init__.py": "A = 1\n"})
    (repo / "cnncam" / "__init__.py").write_text("A = 3\n")
    run = tmp_path / "run"
    taken = snap_mod.take_snapshot(run, repo)
    monkeypatch.setattr(snap_mod, "source_root", lambda: taken.root)  # as inside a job
    info = snap_mod.code_provenance(run)
    rel = taken.root.relative_to(run).as_posix()
    assert info == {
        "commit": git(repo, "rev-parse", "HEAD"),
        "dirty": True,
        "snapshot": rel,
        "digest": taken.digest,
        "diff": f"{rel}/dirty.diff",
    }
    from cnncam import runs

    assert runs.git_info() == {"commit": info["commit"], "dirty": True}  # what HDF5 attrs record
