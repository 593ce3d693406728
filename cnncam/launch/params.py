"""Slurm options: validation, per-job resources, submitit parameters and the sbatch text.

Everything a user types that ends up in an sbatch script passes through here.  submitit
shell-quotes each ``#SBATCH`` value, but quoting cannot stop a newline: a job name
``"x\\nrm -rf ~"`` would put ``rm -rf ~'`` on a line of its own, which bash runs.  So control
characters are refused everywhere, names must use Slurm's own character sets, and extra
options must look like ``--key`` or ``--key=value``.  The setup block is shell code by design
(``module load ...``); each entry must still be exactly one line.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cnncam.errors import ConfigError, LaunchError, choice_message

if TYPE_CHECKING:
    from cnncam.config import SlurmConfig

EXECUTORS = ("slurm", "local", "inline")
JOB_KINDS = ("train", "cam", "merge", "report", "probe", "sanity")
# Jobs that checkpoint on a signal and may be requeued (the others are short and idempotent).
REQUEUEABLE = ("train", "cam", "probe")

_NAME = re.compile(r"[A-Za-z0-9_.+:@-]+(,[A-Za-z0-9_.+:@-]+)*")  # partition, account, qos
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:;&|*!()\[\]-]+")  # e.g. "a100&ib", "[rack1|rack2]*2"
_OPTION = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # any control character but tab
# sbatch options the launcher sets itself (log paths, array, signal and dependency are how it
# finds and chains jobs), mapped to the flag to use instead (None: not settable).
_MANAGED: dict[str, str | None] = {
    "output": None,
    "error": None,
    "open-mode": None,
    "array": "--shards",
    "signal": "--signal-delay",
    "dependency": None,
    "wrap": None,
    "parsable": None,
    "partition": "--partition",
    "nodes": "--nodes",
    "ntasks-per-node": "--tasks-per-node",
    "ntasks": "--tasks-per-node",
    "gpus-per-node": "--gpus",
    "gres": "--gpus",
    "gpus": "--gpus",
    "cpus-per-task": "--cpus-per-task",
    "mem": "--mem-gb",
    "time": "--time",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "job-name": "--job-name",
}
# sbatch's one-letter forms of the managed options (man sbatch).
_MANAGED_SHORT = {
    "a": "array",
    "A": "account",
    "C": "constraint",
    "c": "cpus-per-task",
    "d": "dependency",
    "e": "error",
    "G": "gpus",
    "J": "job-name",
    "N": "nodes",
    "n": "ntasks",
    "o": "output",
    "p": "partition",
    "q": "qos",
    "t": "time",
}
TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


# ----------------------------------------------------------------------------------------------
# Validation


def check_sbatch_safety(cfg: SlurmConfig) -> None:
    """Refuse values that cannot be put safely into an sbatch script (raises ConfigError)."""
    for key in ("partition", "cpu_partition", "account", "qos"):
        value = getattr(cfg, key)
        if value is not None and not _NAME.fullmatch(value):
            raise ConfigError(
                f"slurm.{key} {value!r} is not a valid Slurm name: use letters, digits and _ . + : @ -"
                " (comma-separated for several)"
            )
    if cfg.constraint is not None and not _CONSTRAINT.fullmatch(cfg.constraint):
        raise ConfigError(
            f"slurm.constraint {cfg.constraint!r} has characters Slurm constraints do not use; "
            "valid: features made of letters, digits, _ . - joined by & | , ; with [ ] ( ) * !"
        )
    if cfg.job_name is not None:
        if not cfg.job_name.strip() or _CONTROL.search(cfg.job_name) or len(cfg.job_name) > 200:
            raise ConfigError(
                f"slurm.job_name {cfg.job_name!r} must be 1-200 printable characters without newlines"
            )
    parse_extra_sbatch(cfg.extra_sbatch)
    for i, line in enumerate(cfg.setup):
        if _CONTROL.search(line):
            raise ConfigError(
                f"slurm.setup[{i}] {line!r} contains a newline or control character; give one list "
                "entry per shell line"
            )


def parse_extra_sbatch(lines: Iterable[str]) -> dict[str, str | bool]:
    """``["--exclusive", "--reservation=x"]`` → ``{"exclusive": True, "reservation": "x"}``."""
    out: dict[str, str | bool] = {}
    for line in lines:
        short = re.match(r"-([A-Za-z])", line.strip())
        if short is not None and short.group(1) in _MANAGED_SHORT:
            _refuse_managed(f"-{short.group(1)}", [_MANAGED_SHORT[short.group(1)]])
        m = _OPTION.fullmatch(line.strip())
        if m is None or _CONTROL.search(line):
            raise ConfigError(
                f"slurm.extra_sbatch entry {line!r} must be one long sbatch option, '--key' or "
                "'--key=value', without newlines (e.g. --exclusive, --reservation=foo)"
            )
        key, value = m.group(1), m.group(2)
        # sbatch (getopt_long) expands an unambiguous prefix: --arr is --array, --dep --dependency.
        managed = [key] if key in _MANAGED else [name for name in _MANAGED if name.startswith(key)]
        if managed:
            _refuse_managed(f"--{key}", managed)
        out[key] = True if value is None else value
    return out


def _refuse_managed(given: str, managed: list[str]) -> None:
    hints = [f"use {_MANAGED[m]} (or the matching slurm.* key)" for m in managed if _MANAGED[m]]
    names = " or ".join(f"--{m}" for m in managed)
    means = "" if given == f"--{managed[0]}" else f" (sbatch reads it as {names})"
    hint = "; ".join(dict.fromkeys(hints)) or "the launcher sets it"
    raise ConfigError(f"slurm.extra_sbatch may not set {given}{means}: {hint}")


def parse_time(text: str) -> int:
    """Slurm's time formats → whole minutes (seconds round up): ``"1-12:00"`` → 2160."""
    text = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m is None:
        raise ConfigError(f"time limit {text!r} is not understood; valid formats: {TIME_FORMATS}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    assert a is not None  # the regex requires it
    if days is None:  # minutes | minutes:seconds | hours:minutes:seconds
        if c is not None:
            seconds = a * 3600 + (b or 0) * 60 + c
        else:
            seconds = a * 60 + (b or 0)
    else:  # days-hours | days-hours:minutes | days-hours:minutes:seconds
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    minutes = -(-seconds // 60)
    if minutes <= 0:
        raise ConfigError(f"time limit {text!r} must be at least one minute")
    return minutes


def resolve_executor(
    requested: str, dry_run: bool = False, which: Callable[[str], str | None] = shutil.which
) -> tuple[str, str]:
    """The executor to use and why: ``auto`` means slurm when ``sbatch`` is on PATH, else local.

    ``--executor slurm --dry-run`` works without Slurm, to preview scripts on a laptop.

    Stated in the output on purpose: submitit's AutoExecutor silently falls back to local
    when srun is missing (submitit#1597).
    """
    if requested == "auto":
        if which("sbatch"):
            return "slurm", "sbatch found on PATH"
        return "local", "no sbatch on PATH; jobs run as local processes"
    if requested not in EXECUTORS:
        raise ConfigError(choice_message("executor", requested, ("auto", *EXECUTORS)))
    if requested == "slurm" and not which("sbatch") and not dry_run:
        raise LaunchError("--executor slurm, but sbatch is not on PATH; use --executor local or inline")
    return requested, "requested"


# ----------------------------------------------------------------------------------------------
# Per-job resources and submitit parameters


@dataclass(frozen=True)
class Resources:
    """What one job of a given kind asks for."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    partition: str | None


def resources(kind: str, cfg: SlurmConfig) -> Resources:
    """Training (and the probe) uses the whole layout; a CAM shard one GPU; merge/report none."""
    if kind not in JOB_KINDS:
        raise ConfigError(choice_message("job kind", kind, JOB_KINDS))
    if kind in ("train", "probe"):
        tasks = cfg.tasks_per_node if cfg.tasks_per_node is not None else max(1, cfg.gpus_per_node)
        return Resources(cfg.nodes, tasks, cfg.gpus_per_node, cfg.partition)
    if kind in ("cam", "sanity"):
        return Resources(1, 1, min(1, cfg.gpus_per_node), cfg.partition)
    return Resources(1, 1, 0, cfg.cpu_partition or cfg.partition)


def job_name(kind: str, cfg: SlurmConfig, run_name: str) -> str:
    return f"{cfg.job_name or 'cnncam-' + run_name}-{kind}"


def mem_string(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def slurm_parameters(
    kind: str, cfg: SlurmConfig, run_name: str, dependency: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (its native names)."""
    r = resources(kind, cfg)
    params: dict[str, Any] = {
        "job_name": job_name(kind, cfg, run_name),
        "time": cfg.time_min,
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "signal_delay_s": cfg.signal_delay_s,
        "array_parallelism": cfg.array_parallelism,
    }
    optional = {
        "gpus_per_node": r.gpus_per_node or None,
        "partition": r.partition,
        "mem": mem_string(cfg.mem_gb) if cfg.mem_gb else None,
        "account": cfg.account,
        "qos": cfg.qos,
        "constraint": cfg.constraint,
        "dependency": dependency,
        "setup": list(cfg.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = parse_extra_sbatch(cfg.extra_sbatch)
    if kind in REQUEUEABLE and "no-requeue" not in extra:
        # Clusters may default to JobRequeue=0; submitit's `scontrol requeue` needs the job requeueable.
        extra = {"requeue": True, **extra}
    if extra:
        params["additional_parameters"] = extra
    return params


def local_parameters(kind: str, cfg: SlurmConfig) -> dict[str, Any]:
    """Keyword arguments for ``submitit.LocalExecutor.update_parameters``."""
    r = resources(kind, cfg)
    if r.nodes > 1:
        raise ConfigError(f"the local executor runs on one node; got slurm.nodes={r.nodes}")
    return {
        "timeout_min": cfg.time_min,
        "gpus_per_node": r.gpus_per_node,
        "tasks_per_node": r.tasks_per_node,
        "signal_delay_s": cfg.signal_delay_s,
    }


def afterok(job_ids: Iterable[str]) -> str | None:
    """``afterok:12:13`` (an array id waits for all its tasks), or None without dependencies."""
    ids = [str(j) for j in job_ids]
    return "afterok:" + ":".join(ids) if ids else None
