"""One submission path for every command: Slurm, local processes, or in-process (inline).

:class:`Launcher` turns a list of tasks into one job (or one array), records it in
``jobs.json`` and returns at once (submit and exit).  ``--dry-run`` prints the exact sbatch
script instead and submits nothing.
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
from typing import Any, TextIO

from cnncam.config import SlurmConfig
from cnncam.errors import CnncamError, ConfigError, LaunchError, choice_message
from cnncam.launch import params as P
from cnncam.launch.jobs import JobRecord, append_records
from cnncam.launch.tasks import AfterOk, LaunchTask, LocalDep, state_file
from cnncam.runs import RunPaths


@contextlib.contextmanager
def clean_slurm_env() -> Iterator[None]:
    """Submit as from a fresh shell, even from inside a job.

    A job submitted from a job inherits SLURM_* (and torch's RANK...) variables, which
    leak its allocation into the new one (submitit#1782); submitit's ``clean_env`` also
    hides SLURM_CONF, which a cluster may need to find its config (submitit#1814).
    """
    from submitit.helpers import clean_env

    conf = os.environ.get("SLURM_CONF")
    pythonpath = os.environ.get("PYTHONPATH")
    # Jobs unpickle cnncam tasks: make them import this very checkout, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    with clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *([pythonpath] if pythonpath else [])])
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env restores the original value
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath


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

    def __post_init__(self) -> None:
        if self.executor not in P.EXECUTORS:
            raise ConfigError(choice_message("executor", self.executor, P.EXECUTORS))

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @property
    def folder(self) -> Path:
        # Absolute, as submitit makes it: the job's cwd must not matter for its log paths.
        return (self.paths.slurm_logs / "%j").absolute()

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
        if self.dry_run:
            rec = self._dry_run(kind, tasks, after)
        elif self.executor == "slurm":
            rec = self._submit_slurm(kind, tasks, after)
        elif self.executor == "local":
            rec = self._submit_local(kind, tasks, after)
        else:
            rec = self._run_inline(kind, tasks, shards, num_shards)
        rec.shards = list(shards) if shards is not None else None
        rec.num_shards = num_shards
        rec.command = self.command
        rec.submitted = rec.submitted or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not self.dry_run:
            append_records(self.paths, [rec])
        self.submitted.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------
    def _params(self, kind: str, after: Sequence[JobRecord]) -> dict[str, Any]:
        return P.slurm_parameters(kind, self.slurm, self.run_name, P.afterok(r.job_id for r in after))

    def _python(self) -> str:
        return self.python or shlex.quote(sys.executable)

    def _dry_run(self, kind: str, tasks: Sequence[LaunchTask], after: Sequence[JobRecord]) -> JobRecord:
        placeholder = f"<{kind}-job-id>"
        if self.executor == "slurm":
            script = P.render_sbatch(self._params(kind, after), self.folder, self._python(), len(tasks))
            array = f" (array of {len(tasks)} tasks)" if len(tasks) > 1 else ""
            self.out.write(f"# --- sbatch script for {kind}{array}, job id {placeholder} ---\n{script}\n")
        else:
            deps = f", after {', '.join(r.job_id for r in after)}" if after else ""
            self.out.write(f"# --- {kind}: {len(tasks)} task(s) with the {self.executor} executor{deps}\n")
        return JobRecord(
            kind,
            self.executor,
            placeholder,
            [placeholder] * len(tasks),
            str(self.folder),
            P.job_name(kind, self.slurm, self.run_name),
            after=[r.job_id for r in after],
        )

    def _submit_slurm(self, kind: str, tasks: Sequence[LaunchTask], after: Sequence[JobRecord]) -> JobRecord:
        import submitit

        executor = submitit.SlurmExecutor(
            self.folder, max_num_timeout=self.slurm.max_requeues, python=self.python
        )
        params = self._params(kind, after)
        executor.update_parameters(**params)
        with clean_slurm_env():
            try:
                jobs = executor.submit_array(list(tasks))
            except Exception as e:  # submitit raises FailedJobError/CalledProcessError with sbatch's text
                raise LaunchError(f"sbatch refused the {kind} job: {e}") from None
        ids = [j.job_id for j in jobs]
        job_id = ids[0].split("_")[0]
        return JobRecord(
            kind, "slurm", job_id, ids, str(self.folder), params["job_name"], after=[r.job_id for r in after]
        )

    def _submit_local(self, kind: str, tasks: Sequence[LaunchTask], after: Sequence[JobRecord]) -> JobRecord:
        import submitit
        from submitit.core.utils import JobPaths

        executor = submitit.LocalExecutor(self.folder, max_num_timeout=self.slurm.max_requeues)
        executor.update_parameters(**P.local_parameters(kind, self.slurm))
        deps = tuple(
            LocalDep(int(pid), str(state_file(JobPaths(self.folder, job_id=pid).folder, pid)))
            for r in after
            for pid in r.tasks
        )
        # No --dependency locally: each task waits for its dependencies itself (AfterOk).
        fns = [AfterOk(t, deps) if deps else t for t in tasks]
        with clean_slurm_env():
            ids = [executor.submit(fn).job_id for fn in fns]
        name = P.job_name(kind, self.slurm, self.run_name)
        return JobRecord(kind, "local", ids[0], ids, str(self.folder), name, after=[r.job_id for r in after])

    def _run_inline(
        self, kind: str, tasks: Sequence[LaunchTask], shards: Sequence[int] | None, num_shards: int | None
    ) -> JobRecord:
        r = P.resources(kind, self.slurm)
        if r.nodes * r.tasks_per_node > 1:
            raise ConfigError(
                f"--executor inline runs one process, but {kind} asks for {r.nodes} node(s) x "
                f"{r.tasks_per_node} task(s); use --executor local or slurm for several tasks"
            )
        rec = JobRecord(
            kind,
            "inline",
            "inline",
            ["inline"] * len(tasks),
            str(self.folder),
            P.job_name(kind, self.slurm, self.run_name),
            shards=list(shards) if shards is not None else None,
            num_shards=num_shards,
            submitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=self.command,
            state="RUNNING",
        )
        try:
            for task in tasks:
                task()
        except BaseException:
            rec.state = "FAILED"
            self.submitted.append(rec)
            try:
                append_records(self.paths, [rec])
            except (OSError, CnncamError) as e:
                # The task's own error is the one to show; this one is a footnote, not a chain.
                print(
                    f"warning: could not record the failed {kind} job in {self.paths.jobs}: {e}",
                    file=sys.stderr,
                )
            raise
        rec.state = "COMPLETED"
        return rec
