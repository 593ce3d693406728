"""What each command submits, and how jobs chain: train → CAM shards → merge → report.

CAM export is a job array (one shard per task) followed by a merge job that depends on it
(``afterok``).  ``--retry-failed`` resubmits only the shards whose part file is missing or
incomplete, then a new merge.  The same code drives the probe's shards, so the machinery is
tested on a real cluster without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnncam.config import RunConfig
from cnncam.errors import CnncamError, LaunchError
from cnncam.launch.backends import backend, run_command
from cnncam.launch.executors import Launcher
from cnncam.launch.jobs import JobRecord, job_status, load_records
from cnncam.launch.probe import ProbeMergeTask, ProbeTask, part_states
from cnncam.launch.tasks import CamShardTask, LaunchTask, MergeTask, ReportTask, SanityTask, TrainTask
from cnncam.runs import cams_dir


@dataclass(frozen=True)
class ShardedStep:
    """A sharded job array plus its merge, described by factories and a state query."""

    kind: str  # "cam" | "probe": the record kind of the shard array
    num_shards: int
    shard_task: Callable[[int], LaunchTask]
    merge_task: Callable[[], LaunchTask]
    states: Callable[[], list[str]]  # per shard: complete | partial | missing | foreign | corrupt
    merged: Path


def cam_step(cfg: RunConfig, num_shards: int) -> ShardedStep:
    from cnncam.storage import MERGED_FILENAME

    def states() -> list[str]:
        from cnncam.storage import part_status

        return [p.state for p in part_status(cams_dir(cfg), num_shards)]

    return ShardedStep(
        "cam",
        num_shards,
        lambda k: CamShardTask(cfg, k, num_shards),
        lambda: MergeTask(cfg, num_shards),
        states,
        cams_dir(cfg) / MERGED_FILENAME,
    )


def probe_step(root: Path, num_shards: int, steps: int, step_s: float) -> ShardedStep:
    return ShardedStep(
        "probe",
        num_shards,
        lambda k: ProbeTask(str(root), steps, step_s, shard=k),
        lambda: ProbeMergeTask(str(root), num_shards),
        lambda: part_states(root, num_shards),
        root / "merged.json",
    )


def check_shards(num_shards: int) -> None:
    if num_shards < 1:
        raise CnncamError(f"--shards must be >= 1, got {num_shards}")


def submit_sharded(
    launcher: Launcher, step: ShardedStep, after: Sequence[JobRecord] = (), only: Sequence[int] | None = None
) -> list[JobRecord]:
    """The shard array (all shards, or ``only`` these) and a merge job waiting for it."""
    check_shards(step.num_shards)
    shards = list(range(step.num_shards)) if only is None else list(only)
    array = launcher.submit(
        step.kind, [step.shard_task(k) for k in shards], after, shards=shards, num_shards=step.num_shards
    )
    merge = launcher.submit("merge", [step.merge_task()], [array], num_shards=step.num_shards)
    return [array, merge]


def recorded_num_shards(launcher: Launcher, kind: str) -> int:
    """The shard count of the latest recorded ``kind`` array (for ``--retry-failed`` / ``merge``)."""
    for rec in reversed(load_records(launcher.paths)):
        if rec.kind == kind and rec.num_shards:
            return rec.num_shards
    raise CnncamError(f"no {kind} array recorded in {launcher.paths.jobs}; pass --shards N")


def retry_failed(launcher: Launcher, step: ShardedStep) -> list[JobRecord]:
    """Resubmit the shards that are not complete, then a new merge."""
    records = load_records(launcher.paths)
    shard_records = [r for r in records if r.kind == step.kind]
    busy = [row.job_id for row in job_status(shard_records, paths=launcher.paths) if not row.done]
    if busy:
        raise LaunchError(
            f"{step.kind} shard jobs still queued or running: {', '.join(busy)}; "
            "wait for them or cancel them first"
        )
    _cancel_orphan_merges(launcher, records)
    states = step.states()
    # Never overwrite what we cannot vouch for: another run's part, or an unreadable one.
    odd = {k: s for k, s in enumerate(states) if s in ("foreign", "corrupt")}
    if odd:
        raise LaunchError(
            f"part files of shards {odd} belong to another run or sharding, or are "
            "unreadable; remove them (or use another cam.out) and retry"
        )
    failed = [k for k, s in enumerate(states) if s != "complete"]
    if not failed:
        if step.merged.exists():
            launcher.out.write(f"all {step.num_shards} shards complete and merged; nothing to retry\n")
            return []
        return [launcher.submit("merge", [step.merge_task()], num_shards=step.num_shards)]
    launcher.out.write(f"retrying shards {failed} of {step.num_shards} (states: {states})\n")
    return submit_sharded(launcher, step, only=failed)


def _cancel_orphan_merges(launcher: Launcher, records: Sequence[JobRecord]) -> None:
    # A merge whose array failed stays PENDING (DependencyNeverSatisfied) forever: drop it.
    if launcher.dry_run:
        return
    merges = [r for r in records if r.kind == "merge"]
    pending = {row.job_id for row in job_status(merges, paths=launcher.paths) if row.state == "PENDING"}
    cancelled = []
    for rec in merges:
        if pending & set(rec.tasks):
            try:
                cancelled += backend(rec.executor).cancel([rec], pending, run_command)
            except LaunchError:
                continue  # it ended meanwhile, or it was never ours to stop: the retry goes on
    if cancelled:
        launcher.out.write(f"cancelled merge jobs left waiting on failed shards: {', '.join(cancelled)}\n")


def ensure_idle(launcher: Launcher, kinds: Sequence[str]) -> None:
    """Refuse to start a second writer of the same files (two trainings of one run directory)."""
    if launcher.dry_run:
        return
    # An in-process (inline) job is over by the time it is recorded.
    records = [
        r for r in load_records(launcher.paths) if r.kind in kinds and not backend(r.executor).in_process
    ]
    rows = job_status(records, paths=launcher.paths)
    busy = [f"{row.job_id} ({row.kind}, {row.state})" for row in rows if not row.done]
    if busy:
        raise LaunchError(
            f"jobs of this run are still queued or running: {', '.join(busy)}; wait for "
            f"them or `cancel --run {launcher.run_dir}` first"
        )


# ----------------------------------------------------------------------------------------------
# Commands


def launch_train(launcher: Launcher, cfg: RunConfig) -> list[JobRecord]:
    ensure_idle(launcher, ("train",))
    return [launcher.submit("train", [TrainTask(cfg)])]


def launch_cam(
    launcher: Launcher, cfg: RunConfig, shards: int | None, shard: tuple[int, int] | None, retry: bool
) -> list[JobRecord]:
    if shard is not None:  # one shard only, no merge
        k, n = shard
        return [launcher.submit("cam", [CamShardTask(cfg, k, n)], shards=[k], num_shards=n)]
    if retry:
        n = shards if shards is not None else recorded_num_shards(launcher, "cam")
        return retry_failed(launcher, cam_step(cfg, n))
    ensure_idle(launcher, ("cam", "merge"))
    return submit_sharded(launcher, cam_step(cfg, 1 if shards is None else shards))


def launch_merge(launcher: Launcher, cfg: RunConfig, shards: int | None) -> list[JobRecord]:
    n = shards if shards is not None else recorded_num_shards(launcher, "cam")
    check_shards(n)
    return [launcher.submit("merge", [MergeTask(cfg, n)], num_shards=n)]


def launch_report(launcher: Launcher, cfg: RunConfig, cams: str | None, out: str | None) -> list[JobRecord]:
    return [launcher.submit("report", [ReportTask(cfg, cams, out)])]


def launch_pipeline(
    launcher: Launcher, cfg: RunConfig, shards: int | None, sanity: bool = False, sanity_data: bool = False
) -> list[JobRecord]:
    n = 1 if shards is None else shards
    check_shards(n)  # before the training job is submitted
    ensure_idle(launcher, ("train", "cam", "merge"))
    train = launcher.submit("train", [TrainTask(cfg)])
    array, merge = submit_sharded(launcher, cam_step(cfg, n), after=[train])
    jobs = [train, array, merge]
    if sanity or sanity_data:
        jobs += sanity_steps(launcher, cfg, train, sanity_data)
    report = launcher.submit("report", [ReportTask(cfg)], jobs[2:])
    return [*jobs, report]


# ----------------------------------------------------------------------------------------------
# Sanity checks (issue 11): a sanity job after training; with the data test, the same config
# trained on permuted labels in its own run folder, which the sanity job also waits for.


def permuted_config(cfg: RunConfig) -> RunConfig:
    """The data-randomisation twin of ``cfg``: ``<name>-permuted``, ``data.permute_labels=true``."""
    import dataclasses

    return dataclasses.replace(
        cfg, name=f"{cfg.name}-permuted", data=dataclasses.replace(cfg.data, permute_labels=True)
    )


def sanity_steps(launcher: Launcher, cfg: RunConfig, train: JobRecord, data: bool) -> list[JobRecord]:
    """[permuted training (with ``data``),] sanity job after ``train``; the permuted run is submitted
    by its own launcher, so its jobs, logs and status live in its own run folder."""
    import dataclasses

    after, permuted = [train], None
    if data:
        twin = permuted_config(cfg)
        other = dataclasses.replace(launcher, run_dir=twin.run_dir, run_name=twin.name, submitted=[])
        ensure_idle(other, ("train",))
        after.append(other.submit("train", [TrainTask(twin)]))
        permuted = str(twin.run_dir)
        launcher.out.write(f"permuted-label training: {twin.run_dir} (status --run {twin.run_dir})\n")
    return [launcher.submit("sanity", [SanityTask(cfg, permuted)], after)]


def launch_sanity(launcher: Launcher, cfg: RunConfig, permuted: str | None) -> list[JobRecord]:
    return [launcher.submit("sanity", [SanityTask(cfg, permuted)])]


def launch_probe(
    launcher: Launcher,
    root: Path,
    steps: int,
    step_s: float,
    shards: int | None,
    retry: bool,
    allreduce: bool = False,
    fail: bool = False,
) -> list[JobRecord]:
    if retry:
        n = shards if shards is not None else recorded_num_shards(launcher, "probe")
        return retry_failed(launcher, probe_step(root, n, steps, step_s))
    if shards is not None:
        return submit_sharded(launcher, probe_step(root, shards, steps, step_s))
    return [launcher.submit("probe", [ProbeTask(str(root), steps, step_s, allreduce=allreduce, fail=fail)])]
