"""Splitting images reproducibly (stratified, seeded per class) and saving/loading the split.

Moved out of :mod:`cnncam.data.dataset` (discovery and the Dataset) to keep it short; the
public names are re-exported by :mod:`cnncam.data`.  A saved split is ``classes.json``,
``skipped.json``, ``splits/{train,val,test}.csv``, ``splits/hashes.csv`` and
``splits/duplicates.json`` in the run directory.

Kill-safety as a set: each file is replaced atomically, but a kill between two of them once left
``train.csv`` without ``val.csv`` and a run that failed on every requeue.  So the set counts only
once ``splits/manifest.json`` (the sha256 of each file) is written, last; :func:`split_state`
tells a complete split from a partial one, which the next start simply writes again (discovery
is deterministic).
"""

from __future__ import annotations

import csv
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cnncam.config import SplitConfig
from cnncam.errors import CnncamError, DataError
from cnncam.runs import RunPaths, atomic_write_json, atomic_write_text, path_sha256, read_classes, read_json

Sample = tuple[str, int]  # (path relative to data root, POSIX separators; label)
FileHash = tuple[int, int, str]  # (size, mtime_ns, blake2b-128 hex digest) of one image file
SPLITS = ("train", "val", "test")
SplitState = Literal["complete", "legacy", "partial", "changed", "none"]


@dataclass(frozen=True)
class DatasetIndex:
    """What discovery found: classes (index = label id), the three splits, skipped files."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    hashes: dict[str, FileHash] = field(default_factory=dict)  # content hash per listed image
    duplicates: list[list[str]] = field(default_factory=list)  # identical files across splits

    def class_counts(self, split: str) -> list[int]:
        """Images per class in ``split``, indexed by label."""
        counts = [0] * len(self.classes)
        for _, label in self.splits.get(split, []):
            counts[label] += 1
        return counts


def split_counts(n: int, ratios: tuple[float, float, float] | SplitConfig) -> tuple[int, int, int]:
    """(train, val, test) sizes for ``n`` images: val and test rounded half up, train the rest."""
    if isinstance(ratios, SplitConfig):
        ratios = (ratios.train, ratios.val, ratios.test)
    n_val = int(np.floor(n * ratios[1] + 0.5))
    n_test = min(int(np.floor(n * ratios[2] + 0.5)), n - n_val)
    return n - n_val - n_test, n_val, n_test


def _split_single(
    per_class: dict[str, list[str]], classes: list[str], ratios: SplitConfig, seed: int
) -> dict[str, list[Sample]]:
    """Stratified split: shuffle each class with its own seeded generator, then cut by counts."""
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for label, cls in enumerate(classes):
        files = per_class[cls]
        counts = split_counts(len(files), ratios)
        if counts[0] == 0:
            raise DataError(
                f"data.split {ratios.train}/{ratios.val}/{ratios.test} leaves class {cls!r} "
                f"({len(files)} images) with no training image; add images or lower val/test"
            )
        # Seeded by the class *name*: adding a class does not reshuffle the others.
        order = np.random.default_rng([seed % 2**64, zlib.crc32(cls.encode())]).permutation(len(files))
        bounds = np.cumsum(counts)
        for pos, i in enumerate(order):
            split = SPLITS[int(np.searchsorted(bounds, pos, side="right"))]
            splits[split].append((files[i], label))
    # Grouped by label, then path: the same order presplit folders give.
    return {s: sorted(samples, key=lambda x: (x[1], x[0])) for s, samples in splits.items()}


# ----------------------------------------------------------------------------------------------
# Saving and loading the split


def _set_files(paths: RunPaths) -> dict[str, Path]:
    """The files of a saved split, by their name in the manifest."""
    files = {"classes.json": paths.classes, "skipped.json": paths.skipped}
    files.update({f"splits/{s}.csv": paths.split_file(s) for s in SPLITS})
    files.update({"splits/hashes.csv": paths.split_hashes, "splits/duplicates.json": paths.split_duplicates})
    return files


def save_index(index: DatasetIndex, paths: RunPaths) -> None:
    """Write the split's files, then the manifest that makes them a complete set."""
    # Unmark first: from here until the manifest is back, a kill leaves a split to write again.
    paths.split_manifest.unlink(missing_ok=True)
    paths.norm_stats.unlink(missing_ok=True)  # statistics of an earlier split
    atomic_write_json(paths.classes, list(index.classes))
    atomic_write_json(paths.skipped, list(index.skipped))
    for split in SPLITS:
        atomic_write_text(paths.split_file(split), _csv(["path", "label"], index.splits.get(split, [])))
    rows = [(rel, *index.hashes[rel]) for rel in sorted(index.hashes)]
    atomic_write_text(paths.split_hashes, _csv(["path", "size", "mtime_ns", "blake2b"], rows))
    atomic_write_json(paths.split_duplicates, list(index.duplicates))
    digests = {name: path_sha256(path) for name, path in _set_files(paths).items()}
    atomic_write_json(paths.split_manifest, {"version": 1, "sha256": digests})


def _csv(header: list[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def split_state(paths: RunPaths) -> tuple[SplitState, str]:
    """Whether the run's saved split is usable, and why not.

    ``complete``: the manifest matches every file.  ``legacy``: no manifest, but the files of a
    split written before manifests existed, and a checkpoint trained on it.  ``partial``: a
    start was killed while writing it.  ``changed``: files differ from the manifest.
    ``none``: nothing saved yet.
    """
    files = _set_files(paths)
    if not paths.split_manifest.is_file():
        needed = [paths.classes, *(paths.split_file(s) for s in SPLITS)]
        if all(p.is_file() for p in needed) and paths.last_ckpt.is_file():
            return "legacy", ""
        present = [p for p in files.values() if p.exists()]
        return ("partial", f"{len(present)} of its files, no manifest") if present else ("none", "")
    try:
        recorded = read_json(paths.split_manifest)["sha256"]
        for name, path in files.items():
            if not path.is_file():
                return "changed", f"{path} is missing"
            if recorded.get(name) != path_sha256(path):
                return "changed", f"{path} differs from what {paths.split_manifest} records"
    except (CnncamError, KeyError, TypeError, AttributeError):
        return "changed", f"{paths.split_manifest} is not a split manifest"
    return "complete", ""


def load_index(paths: RunPaths, root: Path) -> DatasetIndex:
    """Read back what :func:`save_index` wrote: the exact same split, without re-scanning."""
    state, why = split_state(paths)
    if state == "changed":
        raise DataError(f"the saved split of run {paths.root} was changed after training wrote it: {why}")
    classes = read_classes(paths)
    splits = {split: _read_split(paths.split_file(split), len(classes)) for split in SPLITS}
    skipped = read_json(paths.skipped) if paths.skipped.is_file() else []
    hashes = read_hashes(paths)
    dupes = read_json(paths.split_duplicates) if paths.split_duplicates.is_file() else []
    return DatasetIndex(Path(root), classes, splits, skipped, hashes, dupes)


def read_hashes(paths: RunPaths) -> dict[str, FileHash]:
    """``splits/hashes.csv`` (a cache for the next scan); what does not parse is left out."""
    if not paths.split_hashes.is_file():
        return {}
    out = {}
    with paths.split_hashes.open(newline="", encoding="utf-8") as f:
        for row in list(csv.reader(f))[1:]:
            if len(row) == 4 and row[1].isdigit() and row[2].isdigit():
                out[row[0]] = (int(row[1]), int(row[2]), row[3])
    return out


def _read_split(path: Path, num_classes: int) -> list[Sample]:
    if not path.is_file():
        raise DataError(f"{path} is missing: this run has no saved split (run training first)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["path", "label"]:
        raise DataError(f"{path} must start with the header 'path,label'")
    samples = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].isdigit() or int(row[1]) >= num_classes:
            raise DataError(f"{path} line {n}: expected '<path>,<label 0..{num_classes - 1}>', got {row}")
        samples.append((row[0], int(row[1])))
    return samples
