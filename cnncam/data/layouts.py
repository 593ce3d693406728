"""Data layouts besides class folders (``data.format``): CSV manifests and WebDataset tar shards.

``csv``: ``data.manifest`` (relative to ``data.root``, or absolute) with a header and the columns
``path,label`` and optionally ``split`` (train/val/test)::

    path,label,split
    images/p001.png,tb,train
    images/p002.png,normal,test

Image paths are relative to the CSV's folder (or absolute); labels are class names (the classes
are then the sorted names, as class folders give) or ids ``0..K-1``.  Without a ``split`` column
the images are split stratified and seeded exactly like a single class folder (same function),
so the same images in a folder and in a manifest give the same split.

``webdataset``: ``root/*.tar`` shards (or ``root/{train,val,test}/*.tar``), see
:mod:`cnncam.data.webdataset`; split like a single folder otherwise.

Every image is decoded once at discovery, like class folders: unreadable ones are listed in
``skipped.json`` with the reason.  :func:`discover_all` is the export-only variant: every
image of ``data.root`` with a given class list, in the ``cam.split`` split (or the manifest's).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from cnncam.config import DataConfig
from cnncam.data.dataset import _check_images, _require_training_images, _warn_skipped
from cnncam.data.splits import SPLITS, DatasetIndex, Sample, _split_single
from cnncam.data.walk import FolderWalk, cross_split_duplicates
from cnncam.data.webdataset import find_shards, list_shard
from cnncam.errors import DataError

# (sample path, label text, split or "" when the data does not say)
Row = tuple[str, str, str]


def discover_layout(cfg: DataConfig, seed: int) -> DatasetIndex:
    """Discovery for ``data.format`` ``csv`` and ``webdataset`` (training: classes from the labels)."""
    root = _root(cfg)
    rows, bad = _rows(cfg, root)
    classes = _classes_from_labels([label for _, label, _ in rows], cfg)
    return _index(cfg, root, rows, bad, classes, seed, default_split=None)


def discover_all(cfg: DataConfig, classes: Sequence[str], split: str) -> DatasetIndex:
    """Export-only discovery: every image of ``data.root`` (any format) labelled with ``classes``.

    Images go to ``split`` unless the data says otherwise (a manifest's ``split`` column,
    ``train/val/test`` sub-folders of tar shards).  Class folders must be names in ``classes``.
    """
    root = _root(cfg)
    if cfg.format == "folder":
        exts = _exts(cfg)
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [f for f in folders if f not in classes]
        if not folders or unknown:
            raise DataError(
                f"{root}: class folders {unknown or 'none'} are not in the class list "
                f"({', '.join(classes)}); expected {root}/<class>/<image>"
            )
        walk = FolderWalk(root)
        rows: list[Row] = [(rel, c, "") for c in folders for rel in walk.images(root / c, exts)]
        walk.warn()
        bad: dict[str, str] = {}
    else:
        rows, bad = _rows(cfg, root)
    return _index(cfg, root, rows, bad, list(classes), 0, default_split=split)


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.root {str(root)!r} {what}")
    return root


def _exts(cfg: DataConfig) -> set[str]:
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions}


def _rows(cfg: DataConfig, root: Path) -> tuple[list[Row], dict[str, str]]:
    if cfg.format == "csv":
        return read_manifest(root, cfg.manifest), {}
    if cfg.format == "webdataset":
        return _webdataset_rows(root, {e.lstrip(".") for e in _exts(cfg)})
    raise DataError(f"data.format {cfg.format!r} has no rows here")  # folders go through dataset.py


def read_manifest(root: Path, manifest: str) -> list[Row]:
    """(path relative to ``root``, label, split) for every row of the manifest."""
    path = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    if not path.is_file():
        raise DataError(f"data.manifest {str(path)!r} does not exist (data.format=csv)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(columns):
            raise DataError(f"{path} must have a header with the columns path,label[,split]; found {columns}")
        reader.fieldnames = columns
        rows: list[Row] = []
        seen: dict[str, int] = {}
        for line, rec in enumerate(reader, start=2):
            image, label, split = (rec.get("path") or "").strip(), (rec.get("label") or "").strip(), ""
            if "split" in columns:
                split = (rec.get("split") or "").strip()
                if split not in SPLITS:
                    raise DataError(f"{path} line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
            if not image or not label:
                raise DataError(f"{path} line {line}: path and label must not be empty, got {dict(rec)}")
            # Relative to the CSV's folder; stored relative to data.root (absolute paths stay absolute).
            full = os.path.normpath(path.parent / image)
            rel = Path(os.path.relpath(full, root)).as_posix() if not Path(image).is_absolute() else image
            if rel in seen:
                raise DataError(f"{path} line {line}: {image!r} is listed twice (first on line {seen[rel]})")
            seen[rel] = line
            rows.append((rel, label, split))
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows


def _webdataset_rows(root: Path, image_exts: set[str]) -> tuple[list[Row], dict[str, str]]:
    presplit = (root / "train").is_dir()
    folders = [(root / s, s) for s in SPLITS if (root / s).is_dir()] if presplit else [(root, "")]
    rows: list[Row] = []
    bad: dict[str, str] = {}
    for folder, split in folders:
        shards = find_shards(folder)
        if not shards:
            raise DataError(f"no *.tar shards in {folder} (data.format=webdataset)")
        for tar in shards:
            labels, skipped = list_shard(root, tar, image_exts)
            rows += [(sample, label, split) for sample, label in labels.items()]
            bad.update(skipped)
    return rows, bad


def _classes_from_labels(labels: list[str], cfg: DataConfig) -> list[str]:
    """Sorted names (like class folders), or ``"0".."K-1"`` when every label is an id."""
    distinct = set(labels)
    if all(v.isdigit() for v in distinct):
        return [str(i) for i in range(max(int(v) for v in distinct) + 1)]
    return sorted(distinct)


def _label_id(label: str, classes: Sequence[str], where: str) -> int:
    if label in classes:
        return list(classes).index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    raise DataError(
        f"{where}: label {label!r} is neither a class name nor an id 0..{len(classes) - 1} "
        f"(classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''})"
    )


def _index(
    cfg: DataConfig,
    root: Path,
    rows: list[Row],
    bad: dict[str, str],
    classes: list[str],
    seed: int,
    default_split: str | None,
) -> DatasetIndex:
    """Decode every image once, then split: as the data says, into ``default_split``, or stratified."""
    if len(classes) < 2 and default_split is None:
        raise DataError(f"{root} holds a single class ({classes}); classification needs at least 2 classes")
    refused, hashes = _check_images(
        root, [r[0] for r in rows], cfg.max_image_pixels, {}, hash_files=cfg.format != "webdataset"
    )
    bad.update(refused)
    skipped = [{"path": rel, "reason": bad[rel]} for rel in sorted(bad)]
    if skipped:
        _warn_skipped(root, skipped)
    good = [
        (rel, _label_id(label, classes, f"{root}/{rel}"), split)
        for rel, label, split in rows
        if rel not in bad
    ]
    given = any(split for _, _, split in good)
    if given or default_split is not None:
        splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
        for rel, label, split in good:
            splits[split or default_split or "train"].append((rel, label))
        splits = {s: sorted(v, key=lambda x: (x[1], x[0])) for s, v in splits.items()}
        splits = _by_shard(cfg, splits)
        if default_split is None:
            per_class = {c: [r for r, lab in splits["train"] if lab == i] for i, c in enumerate(classes)}
            _require_training_images(root, per_class, bad, "")
    else:
        per_class = {c: sorted(rel for rel, lab, _ in good if lab == i) for i, c in enumerate(classes)}
        _require_training_images(root, per_class, bad, "")
        splits = _by_shard(cfg, _split_single(per_class, classes, cfg.split, seed))
    duplicates = cross_split_duplicates(splits, hashes)
    return DatasetIndex(root, classes, splits, skipped, hashes=hashes, duplicates=duplicates)


def _by_shard(cfg: DataConfig, splits: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """WebDataset val/test splits in path order (grouped by tar file), so the CAM export can give
    whole tar files to array tasks; train keeps the (label, path) order every layout uses."""
    if cfg.format != "webdataset":
        return splits
    return {s: v if s == "train" else sorted(v) for s, v in splits.items()}
