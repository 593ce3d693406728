"""One submission path for every command: Slurm, local processes, or in-process (inline).

:class:`Launcher` turns a list of tasks into one job (or one array) through the backend of its
executor (:mod:`cnncam.launch.backends`), records it in ``jobs.json`` and returns at once
(submit and exit).  ``--dry-run`` prints the exact sbatch script instead and submits nothing.

Jobs run the code they were submitted with: the first submission of a launcher call takes a
snapshot of the package source into ``<run>/code/<digest>/`` (:mod:`cnncam.launch.snapshot`)
and every job of that call imports cnncam from it (``slurm.snapshot_code``, default true).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cnncam.config import SlurmConfig
from cnncam.errors import CnncamError, LaunchError
from cnncam.launch import submitit_api as S
from cnncam.launch.backends import Backend, Submission, backend
from cnncam.launch.records import JobRecord, append_records
from cnncam.launch.snapshot import CodeSnapshot, source_root, take_snapshot
from cnncam.launch.tasks import CODE_ENV, LaunchTask
from cnncam.runs import RunPaths


@contextlib.contextmanager
def clean_slurm_env(code: Path | None = None) -> Iterator[None]:
    """Submit as from a fresh shell, even from inside a job, with ``code`` first on PYTHONPATH.

    A job submitted from a job inherits SLURM_* (and torch's RANK...) variables, which
    leak its allocation into the new one (submitit#1782); submitit's ``clean_env`` also
    hides SLURM_CONF, which a cluster may need to find its config (submitit#1814).
    Jobs unpickle cnncam tasks: they import the code snapshot ``code`` (and ``CNNCAM_CODE``
    lets them check it), or without one this very checkout, installed or not.  Slurm saves the
    environment at submission, so a requeued job keeps both.
    """
    conf = os.environ.get("SLURM_CONF")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", CODE_ENV)}
    pythonpath = saved["PYTHONPATH"]
    root = str(code if code is not None else source_root())
    with S.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *([pythonpath] if pythonpath else [])])
        if code is not None:
            os.environ[CODE_ENV] = str(code)
        else:
            os.environ.pop(CODE_ENV, None)
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env restores the original value
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass
class Launcher:
    """Submits tasks for one run with one executor and one Slurm config."""

    executor: str  # slurm | local | inline (already resolved, see params.resolve_executor)
    run_dir: Path
    run_name: str
    slurm: SlurmConfig
    dry_run: bool = False
    command: str = ""
    python: str | None = None  # how nodes start python; default: this interpreter
    out: TextIO = field(default_factory=lambda: sys.stdout)
    submitted: list[JobRecord] = field(default_factory=list)
    # Taken at the first submission, shared by all of them; not copied by dataclasses.replace (a
    # launcher for another run folder takes its own).
    snapshot: CodeSnapshot | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.backend: Backend = backend(self.executor)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @property
    def folder(self) -> Path:
        # Absolute, as submitit makes it: the job's cwd must not matter for its log paths.
        return (self.paths.slurm_logs / "%j").absolute()

    @property
    def snapshots(self) -> bool:
        """Whether this launcher's jobs run from a code snapshot."""
        return self.backend.takes_snapshot and self.slurm.snapshot_code

    def submit(
        self,
        kind: str,
        tasks: Sequence[LaunchTask],
        after: Sequence[JobRecord] = (),
        shards: Sequence[int] | None = None,
        num_shards: int | None = None,
    ) -> JobRecord:
        """Submit ``tasks`` as one job (one task) or one array; wait for ``after`` (afterok)."""
        if not tasks:
            raise LaunchError(f"nothing to submit for {kind}")
        sub = self._submission(kind, tasks, after, shards, num_shards)
        if self.dry_run:
            self.out.write(self.backend.preview(sub))
            placeholder = f"<{kind}-job-id>"
            rec = JobRecord(
                kind, self.executor, placeholder, [placeholder] * len(tasks), str(self.folder), sub.name
            )
            rec.after = sub.after_ids
        else:
            rec = self.backend.submit(sub)
        self._complete(rec, shards, num_shards)
        if not self.dry_run:
            append_records(self.paths, [rec])
        self.submitted.append(rec)
        return rec

    def _complete(self, rec: JobRecord, shards: Sequence[int] | None, num_shards: int | None) -> None:
        rec.shards = list(shards) if shards is not None else None
        rec.num_shards = num_shards
        rec.command = self.command
        rec.submitted = rec.submitted or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.snapshot is not None:
            rec.code = os.path.relpath(self.snapshot.root, self.run_dir)

    def _submission(
        self,
        kind: str,
        tasks: Sequence[LaunchTask],
        after: Sequence[JobRecord],
        shards: Sequence[int] | None,
        num_shards: int | None,
    ) -> Submission:
        code = self._code()

        def on_failure(rec: JobRecord) -> None:
            self._complete(rec, shards, num_shards)
            self._record_failed(kind, rec)

        return Submission(
            kind,
            tasks,
            after,
            self.folder,
            self.slurm,
            self.run_name,
            self._python(),
            lambda: clean_slurm_env(code),
            on_failure,
        )

    def _code(self) -> Path | None:
        """The snapshot root jobs import from (taken once per launcher), or None."""
        if not self.snapshots or self.dry_run:
            return None
        if self.snapshot is None:
            self.snapshot = take_snapshot(self.run_dir)
        return self.snapshot.root

    def _python(self) -> str:
        python = self.python or shlex.quote(sys.executable)
        # -P: the job's working directory (often the checkout itself) must not shadow the snapshot
        # on sys.path; Python 3.10 has no -P, and the job checks where it imports from instead.
        if self.snapshots and self.python is None and sys.version_info >= (3, 11):
            python += " -P"
        return python

    def _record_failed(self, kind: str, rec: JobRecord) -> None:
        self.submitted.append(rec)
        try:
            append_records(self.paths, [rec])
        except (OSError, CnncamError) as e:
            # The task's own error is the one to show; this one is a footnote, not a chain.
            print(
                f"warning: could not record the failed {kind} job in {self.paths.jobs}: {e}", file=sys.stderr
            )
