"""Helpers for the integration tests that run against a real Slurm cluster (slurm/up.sh).

They skip when no cluster answers, except under ``CI=true``, where a missing cluster is a
failure (the CI script brings one up).  Every wait has a test-side timeout: submitit has none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cnncam.cli import main
from cnncam.launch.jobs import JobRecord, TaskStatus, job_status, load_records
from cnncam.runs import RunPaths

_available: bool | None = None


def cluster_available() -> bool:
    """sbatch on PATH, sinfo shows a usable node and sacct answers (accounting is on)."""
    global _available
    if _available is None:

        def ok(cmd: list[str]) -> bool:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            except (OSError, subprocess.SubprocessError):
                return False
            return res.returncode == 0 and (
                cmd[0] != "sinfo" or any(s in res.stdout for s in ("idle", "mix", "alloc"))
            )

        _available = (
            bool(shutil.which("sbatch"))
            and ok(["sinfo", "-h", "-o", "%t"])
            and ok(["sacct", "-n", "-X", "-S", "now"])
        )
    return _available


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if cluster_available():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but no Slurm cluster answers: run `slurm/up.sh` (as root) first")
    pytest.skip("no running Slurm cluster (start one with `sudo slurm/up.sh`)")


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def cli(*argv: str) -> tuple[int, str]:
    """Run the CLI in-process and return (exit code, stdout)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def records(run: Path) -> list[JobRecord]:
    return load_records(RunPaths(run))


def statuses(run: Path) -> list[TaskStatus]:
    return job_status(records(run), paths=RunPaths(run))


def wait_all_done(run: Path, timeout_s: float) -> list[TaskStatus]:
    def done() -> list[TaskStatus] | None:
        rows = statuses(run)
        return rows if rows and all(r.done for r in rows) else None

    try:
        return wait_until(done, timeout_s, f"every job of {run} to finish", poll_s=1.0)  # type: ignore[no-any-return]
    except AssertionError:
        print(_diagnostics(run))
        raise


def _diagnostics(run: Path) -> str:
    lines = [f"--- status of {run}"]
    lines += [str(r) for r in statuses(run)]
    for log in sorted((run / "slurm").glob("*/*_log.*"))[-6:]:
        lines += [f"--- {log}", log.read_text(errors="replace")[-3000:]]
    return "\n".join(lines)


def job_id(run: Path, kind: str) -> str:
    return next(r.job_id for r in records(run) if r.kind == kind)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=30)


def scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], check=True, capture_output=True, text=True, timeout=30)
