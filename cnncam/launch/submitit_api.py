"""Every use of submitit that is not its documented API, in one place.

cnncam builds on submitit (1.5.x, pinned in pyproject: ``submitit>=1.5,<1.6``) but needs a few
things it keeps private: the sbatch text it would submit (for ``--dry-run``), the signal it
treats as "checkpoint and requeue", and where it puts each task's logs.  A submitit release
that moves one of them breaks only this module, and ``tests/test_launch_seam.py`` pins each one
against the installed version.  Imports are lazy: :mod:`cnncam.launch` must stay importable
without submitit's import cost (the config validation imports it).
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The versions this module was checked against (pyproject pins the same range).
TESTED = ">=1.5,<1.6"


def submit_command(folder: Path, python: str) -> str:
    """The command line submitit puts in the script (``SlurmExecutor._submitit_command_str``)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_text(params: dict[str, Any], folder: Path, python: str, array_size: int = 1) -> str:
    """The exact sbatch script submitit would submit for ``params``.

    submitit has no public API for this (anchors-launcher §1), so we call the private function it
    uses itself; tests compare the result with a really submitted script.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    kwargs = dict(params)
    if array_size > 1:
        kwargs["map_count"] = array_size
    return str(_make_sbatch_string(command=submit_command(folder, python), folder=folder, **kwargs))


def requeue_signal() -> int:
    """The signal submitit's handler answers with checkpoint + requeue (USR2, unless the job's
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    from submitit import JobEnvironment

    return int(JobEnvironment._usr_sig())


def job_folder(folder: Path, job_id: str) -> Path:
    """submitit's folder of one job (``folder`` may hold ``%j``)."""
    from submitit.core.utils import JobPaths

    return Path(JobPaths(folder, job_id=job_id).folder)


def log_files(folder: Path, job_id: str, rank: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of task ``rank`` of job ``job_id`` under ``folder``."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=rank)
    return Path(paths.stdout), Path(paths.stderr)


def in_job() -> bool:
    """True inside a job started by submitit's Slurm or local executor."""
    import os

    return os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") and "SUBMITIT_FOLDER" in os.environ


def job_identity() -> tuple[Path, str, int]:
    """(submitit folder, job id, global rank) of the running job; only inside a job."""
    from submitit import JobEnvironment

    env = JobEnvironment()
    return Path(env.paths.folder), str(env.job_id), int(env.global_rank)


@contextlib.contextmanager
def clean_env() -> Iterator[None]:
    """submitit's environment cleaner for submissions from inside a job (it hides SLURM_*,
    SBATCH_*, SUBMITIT_* and torch's RANK-style variables, and also SLURM_CONF: submitit#1814)."""
    from submitit.helpers import clean_env as submitit_clean_env

    with submitit_clean_env():
        yield


def slurm_executor(folder: Path, max_requeues: int, python: str | None) -> Any:
    import submitit

    return submitit.SlurmExecutor(folder, max_num_timeout=max_requeues, python=python)


def local_executor(folder: Path, max_requeues: int, python: str | None) -> Any:
    import submitit

    return submitit.LocalExecutor(folder, max_num_timeout=max_requeues, python=python)
