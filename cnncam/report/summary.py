"""Numbers for the run summary and the classification tables, from small run-directory files.

Everything here is cheap: the split CSVs and ``predictions.csv`` are streamed line by line, and
per-class metrics come from a (C, C) confusion matrix.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cnncam.config import RunConfig
from cnncam.data.splits import load_index
from cnncam.errors import CnncamError
from cnncam.report.items import OUTSIDE_ROOT
from cnncam.runs import RunPaths, read_json
from cnncam.storage import CamFile
from cnncam.storage.schema import split_sha256

log = logging.getLogger(__name__)


def class_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and support per class from a (C, C) [true, pred] confusion matrix.

    Returns ``{"classes": [{precision, recall, f1, support}...], "accuracy", "macro", "weighted"}``;
    a class never predicted (or never present) gets precision (recall) 0, like scikit-learn's
    ``zero_division=0``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    support, predicted = m.sum(axis=1), m.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = float(m.sum())
    weights = support / total if total else np.zeros_like(support)
    per = [
        {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for p, r, f, s in zip(precision, recall, f1, support)
    ]
    return {
        "classes": per,
        "accuracy": float(tp.sum() / total) if total else None,
        "macro": {
            k: float(np.mean(v)) if len(v) else 0.0
            for k, v in (("precision", precision), ("recall", recall), ("f1", f1))
        },
        "weighted": {
            k: float((v * weights).sum())
            for k, v in (("precision", precision), ("recall", recall), ("f1", f1))
        },
        "count": int(total),
    }


def confusion_from_predictions(path: Path, n_classes: int) -> np.ndarray:
    """(C, C) [true, pred] counts from ``predictions.csv`` (columns index,path,label,pred,...)."""
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"label", "pred"} <= set(reader.fieldnames):
            raise CnncamError(f"{path} must have 'label' and 'pred' columns, got {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            try:
                y, p = int(row["label"]), int(row["pred"])
            except (TypeError, ValueError):
                raise CnncamError(f"{path} line {n}: label/pred must be integers, got {row}") from None
            if not (0 <= y < n_classes and 0 <= p < n_classes):
                raise CnncamError(f"{path} line {n}: class id out of range 0..{n_classes - 1}: {row}")
            conf[y, p] += 1
    return conf


def split_counts(paths: RunPaths, n_classes: int) -> dict[str, list[int]]:
    """Images per class in each saved split (``splits/<split>.csv``); splits without a file are left out."""
    out: dict[str, list[int]] = {}
    for split in ("train", "val", "test"):
        path = paths.split_file(split)
        if not path.is_file():
            continue
        counts = [0] * n_classes
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) == 2 and row[1].isdigit() and int(row[1]) < n_classes:
                    counts[int(row[1])] += 1
        out[split] = counts
    return out


def read_optional_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is absent or unreadable (the report goes on)."""
    if not Path(path).is_file():
        return None
    try:
        return read_json(path)
    except CnncamError:
        return None


def run_facts(
    cfg: RunConfig, paths: RunPaths, best_epoch: int | None, epochs_run: int, test_accuracy: float | None
) -> list[tuple[str, object]]:
    """(name, value) rows describing the run: data, model, training, outcome."""
    d, m, t = cfg.data, cfg.model, cfg.train
    skipped = read_optional_json(paths.skipped)
    return [
        ("run", cfg.name),
        ("run directory", str(paths.root)),
        ("dataset", f"{d.root} (layout {d.layout}, {d.image_size}px input, normalize {d.normalize})"),
        ("skipped images", len(skipped) if isinstance(skipped, list) else None),
        (
            "model",
            m.name
            + (f", pretrained from {m.pretrained}" if m.pretrained else "")
            + (f", channels {list(m.channels)}" if m.name == "simple_cnn" else ""),
        ),
        ("precision", t.precision),
        (
            "optimizer",
            f"{t.optimizer}, lr {t.lr:g}, weight decay {t.weight_decay:g}, scheduler {t.scheduler}",
        ),
        ("augmentation", d.augment),
        (
            "epochs",
            f"{epochs_run} run of {t.epochs} configured"
            + (f" (early stopping, patience {t.patience})" if t.patience else ""),
        ),
        ("best epoch", best_epoch),
        ("monitor", t.monitor),
        ("test accuracy", None if test_accuracy is None else f"{test_accuracy:.2%}"),
    ]


def provenance_facts(paths: RunPaths, cam_attrs: dict[str, Any] | None) -> list[tuple[str, object]]:
    """(name, value) rows: git commit, package versions, host, restarts, checkpoint, CAM file ids."""
    prov = read_optional_json(paths.provenance) or {}
    git = prov.get("git") or {}
    rows: list[tuple[str, object]] = []
    if git:
        rows.append(
            (
                "git commit (training)",
                f"{git.get('commit') or 'unknown'}" + (" (uncommitted changes)" if git.get("dirty") else ""),
            )
        )
    versions = prov.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    for key in ("host", "seed", "start_time"):
        if key in prov:
            rows.append((key.replace("_", " "), prov[key]))
    if prov.get("slurm"):
        rows.append(("Slurm (training)", ", ".join(f"{k}={v}" for k, v in prov["slurm"].items())))
    if prov.get("restarts"):
        rows.append(("restarts", len(prov["restarts"])))
    if cam_attrs:
        rows.append(("CAM checkpoint sha256", cam_attrs.get("checkpoint_sha256")))
        rows.append(("git commit (CAM export)", cam_attrs.get("git_commit") or "unknown"))
        slurm = {k: v for k, v in cam_attrs.items() if k.startswith("slurm_")}
        if slurm:
            rows.append(("Slurm (CAM export)", ", ".join(f"{k}={v}" for k, v in sorted(slurm.items()))))
    return rows


def job_rows(paths: RunPaths) -> list[tuple[object, ...]]:
    """(kind, executor, job id, tasks, state, submitted) for each record of ``jobs.json``."""
    raw = read_optional_json(paths.jobs)
    jobs = raw.get("jobs", []) if isinstance(raw, dict) else []
    rows: list[tuple[object, ...]] = []
    for j in jobs:
        if isinstance(j, dict):
            rows.append(
                (
                    j.get("kind"),
                    j.get("executor"),
                    j.get("job_id"),
                    len(j.get("tasks") or []),
                    j.get("state") or ("cancelled" if j.get("cancelled") else "submitted"),
                    j.get("submitted"),
                )
            )
    return rows


def foreign_cam_notes(cfg: RunConfig, paths: RunPaths, cams: CamFile) -> list[str]:
    """Notes flagging a CAM file of another run with the same classes (shown, but never silently): its
    split differs from this run's saved one, or (when that cannot be checked) its run name."""
    split, found = cams.attrs.get("split"), cams.attrs.get("run_name")
    want = cams.attrs.get("split_sha256") or ""
    try:
        samples = load_index(paths, Path(cfg.data.root)).splits[str(split)] if want else None
    except (CnncamError, KeyError):
        samples = None
    if samples is not None:
        if split_sha256(samples) == want:
            return []
        note = f"The CAM file {cams.path} was exported from another {split} split than this run's saved one"
    elif found != cfg.name:
        note = f"The CAM file {cams.path} comes from another run"
    else:
        return []
    note += f" (it belongs to run {found!r}, not {cfg.name!r}): check that it is the one meant."
    log.warning("report: %s", note)
    return [note]


def outside_root_notes(galleries: dict[str, Any]) -> list[str]:
    """A note when gallery image paths of the CAM file pointed outside ``data.root`` (not read)."""
    items = [i for g in galleries.values() if isinstance(g, list) for i in g]
    items += [i for g in galleries.get("per_class", {}).values() for i in g]
    bad = sum(i["note"] == OUTSIDE_ROOT for i in items)
    if not bad:
        return []
    return [f"{bad} gallery image path(s) in the CAM file are outside data.root; those images were not read."]
