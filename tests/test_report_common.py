"""A small synthetic run directory + CAM file shared by the report tests (no tests here).

The CAM file is written with the real ``PartWriter``; values are pure functions of the item
index, so brute-force numpy over the whole file is the reference for every chunked result.
"""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from cnncam.config import load_config
from cnncam.runs import RunPaths, atomic_write_json, provenance, write_config
from cnncam.storage import PartBatch, PartSpec, PartWriter, RunInfo, merge_parts, part_filename
from cnncam.storage import schema as S

CLASSES = ("circle", "<script>alert(1)</script>", "a$b & 'c'")
METHODS = ("gradcam", "gradcam_pp")
LAYER = "features.3"
SIZE, h, w = 24, 6, 6
N_ITEMS = 30


def logits_for(idx: np.ndarray) -> np.ndarray:
    """(n, 3) logits: label = idx % 3; every 4th item is predicted as the next class; confidence varies."""
    n = len(idx)
    label = idx % 3
    pred = np.where(idx % 4 == 1, (label + 1) % 3, label)
    out = np.zeros((n, 3), dtype=np.float32)
    out[np.arange(n), pred] = 1.0 + (idx % 7) * 0.4  # margins repeat: ties exercise the row tie-break
    out[np.arange(n), (pred + 2) % 3] = 0.3
    return out


def cam_maps(idx: np.ndarray, method_i: int) -> np.ndarray:
    """(n, 1, h, w) non-negative maps with a peak that moves with the item (and the method)."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy = (idx[:, None, None] + method_i) % h
    cx = (idx[:, None, None] * 2) % w
    peak = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)[:, None].astype(np.float32)
    return peak * (1 + idx % 3)[:, None, None, None]


def make_batch(start: int, stop: int) -> PartBatch:
    idx = np.arange(start, stop, dtype=np.int64)
    logits = logits_for(idx)
    pred = logits.argmax(1).astype(np.int64)
    metrics: dict[tuple[str, str], dict[str, np.ndarray]] = {
        (m, LAYER): {
            "deletion_auc": ((idx % 10) / 10 + 0.05 * mi).astype(np.float32),
            "insertion_auc": (1 - (idx % 7) / 7).astype(np.float32),
            "energy_in_box": np.where(idx % 6 == 0, np.nan, (idx % 5) / 5).astype(np.float32),
            "pointing_hit": np.where(idx % 6 == 0, -1, (idx + mi) % 2).astype(np.int8),
        }
        for mi, m in enumerate(METHODS)
    }
    return PartBatch(
        index=idx,
        path=[f"c{i % 3}/img_{i:03d}.png" for i in idx],
        label=idx % 3,
        pred=pred,
        logits=logits,
        targets=pred[:, None],
        cams={(m, LAYER): cam_maps(idx, mi) for mi, m in enumerate(METHODS)},
        metrics=metrics,
    )


def run_info(name: str = "rep") -> RunInfo:
    return RunInfo(
        run_name=name,
        split="test",
        model="simple_cnn",
        class_names=CLASSES,
        methods=METHODS,
        layers=(LAYER,),
        targets="pred",
        input_size=(SIZE, SIZE),
        checkpoint_sha256="ab" * 32,
        checkpoint_path="checkpoints/best.pt",
        normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        config={"name": name},
        git_commit="cafe1234",
        git_dirty=False,
        versions={"numpy": np.__version__},
        slurm={"slurm_job_id": "4242"},
    )


def write_cams(
    cams_dir: Path, n: int = N_ITEMS, shards: int = 1, batch: int = 8, extras: bool = True, name: str = "rep"
) -> Path:
    """Parts (merged into cams.h5 when ``shards`` > 1); returns the file to open."""
    run = run_info(name)
    paths = []
    for s in range(shards):
        spec = PartSpec.for_shard(run, n, s, shards)
        with PartWriter.open_or_resume(cams_dir, spec, batch_size=batch) as wr:
            for a in range(spec.index_start, spec.index_stop, batch):
                wr.put(make_batch(a, min(a + batch, spec.index_stop)))
            if extras and spec.n_items:
                m = min(4, spec.n_items)
                acts = np.random.default_rng(s).normal(size=(m, 10, 12, 12)).astype(np.float32)
                acts[:, 3] = 1.0  # a constant channel must not break the display scaling
                wr.put_extras(
                    activations={"features.0": acts},
                    activation_index=np.arange(spec.index_start, spec.index_start + m),
                    first_conv=np.random.default_rng(1).normal(size=(8, 3, 3, 3)) if s == 0 else None,
                )
        paths.append(cams_dir / part_filename(s, shards))
    if shards == 1:
        return paths[0]
    return merge_parts(paths, cams_dir / S.MERGED_FILENAME)


def write_images(root: Path, n: int = N_ITEMS, missing: tuple[int, ...] = ()) -> Path:
    """PNG images (32x28, so the eval geometry resizes and crops) for every item but ``missing``."""
    for i in range(n):
        if i in missing:
            continue
        p = root / f"c{i % 3}" / f"img_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        a = np.zeros((28, 32, 3), dtype=np.uint8)
        a[..., i % 3] = 60 + 6 * i
        a[8:20, 8:20] = 255
        Image.fromarray(a).save(p)
    return root


def epoch_records(
    train_loss: list[float],
    val_loss: list[float] | None,
    train_acc: list[float],
    val_acc: list[float] | None = None,
    iters_per_epoch: int = 3,
) -> list[dict[str, Any]]:
    """metrics.jsonl records as the trainer writes them (iter lines, then epoch lines per epoch)."""
    recs: list[dict[str, Any]] = []
    step = 0
    for e, (tl, ta) in enumerate(zip(train_loss, train_acc), start=1):
        for k in range(iters_per_epoch):
            step += 1
            lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / (len(train_loss) * iters_per_epoch)))
            recs.append(
                {
                    "split": "train",
                    "kind": "iter",
                    "epoch": e - 1 + (k + 1) / iters_per_epoch,
                    "step": step,
                    "loss": tl * (1.1 - 0.05 * k),
                    "accuracy": ta,
                    "lr": lr,
                    "images_per_s": 100.0,
                }
            )
        recs.append(
            {
                "split": "train",
                "kind": "epoch",
                "epoch": e,
                "step": step,
                "loss": tl,
                "accuracy": ta,
                "lr": 1e-3,
            }
        )
        if val_loss is not None:
            va = val_acc[e - 1] if val_acc else ta - 0.05
            recs.append(
                {
                    "split": "val",
                    "kind": "epoch",
                    "epoch": e,
                    "step": step,
                    "loss": val_loss[e - 1],
                    "accuracy": va,
                    "lr": 1e-3,
                }
            )
    return recs


OVERFIT: dict[str, Any] = dict(
    train_loss=[1.0, 0.8, 0.6, 0.45, 0.35, 0.25, 0.18, 0.12],
    val_loss=[1.05, 0.85, 0.7, 0.62, 0.66, 0.74, 0.85, 0.97],
    train_acc=[0.5, 0.62, 0.74, 0.82, 0.88, 0.93, 0.96, 0.98],
    val_acc=[0.48, 0.6, 0.68, 0.72, 0.72, 0.71, 0.70, 0.70],
)


def make_run(
    tmp: Path,
    name: str = "rep",
    cams: bool = True,
    missing: tuple[int, ...] = (),
    shards: int = 1,
    records: list[dict[str, Any]] | None = None,
) -> Path:
    """A complete run directory under ``tmp/runs/<name>`` (images under ``tmp/data``)."""
    root = write_images(tmp / "data", missing=missing)
    cfg = load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp / 'runs'}",
            f"data.root={root}",
            f"data.image_size={SIZE}",
            f"data.resize={SIZE}",
            "model.channels=[8,16]",
            "train.epochs=8",
            "report.gallery_size=4",
            "report.per_class=2",
        ],
    )
    paths = RunPaths(cfg.run_dir)
    paths.root.mkdir(parents=True)
    write_config(paths, cfg)
    atomic_write_json(paths.classes, list(CLASSES))
    atomic_write_json(paths.provenance, provenance(0))
    recs = records if records is not None else epoch_records(**OVERFIT)
    recs = recs + [{"split": "test", "kind": "final", "epoch": 4, "step": 24, "loss": 0.7, "accuracy": 0.75}]
    paths.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with paths.predictions.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["index", "path", "label", "pred", "label_name", "pred_name", "confidence"])
        for i in range(12):
            y, p = i % 3, (i % 3 + (i % 5 == 0)) % 3
            wr.writerow([i, f"c{y}/img_{i:03d}.png", y, p, CLASSES[y], CLASSES[p], "0.9"])
    atomic_write_json(
        paths.jobs,
        {
            "version": 1,
            "jobs": [
                {
                    "kind": "train",
                    "executor": "slurm",
                    "job_id": "4241",
                    "tasks": ["4241"],
                    "folder": "x",
                    "name": "cnncam-rep-train",
                    "state": "COMPLETED",
                }
            ],
        },
    )
    if cams:
        write_cams(paths.cams, shards=shards, name=name)
        if shards == 1:  # the report's default file name
            (paths.cams / part_filename(0, 1)).rename(paths.cams / S.MERGED_FILENAME)
    return paths.root


def all_rows(path: Path) -> dict[str, np.ndarray]:
    """Every per-item dataset of a CAM file, whole (the brute-force reference; tests only)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


class PageParser(HTMLParser):
    """Collects what the report tests check: tables (cell text), image sources, links, scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag in ("a", "link"):
            self.links.append(a.get("href") or "")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def table_with(self, *headers: str) -> list[list[str]]:
        """The first table whose header row starts with ``headers``."""
        for t in self.tables:
            if t and t[0][: len(headers)] == list(headers):
                return t
        raise AssertionError(f"no table with headers {headers}")


def parse_page(path: Path) -> PageParser:
    p = PageParser()
    p.feed(Path(path).read_text(encoding="utf-8"))
    return p
