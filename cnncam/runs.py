"""The run directory: the contract between training, CAM export, report and launcher.

::

    runs/<name>/
      config.yaml           resolved config (every default filled in)
      classes.json          class names, index order = label ids
      provenance.json       git commit + dirty flag, package versions, host, seed, start time
      splits/{train,val,test}.csv   the file lists (path relative to data.root, label)
      splits/hashes.csv     content hash of every listed image (finds duplicates across splits)
      splits/duplicates.json        byte-identical images found in more than one split
      splits/manifest.json  sha256 of the split's files: written last, so a split is complete
      skipped.json          images that could not be decoded, with the reason
      norm_stats.json       mean/std computed on the train split (data.normalize=dataset)
      metrics.jsonl         one JSON object per logged iteration and per epoch
      checkpoints/last.pt, checkpoints/best.pt
      predictions.csv, confusion_matrix.json    final test evaluation
      cams/                 HDF5 part files and the merged cams.h5
      report/index.html     offline report
      jobs.json, slurm/     submitted jobs, their logs and state files
      .lock, .lock.holders/ the run lock and who holds it (cnncam.runlock)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from cnncam.config import RunConfig, dump_yaml, load_config
from cnncam.errors import CnncamError


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split_file(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    @property
    def split_hashes(self) -> Path:
        return self.splits / "hashes.csv"

    @property
    def split_duplicates(self) -> Path:
        return self.splits / "duplicates.json"

    @property
    def split_manifest(self) -> Path:
        return self.splits / "manifest.json"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.json"

    @property
    def norm_stats(self) -> Path:
        return self.root / "norm_stats.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def confusion(self) -> Path:
        return self.root / "confusion_matrix.json"

    @property
    def cams(self) -> Path:
        return self.root / "cams"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"


def cams_dir(cfg: RunConfig) -> Path:
    """Where CAM part files and ``cams.h5`` go: ``cam.out``, else ``runs/<name>/cams``."""
    return Path(cfg.cam.out) if cfg.cam.out else RunPaths(cfg.run_dir).cams


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_sha256(f: BinaryIO) -> str:
    """Hex SHA-256 of an open file's bytes from its current position (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (checkpoints, weights, split files), streamed."""
    with open(path, "rb") as f:
        return file_sha256(f)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a torn one
    (timm's checkpoint saver does the same).  The file gets the mode a plain ``open`` would
    give (0666 less the umask): ``mkstemp`` creates 0600, which hid ``index.html`` and
    ``config.yaml`` from colleagues who could read the PNGs next to them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CnncamError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CnncamError(f"{path} is not valid JSON: {e}") from None


def write_config(paths: RunPaths, cfg: RunConfig) -> None:
    atomic_write_text(paths.config, dump_yaml(cfg))


def run_folder(run_dir: str | Path) -> Path:
    """The run folder a user named; ``.`` or ``..`` are resolved, since they name no run."""
    run = Path(run_dir)
    return run.resolve() if run.name in ("", ".", "..") else run


def require_run_folder(run_dir: str | Path) -> RunPaths:
    """The paths of an existing folder (a typo must not read as "no jobs recorded")."""
    run = run_folder(run_dir)
    if not run.is_dir():
        what = "is not a folder" if run.exists() else "does not exist"
        raise CnncamError(f"run folder {run_dir} {what}")
    return RunPaths(run)


def load_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, RunPaths]:
    """The resolved config of an existing run (plus optional overrides) and its paths.

    The folder given wins over ``runs_dir``/``name`` saved in its ``config.yaml``: a copied or
    moved run reads its own files, never the original's.
    """
    paths = require_run_folder(run_dir)
    if not paths.config.is_file():
        raise CnncamError(f"{run_dir} is not a cnncam run directory (no config.yaml); train first")
    where = [f"runs_dir={paths.root.parent}", f"name={paths.root.name}"]
    return load_config(paths.config, [*where, *overrides]), paths


def read_classes(paths: RunPaths) -> list[str]:
    classes = read_json(paths.classes)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CnncamError(f"{paths.classes} must hold a JSON list of class names")
    return classes


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs: recorded in its code snapshot when this
    process imports cnncam from one (a job), else read from the cnncam checkout, if it is one."""
    if cwd is None:
        from cnncam.launch.snapshot import running_snapshot

        snap = running_snapshot()
        git = snap.get("git") if snap is not None else None
        if isinstance(git, dict):
            return {"commit": git.get("commit"), "dirty": git.get("dirty")}
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    names = ["cnncam", "torch", "torchvision", "numpy", "h5py", "submitit", "matplotlib", "rich", "pillow"]
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def slurm_ids() -> dict[str, str]:
    keys = [
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_RESTART_COUNT",
        "SLURM_JOB_NODELIST",
    ]
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def provenance(seed: int, run_dir: Path | None = None) -> dict[str, Any]:
    """``run_dir`` given: the code's snapshot or uncommitted diff is recorded too (``git.diff``)."""
    from cnncam.launch.snapshot import code_provenance

    return {
        "git": code_provenance(run_dir) if run_dir is not None else git_info(),
        "versions": package_versions(),
        "host": socket.gethostname(),
        "seed": seed,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm": slurm_ids(),
    }


def write_provenance(paths: RunPaths, seed: int, resumed: bool) -> None:
    """provenance.json at the first start; later starts append to its ``restarts`` list."""
    info = provenance(seed, paths.root)
    if resumed and paths.provenance.exists():
        prev = read_json(paths.provenance)
        prev.setdefault("restarts", []).append(
            {"time": info["start_time"], "host": info["host"], "slurm": info["slurm"], "git": info["git"]}
        )
        info = prev
    atomic_write_json(paths.provenance, info)


class MetricsLog:
    """Append-only ``metrics.jsonl``.

    Lines are flushed as they are written so ``tail -f`` and the report see them live.
    After a resume, :meth:`truncate_after` drops lines logged after the checkpoint was
    taken (they will be logged again), so curves never show a step twice.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl; a torn last line (job killed mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
