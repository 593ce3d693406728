"""Walking class folders and hashing their files, for :func:`cnncam.data.dataset.discover`.

Symlinks are followed (datasets are often linked into place) except those that point back into
the data folder, and every real file or folder is listed once, however many links lead to it:
a loop ``square/loop -> .`` once turned 17 files into 697 samples, each in train *and* test.
A cheap content hash of every listed image (blake2b-128, cached in the run as
``splits/hashes.csv`` by size and mtime) finds byte-identical files in more than one split.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from cnncam.data.splits import SPLITS, FileHash, Sample


class DuplicateImageWarning(UserWarning):
    """Byte-identical files sit in more than one split (a test image is also a training image)."""


class LinkWarning(UserWarning):
    """Symlinks into the data folder itself were not followed, or files were reached twice."""


class FolderWalk:
    """Walks class folders: follows symlinks, except those pointing back into the data folder,
    and lists every real file (and folder) once, however many links lead to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.dirs: set[tuple[int, int]] = set()
        self.files: set[tuple[int, int]] = set()
        self.inward: list[str] = []  # links into the data folder: not followed
        self.repeats: list[str] = []  # second paths to a file or folder already listed

    def images(self, folder: Path, exts: set[str]) -> list[str]:
        files = []
        # followlinks like torchvision's ImageFolder: datasets are often symlinked into place.
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            if not self._first_visit(Path(dirpath)):
                dirnames[:] = []
                continue
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and self._follow(Path(dirpath, d))
            )
            for name in sorted(filenames):
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                path = Path(dirpath, name)
                rel = path.relative_to(self.root).as_posix()
                if path.is_symlink() and self.points_inside(path):
                    self.inward.append(rel)
                elif self._first(path, self.files, rel):
                    files.append(rel)
        return sorted(files)

    def _first_visit(self, folder: Path) -> bool:
        return self._first(folder, self.dirs, folder.relative_to(self.root).as_posix())

    def _first(self, path: Path, seen: set[tuple[int, int]], rel: str) -> bool:
        try:
            st = path.stat()
        except OSError:  # a dangling link: nothing to list (a broken image is _check_images' job)
            return seen is self.files
        key = (st.st_dev, st.st_ino)
        if key in seen:
            self.repeats.append(rel)
            return False
        seen.add(key)
        return True

    def _follow(self, folder: Path) -> bool:
        if folder.is_symlink() and self.points_inside(folder):
            self.inward.append(folder.relative_to(self.root).as_posix())
            return False
        return True

    def points_inside(self, link: Path) -> bool:
        target = link.resolve()
        return target == self.real_root or self.real_root in target.parents

    def warn(self) -> None:
        parts = []
        if self.inward:
            more = f" and {len(self.inward) - 10} more" if len(self.inward) > 10 else ""
            parts.append(
                f"symlinks back into the folder were not followed: {', '.join(self.inward[:10])}{more}"
            )
        if self.repeats:
            shown = ", ".join(self.repeats[:10])
            parts.append(
                f"{len(self.repeats)} path(s) led to a file or folder already listed ({shown}); listed once"
            )
        if parts:
            warnings.warn(f"data.root {self.root}: " + "; ".join(parts), LinkWarning, stacklevel=3)


def content_hash(path: Path, cached: FileHash | None) -> FileHash:
    """(size, mtime_ns, blake2b-128 of the bytes); the cached value when size and mtime match."""
    st = path.stat()
    if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return st.st_size, st.st_mtime_ns, h.hexdigest()


def cross_split_duplicates(splits: dict[str, list[Sample]], hashes: dict[str, FileHash]) -> list[list[str]]:
    """Groups of byte-identical files that sit in more than one split (warned about)."""
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        for rel, _ in splits.get(split, []):
            if rel in hashes:
                by_digest.setdefault(hashes[rel][2], []).append((split, rel))
    groups = [sorted(rel for _, rel in g) for g in by_digest.values() if len({s for s, _ in g}) > 1]
    groups.sort()
    if groups:
        shown = "; ".join(" = ".join(g) for g in groups[:10])
        more = f"; and {len(groups) - 10} more groups" if len(groups) > 10 else ""
        warnings.warn(
            f"{len(groups)} group(s) of byte-identical images are in more than one split, so test or "
            f"validation images are also training images (listed in splits/duplicates.json): {shown}{more}",
            DuplicateImageWarning,
            stacklevel=3,
        )
    return groups
