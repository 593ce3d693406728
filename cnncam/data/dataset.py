"""Finding images and a deterministic Dataset; the split itself is in :mod:`cnncam.data.splits`.

Two folder layouts (``data.layout``)::

    single:    root/<class>/**/<image>                 split here by data.split ratios
    presplit:  root/{train,val,test}/<class>/**/<image> split given by the folders
    auto:      presplit iff root/train is a folder

Every candidate file is decoded once at discovery (in a thread pool: Pillow releases the
GIL while decoding), so a broken file is listed in ``skipped.json`` instead of killing
epoch 7 of a 10-hour job.  So is a path too long for the CAM file (``samples/path`` holds
511 bytes): better refused before training than by ``cam`` after it.

Symlinks are followed (datasets are often linked into place), except one that points back
into the data folder, and each real file is listed once: a loop (``square/loop -> .``) once
turned 17 files into 697 samples, with every file in both train and test.  A cheap content
hash of every file (cached in the run, ``splits/hashes.csv``) finds byte-identical files in
more than one split; they are reported in a :class:`DuplicateImageWarning`.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from cnncam.config import DataConfig
from cnncam.console import track
from cnncam.data.images import BadImageError, load_rgb
from cnncam.data.splits import SPLITS, DatasetIndex, FileHash, Sample, _split_single
from cnncam.data.walk import DuplicateImageWarning as DuplicateImageWarning
from cnncam.data.walk import FolderWalk, content_hash, cross_split_duplicates
from cnncam.data.walk import LinkWarning as LinkWarning
from cnncam.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 4096  # files submitted to the decode pool at a time (bounded memory for 1M-file folders)


class BadImageWarning(UserWarning):
    """Some images could not be decoded and were left out."""


# ----------------------------------------------------------------------------------------------
# Discovery


def discover(cfg: DataConfig, seed: int, hash_cache: dict[str, FileHash] | None = None) -> DatasetIndex:
    """Scan ``cfg.root``, decode every image once, and split it.

    ``hash_cache``: content hashes of an earlier scan (``path -> (size, mtime_ns, digest)``),
    reused for files whose size and mtime did not change.

    Raises
    ------
    DataError
        Root missing, no class folders, an empty class folder, a single class, presplit
        folders with different class sets, or a class left with no training image.
    """
    if cfg.format != "folder":  # a CSV manifest or WebDataset shards (cnncam/data/layouts.py)
        from cnncam.data.layouts import discover_layout

        return discover_layout(cfg, seed)
    root = Path(cfg.root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.root {str(root)!r} {what}")
    presplit = _is_presplit(root, cfg.layout)
    walk = FolderWalk(root)
    classes, found = _find_images(root, presplit, cfg.extensions, walk)
    walk.warn()
    all_files = [f for per_class in found.values() for files in per_class.values() for f in files]
    bad, hashes = _check_images(root, all_files, cfg.max_image_pixels, hash_cache or {})
    skipped = [{"path": rel, "reason": bad[rel]} for rel in sorted(bad)]
    if skipped:
        _warn_skipped(root, skipped)
    good = {
        s: {c: [f for f in files if f not in bad] for c, files in per_class.items()}
        for s, per_class in found.items()
    }
    if presplit:
        _require_training_images(root, good["train"], bad, "train/")
        splits = {s: _labelled(good.get(s, {}), classes) for s in SPLITS}
    else:
        _require_training_images(root, good["all"], bad, "")
        splits = _split_single(good["all"], classes, cfg.split, seed)
        if not splits["val"] and cfg.split.val > 0:  # asked for, but it rounds to no image
            warnings.warn(
                f"the val split is empty (data.split.val={cfg.split.val} of {len(all_files)} images): "
                "there are no validation metrics, and training monitors the training metrics instead",
                UserWarning,
                stacklevel=2,
            )
    duplicates = cross_split_duplicates(splits, hashes)
    return DatasetIndex(root, classes, splits, skipped, hashes=hashes, duplicates=duplicates)


def _find_images(
    root: Path, presplit: bool, extensions: Sequence[str], walk: FolderWalk
) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """(classes, {split or "all": {class: sorted relative paths}}) with structural checks."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if presplit:
        classes = _presplit_classes(root)
        found = {s: _list_images(root / s, classes, exts, walk) for s in SPLITS if (root / s).is_dir()}
    else:
        classes = _class_names(root)
        found = {"all": _list_images(root, classes, exts, walk)}
    if len(classes) < 2:
        raise DataError(
            f"{root} holds a single class ({classes[0]!r}); classification needs at least 2 classes"
        )
    return classes, found


def _is_presplit(root: Path, layout: str) -> bool:
    if layout == "auto":
        return (root / "train").is_dir()
    if layout == "presplit" and not (root / "train").is_dir():
        raise DataError(
            f"data.layout is 'presplit' but {root / 'train'} is not a folder; "
            f"expected {root}/train/<class>/<image> (or use data.layout=single)"
        )
    return layout == "presplit"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_names(folder: Path) -> list[str]:
    names = sorted(d.name for d in folder.iterdir() if _visible(d) and d.is_dir())
    if not names:
        loose = sum(1 for f in folder.iterdir() if _visible(f) and f.is_file())
        hint = f" ({loose} files lie directly in it: put them in one sub-folder per class)" if loose else ""
        raise DataError(f"no class folders in {folder}{hint}; expected {folder}/<class>/<image>")
    return names


def _presplit_classes(root: Path) -> list[str]:
    classes = _class_names(root / "train")
    problems = []
    for split in SPLITS[1:]:
        if not (root / split).is_dir():
            continue
        other = set(_class_names(root / split))
        missing, extra = sorted(set(classes) - other), sorted(other - set(classes))
        if missing:
            problems.append(f"{split}/ lacks {', '.join(missing)}")
        if extra:
            problems.append(f"{split}/ has {', '.join(extra)} which train/ lacks")
    if problems:
        raise DataError(f"presplit class folders differ under {root}: " + "; ".join(problems))
    if not (root / "val").is_dir():
        warnings.warn(f"{root} has no val/ folder: validation metrics will be empty", stacklevel=3)
    return classes


def _list_images(folder: Path, classes: list[str], exts: set[str], walk: FolderWalk) -> dict[str, list[str]]:
    """class -> sorted image paths relative to the data root; raises on empty class folders."""
    for c in classes:
        if (folder / c).is_symlink() and walk.points_inside(folder / c):
            raise DataError(
                f"class folder {folder / c} is a symlink into data.root ({(folder / c).resolve()}): its "
                "images would get two labels; remove the link"
            )
    found = {c: walk.images(folder / c, exts) for c in classes}
    empty = [str(folder / c) for c, files in found.items() if not files]
    if empty:
        raise DataError(f"empty class folder(s) with no {'/'.join(sorted(exts))} files: {', '.join(empty)}")
    return found


def _check_images(
    root: Path, files: list[str], max_pixels: int, cache: dict[str, FileHash], hash_files: bool = True
) -> tuple[dict[str, str], dict[str, FileHash]]:
    """({rel path: reason} for every file ``load_rgb`` or the CAM file refuses, {rel path: hash}).

    ``hash_files=False`` for samples that are not files of their own (WebDataset tar members).
    """
    from cnncam.storage.schema import PATH_BYTES

    def check(rel: str) -> tuple[str | None, FileHash | None]:
        size = len(rel.encode("utf-8"))
        if size >= PATH_BYTES:
            return f"its path is {size} bytes; the CAM file stores at most {PATH_BYTES - 1} (rename it)", None
        path = root / rel
        try:
            load_rgb(path, max_pixels)  # first: its reasons are the ones users know
            digest = content_hash(path, cache.get(rel)) if hash_files else None
        except BadImageError as e:
            return e.reason, None
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror or e}", None
        return None, digest

    def results() -> Iterator[tuple[str | None, FileHash | None]]:
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            for start in range(0, len(files), _CHUNK):
                yield from pool.map(check, files[start : start + _CHUNK])

    bad, hashes = {}, {}
    checked = track(results(), total=len(files), desc="checking images", unit="img")
    for rel, (reason, digest) in zip(files, checked):
        if reason is not None:
            bad[rel] = reason
        elif digest is not None:
            hashes[rel] = digest
    return bad, hashes


def _warn_skipped(root: Path, skipped: list[dict[str, str]]) -> None:
    shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(
        f"skipped {len(skipped)} unreadable image(s) under {root} (listed in skipped.json): {shown}{more}",
        BadImageWarning,
        stacklevel=3,
    )


def _require_training_images(
    root: Path, good: dict[str, list[str]], bad: dict[str, str], prefix: str
) -> None:
    for cls, files in good.items():
        if not files:
            n_bad = sum(1 for rel in bad if rel.startswith(f"{prefix}{cls}/"))
            raise DataError(
                f"class {cls!r} under {root} has no usable training image ({n_bad} skipped as unreadable)"
            )


def _labelled(per_class: dict[str, list[str]], classes: list[str]) -> list[Sample]:
    return [(rel, label) for label, c in enumerate(classes) for rel in per_class.get(c, [])]


# ----------------------------------------------------------------------------------------------
# Bounding boxes (root/boxes.json)


def load_boxes(root: Path) -> dict[str, tuple[int, int, int, int]] | None:
    """``root/boxes.json`` as {relative path: (x0, y0, x1, y1)}, or None when there is none."""
    path = Path(root) / "boxes.json"
    if not path.is_file():
        return None
    try:
        raw: Any = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} must map image paths to [x0, y0, x1, y1]")
    boxes = {}
    for rel, box in raw.items():
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            raise DataError(f"{path}: box of {rel!r} must be 4 integers [x0, y0, x1, y1], got {box!r}")
        boxes[rel] = (box[0], box[1], box[2], box[3])
    return boxes


# ----------------------------------------------------------------------------------------------
# Dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """64-bit seed of one sample's augmentation: a pure function of (seed, epoch, index)."""
    words = [seed % 2**64, epoch % 2**64, index % 2**64]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


class ImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Images of one split; ``ds[i]`` or ``ds[(i, epoch)]`` -> ``(image (3, H, W), label, index)``.

    Determinism: before the random ``transform`` runs, Python's ``random`` and torch's CPU
    generator are seeded with :func:`sample_seed` ``(seed, epoch, index)`` so a sample's
    augmentation does not depend on worker count or fetch order (exact resume mid-epoch).
    In the main process (``num_workers=0``) both RNG states are restored afterwards, so
    the caller's random stream is untouched.  CUDA generators are never touched.

    Fallback: a file that no longer decodes (changed on disk after discovery) logs one
    warning and is replaced by the next decodable sample ``j = index+1, index+2, ...``
    (wrapping); the returned triple is then exactly ``ds[(j, epoch)]``, index ``j`` included,
    so image, label and index always agree.
    """

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.seed = seed
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SupportsIndex | Sequence[SupportsIndex]) -> tuple[torch.Tensor, int, int]:
        index, epoch = self._parse_key(key)
        n = len(self.samples)
        for attempt in range(n):
            j = (index + attempt) % n
            rel, label = self.samples[j]
            try:
                image = load_rgb(self.root / rel, self.max_pixels)
            except BadImageError as e:
                self._warn_once(rel, e.reason)
                continue
            return self._transform(image, sample_seed(self.seed, epoch, j)), label, j
        raise DataError(f"none of the {n} images of this split under {self.root} can be decoded any more")

    def _parse_key(self, key: SupportsIndex | Sequence[SupportsIndex]) -> tuple[int, int]:
        if isinstance(key, Sequence):
            if len(key) != 2:
                raise TypeError(f"ImageDataset keys are an index or (index, epoch), got {key!r}")
            index, epoch = operator.index(key[0]), operator.index(key[1])
        else:
            index, epoch = operator.index(key), 0
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return index % len(self), epoch

    def _transform(self, image: Image.Image, seed: int) -> torch.Tensor:
        if get_worker_info() is not None:  # a worker's RNG belongs to nobody else
            return self._seeded(image, seed)
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        try:
            return self._seeded(image, seed)
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)

    def _seeded(self, image: Image.Image, seed: int) -> torch.Tensor:
        random.seed(seed)
        # Not torch.manual_seed: that would also reseed every CUDA generator.
        torch.default_generator.manual_seed(seed)
        return self.transform(image)

    def _warn_once(self, rel: str, reason: str) -> None:
        if rel not in self._warned:
            self._warned.add(rel)
            log.warning(
                "cannot decode %s any more (%s); using the next image instead", self.root / rel, reason
            )
