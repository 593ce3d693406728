"""``python jobs/launch.py {train,cam,merge,report,pipeline,sanity,status,logs,cancel,synth,probe} ...``

Argument parsing only.  Every flag is sugar for a ``--set key=value`` override, so the
config schema (:mod:`cnncam.config`) stays the one place that validates values; bad values
fail here, before anything is submitted.  Submission goes through one path
(:class:`cnncam.launch.executors.Launcher`) whatever the command and executor.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnncam.config import RunConfig, load_config, load_yaml
from cnncam.errors import CnncamError, ConfigError
from cnncam.runs import RunPaths, load_run, run_folder

if TYPE_CHECKING:
    from cnncam.launch.executors import Launcher

PROG = "python jobs/launch.py"
# CLI flag (argparse dest) → config key.
SLURM_FLAGS = {
    "partition": "slurm.partition",
    "cpu_partition": "slurm.cpu_partition",
    "nodes": "slurm.nodes",
    "gpus": "slurm.gpus_per_node",
    "tasks_per_node": "slurm.tasks_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem_gb": "slurm.mem_gb",
    "time": "slurm.time_min",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "constraint": "slurm.constraint",
    "job_name": "slurm.job_name",
    "array_parallelism": "slurm.array_parallelism",
    "sbatch_extra": "slurm.extra_sbatch",
    "setup": "slurm.setup",
    "signal_delay": "slurm.signal_delay_s",
    "executor": "slurm.executor",
}
CAM_FLAGS = {
    "split": "cam.split",
    "method": "cam.methods",
    "layer": "cam.layers",
    "targets": "cam.targets",
    "metrics": "cam.metrics",
    "activations": "cam.activations",
    "checkpoint": "cam.checkpoint",
    "road": "cam.road",
    "consolidate": "cam.consolidate",
}
SANITY_FLAGS = {"images": "sanity.images", "mode": "sanity.modes"}


def override_text(value: Any) -> str:
    """A Python value as ``--set`` text: lists as JSON (a YAML subset), strings as they are."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def profile_overrides(path: str) -> list[str]:
    """A ``configs/slurm/*.yaml`` profile (a config file holding only ``slurm:``) as overrides."""
    p = Path(path)
    if not p.is_file():
        choices = sorted(str(x) for x in Path("configs/slurm").glob("*.yaml"))
        what = "is a folder, not a YAML file" if p.is_dir() else "does not exist"
        raise ConfigError(f"Slurm profile {path!r} {what}. Profiles here: {', '.join(choices) or 'none'}")
    raw = load_yaml(p, "Slurm profile") or {}
    if not isinstance(raw, dict) or set(raw) - {"slurm"} or not isinstance(raw.get("slurm", {}), dict):
        raise ConfigError(f"Slurm profile {path!r} must hold only a 'slurm:' mapping of slurm.* keys")
    return [f"slurm.{k}={override_text(v)}" for k, v in (raw.get("slurm") or {}).items()]


def overrides_from(args: argparse.Namespace) -> list[str]:
    """Profile, then flags, then explicit ``--set`` (the last one wins)."""
    from cnncam.launch.params import parse_time

    out = profile_overrides(args.profile) if getattr(args, "profile", None) else []
    for flags in (SLURM_FLAGS, CAM_FLAGS, SANITY_FLAGS):
        for dest, key in flags.items():
            value = getattr(args, dest, None)
            if value is None or value is False:
                continue
            if dest == "time":
                value = parse_time(value)
            out.append(f"{key}={override_text(value)}")
    return out + list(getattr(args, "set", None) or [])


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` → (2, 8)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants i/n, e.g. 0/4; got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return k, n


# ----------------------------------------------------------------------------------------------
# Parser


def _launch_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("submission (each flag is sugar for --set slurm.*)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")
    g.add_argument(
        "--executor",
        choices=("auto", "slurm", "local", "inline"),
        help="default auto: slurm when sbatch is on PATH, else local; inline runs in this process",
    )
    g.add_argument("--profile", metavar="YAML", help="Slurm profile, e.g. configs/slurm/gpu.yaml")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    g.add_argument("--partition")
    g.add_argument(
        "--cpu-partition", metavar="PARTITION", help="partition for CPU-only steps (merge, report)"
    )
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus", type=int, help="GPUs per node (training starts one task per GPU)")
    g.add_argument("--tasks-per-node", type=int, help="tasks per node; with --gpus 0: DDP on CPU (gloo)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--job-name", help="prefix of the job names")
    g.add_argument("--array-parallelism", type=int, help="max array tasks running at once")
    g.add_argument(
        "--sbatch-extra",
        action="append",
        metavar="--KEY=VALUE",
        help="extra sbatch option; use the = form: --sbatch-extra=--exclusive",
    )
    g.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="shell line run before the job, e.g. 'module load cuda' (repeatable)",
    )
    g.add_argument(
        "--signal-delay",
        type=int,
        metavar="S",
        help="send USR2 this many seconds before the time limit, to checkpoint",
    )
    return p


def _cam_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("CAM export (sugar for --set cam.*)")
    g.add_argument("--split", choices=("train", "val", "test"))
    g.add_argument("--method", action="append", help="CAM method (repeatable), e.g. gradcam, gradcam_pp")
    g.add_argument("--layer", action="append", help="target layer (repeatable); 'auto' = last conv")
    g.add_argument("--targets", help="pred, label, all, class:<i> or topk:<k>")
    g.add_argument(
        "--metrics", action="store_true", default=None, help="deletion/insertion AUC, pointing game"
    )
    g.add_argument("--road", action="store_true", default=None, help="ROAD MoRF/LeRF scores per image")
    g.add_argument("--activations", nargs="+", metavar="LAYER", help="record activations of these layers")
    g.add_argument("--checkpoint", help="best, last or a path to a .pt file")
    g.add_argument("--shards", type=int, metavar="N", help="split the export into an N-task job array")
    return p


def _export_only_flags(p: argparse.ArgumentParser) -> None:
    # issue 10: export a model cnncam did not train; each flag is sugar for a --set key but --classes.
    g = p.add_argument_group("export a model cnncam did not train (creates runs/<name>, see README)")
    g.add_argument("--model", help="model.name: a registered name, torchvision:<b>, timm:<n>, python:<m>:<f>")
    g.add_argument("--weights", help="model.weights: its .pt/.pth state dict or .safetensors file")
    g.add_argument(
        "--data", help="the images: class folders, a CSV manifest (.csv) or a folder of *.tar shards"
    )
    g.add_argument("--classes", help="class names, one per line (index = the model's output)")
    g.add_argument("--name", help="the run's name (folder under runs_dir)")
    g.add_argument("--config", help="YAML config for the export-only run (data, cam, slurm settings)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train CNN classifiers and explain them with CAMs, on Slurm or locally.",
        epilog=f"Most commands submit jobs and return at once; then: {PROG} status --run runs/<name>",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launch, cam = _launch_parent(), _cam_parent()
    run_help = "run directory, e.g. runs/<name>"

    p = sub.add_parser("train", parents=[launch], help="train (or resume) a classifier")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p = sub.add_parser("cam", parents=[cam, launch], help="export CAMs of a trained run (array + merge)")
    p.add_argument("--run", help=run_help + " (or --model ... to create an export-only run)")
    _export_only_flags(p)
    p.add_argument("--shard", type=parse_shard, metavar="I/N", help="export only shard I of N (no merge)")
    p.add_argument("--retry-failed", action="store_true", help="resubmit only shards that are not complete")
    p = sub.add_parser("merge", parents=[launch], help="merge CAM part files into cams.h5")
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--shards", type=int, metavar="N", help="number of parts (default: the last cam array)")
    p.add_argument(
        "--consolidate",
        action="store_const",
        const="always",
        help="copy the parts into one self-contained cams.h5 (same as --set cam.consolidate=always)",
    )
    p = sub.add_parser("report", parents=[launch], help="build the offline HTML report")
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--cams", help="merged CAM file (default: <run>/cams/cams.h5)")
    p.add_argument("--out", help="output folder (default: <run>/report)")
    p = sub.add_parser("pipeline", parents=[cam, launch], help="train -> cam -> report, chained by Slurm")
    p.add_argument("--config", help="YAML config")
    p.add_argument("--sanity", action="store_true", help="also run the model-randomisation sanity check")
    p.add_argument(
        "--sanity-data",
        action="store_true",
        help="also train on permuted labels (<name>-permuted) and compare its maps (implies --sanity)",
    )
    p = sub.add_parser("sanity", parents=[launch], help="sanity checks of a trained run -> cams/sanity.h5")
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--images", type=int, help="sample size (sanity.images, default 64)")
    p.add_argument("--mode", action="append", choices=("cascading", "independent"), help="repeatable")
    p.add_argument("--permuted", metavar="RUN", help="run trained on permuted labels: the data test")
    p = sub.add_parser("probe", parents=[launch], help="check a cluster set-up with a tiny fake job")
    p.add_argument("--config", help="YAML config (its name/runs_dir choose the run directory)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-s", type=float, default=0.2, help="seconds per step")
    p.add_argument("--shards", type=int, metavar="N", help="an N-task array and a merge job")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--allreduce", action="store_true", help="gloo all-reduce across the tasks")
    p.add_argument("--fail", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="table of the run's jobs: state, elapsed, node, restarts")
    p.add_argument("--run", required=True, help=run_help)
    p = sub.add_parser("logs", help="print (or --follow) a job's output")
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--job", help="job id or kind (train, cam, merge, report); default: the latest")
    p.add_argument("--task", type=int, help="array task index (see status)")
    p.add_argument("--rank", type=int, default=0, help="task rank within a multi-task job")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p = sub.add_parser("cancel", help="cancel every unfinished job of the run")
    p.add_argument("--run", required=True, help=run_help)
    # Arguments after "synth" go to cnncam.data.synthetic.main untouched (see main()).
    sub.add_parser("synth", help="write a synthetic image-folder dataset (synth --help for its options)")
    return parser


# ----------------------------------------------------------------------------------------------
# Commands


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = overrides_from(args)
    if args.command == "cam" and args.model is not None:
        return _export_only_config(args, overrides)
    if args.command == "cam" and not args.run:
        raise CnncamError("cam needs --run runs/<name>, or --model, --weights, --data, --classes, --name")
    if getattr(args, "run", None):
        # The folder given wins over name/runs_dir saved in it (the run may have moved).
        return load_run(args.run, overrides)[0]
    return load_config(getattr(args, "config", None), overrides)


def _export_only_config(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    """Create (or reuse) the export-only run folder of ``cam --model ...`` and return its config."""
    from cnncam.export_only import create_export_run, data_overrides, explicit_keys

    if args.run:
        raise CnncamError("give either --run (an existing run) or --model (a new export-only run), not both")
    missing = [f"--{k}" for k in ("weights", "data", "name") if getattr(args, k) is None]
    if missing:
        raise CnncamError(f"an export-only run needs {', '.join(missing)} (and --classes)")
    sugar = [f"model.name={args.model}", f"model.weights={args.weights}", f"name={args.name}"]
    sugar += data_overrides(args.data)
    # Explicit --set keys win over the flags, as everywhere.
    full = sugar + overrides
    cfg = load_config(args.config, full)
    return create_export_run(cfg, args.classes, explicit_keys(args.config, overrides))


def _submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from cnncam.launch import workflows as W
    from cnncam.launch.executors import Launcher
    from cnncam.launch.params import resolve_executor

    cfg = _config(args)
    executor, why = resolve_executor(cfg.slurm.executor, args.dry_run)
    print(f"executor: {executor} ({why})")
    launcher = Launcher(
        executor, cfg.run_dir, cfg.name, cfg.slurm, dry_run=args.dry_run, command=f"{PROG} {shlex.join(argv)}"
    )
    shards = getattr(args, "shards", None)
    try:
        if args.command == "train":
            W.launch_train(launcher, cfg)
        elif args.command == "cam":
            W.launch_cam(launcher, cfg, shards, args.shard, args.retry_failed)
        elif args.command == "merge":
            W.launch_merge(launcher, cfg, shards)
        elif args.command == "report":
            W.launch_report(launcher, cfg, args.cams, args.out)
        elif args.command == "pipeline":
            W.launch_pipeline(launcher, cfg, shards, args.sanity, args.sanity_data)
        elif args.command == "sanity":
            W.launch_sanity(launcher, cfg, args.permuted)
        else:
            W.launch_probe(
                launcher,
                cfg.run_dir / "probe",
                args.steps,
                args.step_s,
                shards,
                args.retry_failed,
                args.allreduce,
                args.fail,
            )
    finally:  # also when a later job of a chain is refused: say what was queued already
        _print_submitted(launcher, args.run if getattr(args, "run", None) else str(cfg.run_dir))
    if args.command in ("report", "pipeline") and not args.dry_run:
        out = Path(args.out) if getattr(args, "out", None) else RunPaths(cfg.run_dir).report
        done = launcher.backend.in_process
        print(f"report: {out / 'index.html'}" + ("" if done else " (written when the job finishes)"))
    return 0


def _print_submitted(launcher: Launcher, run: str) -> None:
    if not launcher.submitted:
        return
    if launcher.dry_run:
        print(f"dry run: nothing submitted ({len(launcher.submitted)} job(s) shown)")
        return
    for rec in launcher.submitted:
        if launcher.backend.in_process:
            print(f"{rec.kind}: ran {rec.executor}, {rec.state}")
            continue
        what = f"array {rec.job_id} ({len(rec.tasks)} tasks)" if len(rec.tasks) > 1 else f"job {rec.job_id}"
        after = f", after {', '.join(rec.after)}" if rec.after else ""
        shards = f", shards {rec.shards}" if rec.shards else ""
        print(f"submitted {rec.kind}: {what}{shards}{after}")
    if launcher.snapshot is not None:
        snap = launcher.snapshot
        dirty = " + uncommitted changes (dirty.diff)" if snap.git.get("dirty") else ""
        commit = f"git {str(snap.git['commit'])[:12]}{dirty}, " if snap.git.get("commit") else ""
        print(f"code: jobs import cnncam from {snap.root} ({commit}{snap.files} files)")
    if not launcher.backend.in_process:
        q = shlex.quote(run)
        print(
            f"recorded in {launcher.paths.jobs}; follow with:\n"
            f"  {PROG} status --run {q}\n  {PROG} logs --run {q} --follow\n  {PROG} cancel --run {q}"
        )


def _status(args: argparse.Namespace) -> int:
    from cnncam.launch.jobs import format_status, job_status, require_records

    paths = RunPaths(run_folder(args.run))
    print(format_status(job_status(require_records(paths), paths=paths)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from cnncam.launch.jobs import find_task, follow_logs, job_status, log_paths, require_records

    paths = RunPaths(run_folder(args.run))
    rec, task_id = find_task(require_records(paths), args.job, args.task)
    logs = log_paths(paths, rec, task_id, args.rank)  # refuses inline jobs: they have no logs
    if args.follow:

        def is_done() -> bool:
            rows = [r for r in job_status([rec], paths=paths) if r.job_id == task_id]
            return all(r.done for r in rows)

        follow_logs(paths, rec, task_id, args.rank, lambda s: print(s, end="", flush=True), is_done)
        return 0
    for path in logs:
        print(f"==> {path} <==")
        print(path.read_text(errors="replace") if path.exists() else "(not written yet)")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from cnncam.launch.jobs import cancel_jobs

    ids = cancel_jobs(RunPaths(run_folder(args.run)))
    print(f"cancelled: {', '.join(ids)}" if ids else "nothing to cancel: every job has finished")
    return 0


# errno -> what to do; the message always names the file (issue 9: no raw traceback for these).
_OS_ADVICE = {
    errno.EACCES: "check its permissions, or choose another folder (--set runs_dir=..., --out ...)",
    errno.EPERM: "check its permissions, or choose another folder (--set runs_dir=..., --out ...)",
    errno.EROFS: "that file system is read-only; choose a writable folder",
    errno.ENOSPC: "free some space and run the same command again (finished work is kept and resumed)",
    errno.EDQUOT: "your disk quota is exceeded; free some space and run the same command again",
    errno.ENOENT: "it does not exist (any more); check the path",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.EISDIR: "it is a folder where a file was expected",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EIO: "the disk or network file system failed; check it and run the command again",
}


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: what happened, to which file, what to do."""
    what = (e.strerror or str(e)).strip().rstrip(".")
    what = what[:1].lower() + what[1:]
    where = f": {e.filename}" if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    advice = _OS_ADVICE.get(e.errno or 0)
    return f"{what}{where}" + (f"; {advice}" if advice else "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["synth"]:
            from cnncam.data.synthetic import main as synth_main

            return synth_main(argv[1:])
        args = build_parser().parse_args(argv)
        handlers = {"status": _status, "logs": _logs, "cancel": _cancel}
        if args.command in handlers:
            return handlers[args.command](args)
        return _submit(args, argv)
    except CnncamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if os.environ.get("CNNCAM_TRACEBACK"):
            raise
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
