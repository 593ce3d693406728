"""Splitting images reproducibly (stratified, seeded per class) and saving/loading the split.

Moved out of :mod:`cnncam.data.dataset` (discovery and the Dataset) to keep it short; the
public names are re-exported by :mod:`cnncam.data`.  A saved split is ``classes.json``,
``splits/{train,val,test}.csv`` and ``skipped.json`` in the run directory.
"""

from __future__ import annotations

import csv
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncam.config import SplitConfig
from cnncam.errors import DataError
from cnncam.runs import RunPaths, atomic_write_json, atomic_write_text, read_classes, read_json

Sample = tuple[str, int]  # (path relative to data root, POSIX separators; label)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetIndex:
    """What discovery found: classes (index = label id), the three splits, skipped files."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[dict[str, str]] = field(default_factory=list)

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


def save_index(index: DatasetIndex, paths: RunPaths) -> None:
    """Write classes.json, splits/{train,val,test}.csv (header ``path,label``) and skipped.json."""
    atomic_write_json(paths.classes, list(index.classes))
    for split in SPLITS:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(index.splits.get(split, []))
        atomic_write_text(paths.split_file(split), buf.getvalue())
    atomic_write_json(paths.skipped, list(index.skipped))


def load_index(paths: RunPaths, root: Path) -> DatasetIndex:
    """Read back what :func:`save_index` wrote: the exact same split, without re-scanning."""
    classes = read_classes(paths)
    splits = {split: _read_split(paths.split_file(split), len(classes)) for split in SPLITS}
    skipped = read_json(paths.skipped) if paths.skipped.is_file() else []
    return DatasetIndex(root=Path(root), classes=classes, splits=splits, skipped=skipped)


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
