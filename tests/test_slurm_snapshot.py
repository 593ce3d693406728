"""Jobs run the code they were submitted with (issue 12, item 3), on the local Slurm.

A held job is submitted from a clone of the checkout, the clone's code is changed, the job is
released, and it must run the *old* code: the probe's arithmetic (its ``MODULUS``) is what
changes, so the value it computes says which code ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from git_helpers import committed_checkout, git
from slurm_fixtures import (
    job_id,
    read_json,
    records,
    scontrol,
    slurm_cluster,  # noqa: F401  (the fixture, used by name)
    wait_all_done,
    wait_until,
)

from cnncam.launch.probe import MODULUS, expected_value
from cnncam.launch.snapshot import source_files, source_root

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def make_clone(dest: Path) -> Path:
    """A git checkout holding this cnncam package and the CLI shim, committed."""
    root = source_root()
    return committed_checkout(dest, {rel: root / rel for rel in [*source_files(root), "jobs/launch.py"]})


def _squeue_reason(jid: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", jid, "-o", "%T %r"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def test_a_held_job_runs_the_code_it_was_submitted_with(tmp_path: Path) -> None:
    clone = make_clone(tmp_path / "clone")
    commit = git(clone, "rev-parse", "HEAD")
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "jobs/launch.py",
        "probe",
        "--executor",
        "slurm",
        "--partition",
        "cpu",
        "--gpus",
        "0",
    ]
    cmd += [
        "--steps",
        "4",
        "--step-s",
        "0",
        "--sbatch-extra=--hold",
        f"--set=runs_dir={runs}",
        "--set=name=held",
    ]
    # Submitted from the clone, importing the clone (not this checkout), as a user would.
    env = {**os.environ, "PYTHONPATH": str(clone)}
    sub = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    run = runs / "held"
    jid = job_id(run, "probe")
    wait_until(lambda: "JobHeldUser" in _squeue_reason(jid), 30, "the job to be held")

    # A `git pull` while the job waits: the probe's arithmetic changes (and is committed).
    probe = clone / "cnncam" / "launch" / "probe.py"
    text = probe.read_text()
    assert f"MODULUS = {MODULUS:_}" in text
    probe.write_text(text.replace(f"MODULUS = {MODULUS:_}", "MODULUS = 7"))
    git(clone, "commit", "-q", "-am", "change the probe")
    scontrol("release", jid)

    rows = wait_all_done(run, 120)
    assert [r.state for r in rows] == ["COMPLETED"]
    state = read_json(run / "probe" / "state.json")
    assert state["value"] == expected_value(4)  # the old MODULUS: 1_000_003
    assert state["value"] >= 7  # the new code would have stayed below 7

    [rec] = records(run)
    assert rec.code is not None and rec.code.startswith("code/")
    snapshot = run / rec.code
    info = read_json(run / "probe" / "rank0.json")
    assert Path(info["cnncam"]).resolve() == snapshot.resolve()  # imported from the snapshot
    manifest = read_json(snapshot / "manifest.json")
    assert manifest["git"] == {"commit": commit, "dirty": False}
    assert manifest["source"] == str(clone.resolve())
    assert f"MODULUS = {MODULUS:_}" in (snapshot / "cnncam" / "launch" / "probe.py").read_text()
