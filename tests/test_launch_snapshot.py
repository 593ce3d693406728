"""Code snapshots: jobs import the package as it was at submission (issue 12, point 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnncam.errors import LaunchError
from cnncam.launch.snapshot import DIFF, MANIFEST, source_root, take_snapshot


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A tiny git checkout holding a fake ``cnncam`` package."""
    repo = tmp_path / "src"
    (repo / "cnncam" / "sub").mkdir(parents=True)
    (repo / "cnncam" / "__init__.py").write_text("VERSION = 'one'\n")
    (repo / "cnncam" / "sub" / "mod.py").write_text("X = 1\n")
    (repo / "README.md").write_text("not package source\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return repo


def _import_version(snapshot_root: Path, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(snapshot_root)}
    out = subprocess.run(
        [sys.executable, "-c", "import cnncam; print(cnncam.VERSION, cnncam.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(out[1]).is_relative_to(snapshot_root)
    return out[0]


def test_snapshot_holds_tracked_package_files_and_survives_later_edits(
    checkout: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    (checkout / ".gitignore").write_text("*.pyc\n")
    (checkout / "cnncam" / "new.py").write_text("Y = 1\n")  # not git-added yet: still needed
    (checkout / "cnncam" / "stale.pyc").write_bytes(b"\0")  # ignored: stays out
    snap = take_snapshot(run, checkout)
    files = sorted(p.relative_to(snap.root).as_posix() for p in snap.root.rglob("*") if p.is_file())
    assert files == ["cnncam/__init__.py", "cnncam/new.py", "cnncam/sub/mod.py", MANIFEST]
    manifest = json.loads((snap.root / MANIFEST).read_text())
    # new.py is not committed: the tree is dirty, though the diff of tracked files is empty.
    assert manifest["git"]["dirty"] is True and len(manifest["git"]["commit"]) == 40
    assert snap.provenance(run)["snapshot"] == f"code/{snap.digest[:16]}"
    # The checkout changes after submission; the job still imports the submitted code.
    (checkout / "cnncam" / "__init__.py").write_text("VERSION = 'two'\n")
    assert _import_version(snap.root, tmp_path) == "one"


def test_same_content_reuses_the_snapshot_changed_content_makes_a_new_one(
    checkout: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    a = take_snapshot(run, checkout)
    b = take_snapshot(run, checkout)
    assert a == b and a.git["dirty"] is False
    (checkout / "cnncam" / "sub" / "mod.py").write_text("X = 2\n")
    c = take_snapshot(run, checkout)
    assert c.digest != a.digest and c.root != a.root
    assert sorted(p.name for p in (run / "code").iterdir()) == sorted([a.root.name, c.root.name])


def test_dirty_checkout_records_the_diff_in_provenance(checkout: Path, tmp_path: Path) -> None:
    (checkout / "cnncam" / "sub" / "mod.py").write_text("X = 42  # local edit\n")
    run = tmp_path / "run"
    snap = take_snapshot(run, checkout)
    prov = snap.provenance(run)
    assert prov["dirty"] is True
    assert prov["diff"] == f"code/{snap.digest[:16]}/{DIFF}"
    diff = (run / prov["diff"]).read_text()
    assert "+X = 42  # local edit" in diff and "-X = 1" in diff


def test_installed_package_without_git_is_snapshotted_from_its_folder(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "cnncam" / "__pycache__").mkdir(parents=True)
    (site / "cnncam" / "__init__.py").write_text("VERSION = 'site'\n")
    (site / "cnncam" / "py.typed").write_text("")
    (site / "cnncam" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    snap = take_snapshot(tmp_path / "run", site)
    assert snap.git == {"commit": None, "dirty": None}
    assert sorted(p.name for p in (snap.root / "cnncam").iterdir()) == ["__init__.py", "py.typed"]
    assert _import_version(snap.root, tmp_path) == "site"


def test_a_folder_without_the_package_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaunchError, match=r"no cnncam/__init__.py"):
        take_snapshot(tmp_path / "run", tmp_path / "empty")


def test_half_written_snapshot_is_never_used(checkout: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    snap = take_snapshot(run, checkout)
    (snap.root / MANIFEST).unlink()  # as if killed before the publish
    again = take_snapshot(run, checkout)  # re-created, not trusted half-way
    assert (again.root / MANIFEST).is_file() and again.digest == snap.digest


def test_the_real_package_runs_from_its_snapshot(tmp_path: Path) -> None:
    snap = take_snapshot(tmp_path / "run", source_root())
    assert snap.files > 40
    env = {**os.environ, "PYTHONPATH": str(snap.root)}
    code = "from cnncam.launch.snapshot import running_snapshot as r; print(r()['digest'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == snap.digest
