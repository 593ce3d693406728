"""Jobs run the code they were submitted with: a snapshot of the package source in the run folder.

A Slurm job imports ``cnncam`` when it *starts*, which may be days after ``sbatch``; a ``git pull``
in between would silently change what a 3-day training job runs, and a requeued job could even
resume with other code than it started with.  So, at submission, the package's source (the
files under ``cnncam/`` that git does not ignore, with their working-tree content, much as
submitit's ``RsyncSnapshot`` does for a whole checkout) is copied into ``<run>/code/<digest>/`` and every
job of that submission puts that folder first on its ``PYTHONPATH``.

Snapshots are content-addressed: resubmitting unchanged code reuses the folder.  Each holds a
``manifest.json`` (files, digest, the checkout's git commit and dirty flag) and, when the
checkout was dirty, ``dirty.diff`` (``git diff HEAD`` of the package), which provenance points to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnncam.errors import LaunchError

PACKAGE = "cnncam"
MANIFEST = "manifest.json"
DIFF = "dirty.diff"
# A package is a few hundred kB; anything far bigger means the file list went wrong.
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class CodeSnapshot:
    """A published snapshot: ``root`` goes first on the job's PYTHONPATH (it holds ``cnncam/``)."""

    root: Path
    digest: str
    files: int
    git: dict[str, Any]

    def provenance(self, run_dir: Path) -> dict[str, Any]:
        rel = os.path.relpath(self.root, run_dir)
        diff = f"{rel}/{DIFF}" if (self.root / DIFF).exists() else None
        return {"snapshot": rel, "digest": self.digest, "files": self.files, **self.git, "diff": diff}


def source_root() -> Path:
    """The folder that holds the running ``cnncam`` package (a checkout, or site-packages)."""
    return Path(__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.decode("utf-8", "surrogateescape")


def _is_checkout(root: Path) -> bool:
    top = _git(root, "rev-parse", "--show-toplevel")
    return top is not None and Path(top.strip()).resolve() == root.resolve()


def source_files(root: Path) -> list[str]:
    """Relative paths of the package's source files, sorted.

    In a git checkout: the files under ``cnncam/`` that git tracks or would track (a new module
    not yet ``git add``-ed is still code the job needs; ignored caches stay out); elsewhere (an
    installed package): every ``.py`` file and ``py.typed`` below the package folder.
    """
    if _is_checkout(root):
        listed = (
            _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", PACKAGE) or ""
        )
        files = [f for f in listed.split("\0") if f and (root / f).is_file()]
    else:
        pkg = root / PACKAGE
        files = [
            p.relative_to(root).as_posix()
            for p in pkg.rglob("*")
            if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
        ]
    if not any(f == f"{PACKAGE}/__init__.py" for f in files):
        raise LaunchError(f"cannot snapshot the code: no {PACKAGE}/__init__.py under {root}")
    return sorted(files)


def _digest(root: Path, files: list[str]) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    for rel in files:
        data = (root / rel).read_bytes()
        total += len(data)
        # Length-prefixed, so moving bytes between a name and a file cannot collide.
        for part in (rel.encode(), data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest(), total


def git_state(root: Path) -> tuple[dict[str, Any], str]:
    """``({"commit", "dirty"}, diff text)`` of the checkout's package; empty values outside git."""
    if not _is_checkout(root):
        return {"commit": None, "dirty": None}, ""
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    diff = _git(root, "diff", "HEAD", "--", PACKAGE) or ""
    # New, not yet added files make the tree dirty too (they are in the snapshot, not in the diff).
    status = _git(root, "status", "--porcelain", "--", PACKAGE) or ""
    return {"commit": commit, "dirty": bool(status.strip())}, diff


def take_snapshot(run_dir: Path, root: Path | None = None) -> CodeSnapshot:
    """Copy the package source into ``run_dir/code/<digest>/`` (once per distinct content)."""
    root = (root or source_root()).resolve()
    files = source_files(root)
    digest, size = _digest(root, files)
    if size > MAX_BYTES:
        raise LaunchError(f"the {PACKAGE} source under {root} is {size} bytes; refusing to snapshot it")
    dest = Path(run_dir) / "code" / digest[:16]
    if (dest / MANIFEST).is_file():  # published before: same content, reuse it
        return _read(dest)
    if dest.exists():  # published folders always hold a manifest: this one was damaged by hand
        shutil.rmtree(dest)
    git, diff = git_state(root)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
        if diff.strip():
            (tmp / DIFF).write_text(diff, encoding="utf-8", errors="surrogateescape")
        manifest = {"digest": digest, "files": files, "source": str(root), "git": git}
        # The manifest is written last: a folder without one is never used.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, dest)  # atomic publish; fails if another submission won the race
        except OSError:
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read(dest)


def _read(dest: Path) -> CodeSnapshot:
    try:
        m = json.loads((dest / MANIFEST).read_text())
        return CodeSnapshot(dest, str(m["digest"]), len(m["files"]), dict(m["git"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LaunchError(f"code snapshot {dest} is damaged ({e}); delete that folder and resubmit") from None


def running_snapshot() -> dict[str, Any] | None:
    """The manifest of the snapshot this process imports ``cnncam`` from, or None (a checkout)."""
    manifest = source_root() / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run folder when it lies inside it (the run may move), else absolute."""
    try:
        return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def code_provenance(run_dir: Path) -> dict[str, Any]:
    """The ``git`` entry of ``provenance.json``: which code this process runs.

    From a snapshot (a Slurm or local job): its folder and digest, and the commit, dirty flag and
    ``dirty.diff`` recorded when it was taken at submission.  From a checkout (inline runs,
    ``slurm.snapshot_code=false``): the commit and dirty flag now, and the uncommitted diff of the
    package saved as ``<run>/code/dirty-<hash>.diff`` so that the run says what it ran.
    """
    from cnncam.runs import atomic_write_text

    root = source_root()
    manifest = running_snapshot()
    if manifest is not None:
        recorded = manifest.get("git")
        git: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        diff = root / DIFF
        return {
            "commit": git.get("commit"),
            "dirty": git.get("dirty"),
            "snapshot": _relative(root, run_dir),
            "digest": manifest.get("digest"),
            "diff": _relative(diff, run_dir) if diff.is_file() else None,
        }
    git, diff_text = git_state(root)
    info: dict[str, Any] = {**git, "snapshot": None, "digest": None, "diff": None}
    if diff_text.strip():
        data = diff_text.encode("utf-8", "surrogateescape")
        path = Path(run_dir) / "code" / f"dirty-{hashlib.sha256(data).hexdigest()[:16]}.diff"
        if not path.is_file():
            atomic_write_text(path, data.decode("utf-8", "replace"))
        info["diff"] = _relative(path, run_dir)
    return info
