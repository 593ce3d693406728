"""The few rows a gallery shows: their sample fields, display-ready maps and images.

Maps follow the convention of ``cnncam.cam.viz`` (bilinear, ``align_corners=False``, then
per-map min-max); images go through the run's own eval geometry (resize the short side, centre
crop), so the heatmap lies exactly where the network looked.  A missing or unreadable image is
not an error: the item keeps its heatmap and carries a note instead.

Image paths come from the CAM file, which may be foreign: only a plain relative path (no ``..``,
not absolute) is joined to ``data.root``; any other is never opened (:func:`image_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cnncam.config import DataConfig
from cnncam.data.images import BadImageError, load_rgb
from cnncam.report import select as sel
from cnncam.report.imaging import eval_geometry, normalize, upsample
from cnncam.storage import CamFile, cam_path

OUTSIDE_ROOT = "image path outside data.root: not read"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image of a gallery.

    map01: {(method, layer): (H, W) float32 in [0, 1]} explaining ``explained``;
    image: (H, W, 3) float32 in [0, 1], or None when the file could not be read (see ``note``).
    """

    row: int
    index: int
    path: str
    label: int
    pred: int
    confidence: float  # softmax probability of the predicted class
    explained: int  # class the maps explain
    map01: dict[tuple[str, str], np.ndarray]
    image: np.ndarray | None
    note: str = ""

    @property
    def correct(self) -> bool:
        return self.label == self.pred

    def to_dict(self, class_names: Sequence[str]) -> dict[str, object]:
        return {
            "row": self.row,
            "index": self.index,
            "path": self.path,
            "label": self.label,
            "pred": self.pred,
            "label_name": class_names[self.label],
            "pred_name": class_names[self.pred],
            "confidence": round(self.confidence, 6),
            "explained": self.explained,
            "image_found": self.image is not None,
            "note": self.note,
        }


def load_items(
    cams: CamFile,
    rows: Sequence[int] | np.ndarray,
    keys: Sequence[tuple[str, str]],
    data: DataConfig,
    root: Path | None,
) -> list[Item]:
    """Read ``rows`` (file rows, any order) and build display items in that order.

    Each map is the slot explaining the predicted class (slot 0 when no slot does, e.g.
    ``targets=label``); ``root`` is the image folder (``data.root``), None to skip images.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    # Rows are read in sorted windows spanning at most chunk_rows() file rows: bounded memory.
    names = ["samples/index", "samples/path", sel.LABEL, sel.PRED, sel.LOGITS, sel.TARGETS]
    f = cams.read_many(names, rows, chunk=sel.chunk_rows(cams, names))
    prob = sel.softmax(f[sel.LOGITS])
    slot = sel.map_for_class(f[sel.TARGETS], f[sel.PRED])
    slot = np.where(slot < 0, 0, slot)
    size = input_size(cams)
    maps: dict[tuple[str, str], np.ndarray] = {}
    for key in keys:
        name = cam_path(*key)
        raw = cams.read(name, rows, chunk=sel.chunk_rows(cams, [name]))[np.arange(rows.size), slot]
        maps[key] = display_maps(raw, size)  # (n, H, W)
    items = []
    for i, row in enumerate(rows):
        path = str(f["samples/path"][i])
        image, note = load_image(root, path, data) if root is not None else (None, "no image folder")
        items.append(
            Item(
                row=int(row),
                index=int(f["samples/index"][i]),
                path=path,
                label=int(f[sel.LABEL][i]),
                pred=int(f[sel.PRED][i]),
                confidence=float(prob[i, f[sel.PRED][i]]),
                explained=int(f[sel.TARGETS][i, slot[i]]),
                map01={k: m[i] for k, m in maps.items()},
                image=image,
                note=note,
            )
        )
    return items


def input_size(cams: CamFile) -> tuple[int, int]:
    """The network input (H, W) the maps are shown at (root attribute ``input_size``)."""
    h, w = (int(s) for s in cams.attrs["input_size"])
    return h, w


def display_maps(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Raw maps (n, h, w) -> (n, H, W) float32 in [0, 1]: bilinear upsample, then min-max.

    Non-finite values (fill values of a missing source) become 0 rather than poisoning the map.
    """
    finite = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return normalize(upsample(finite, size)).astype(np.float32)


def image_file(root: Path, rel: str) -> Path | None:
    """``root/rel`` when ``rel`` is a plain relative path (no ``..``, not absolute); else None.

    Symbolic links inside ``data.root`` are followed, as training followed them.
    """
    parts = PurePosixPath(rel).parts
    if (
        not rel
        or "\x00" in rel
        or PurePosixPath(rel).is_absolute()
        or ".." in parts
        or Path(rel).is_absolute()
    ):
        return None
    return Path(root, *parts)


def load_image(root: Path, rel: str, data: DataConfig) -> tuple[np.ndarray | None, str]:
    """``root/rel`` through the eval geometry -> ((H, W, 3) float32 in [0, 1], ""), or (None, note)."""
    path = image_file(root, rel)
    if path is None:
        log.warning("report: image path %r of the CAM file is not inside data.root; not read", rel[:200])
        return None, OUTSIDE_ROOT
    try:
        img = load_rgb(path, data.max_image_pixels)
    except BadImageError as e:
        log.warning("report: image %s not shown (%s)", path, e)
        reason = "file missing" if not path.exists() else e.reason
        return None, f"image not available ({reason}): heatmap only"
    return eval_geometry(img, data), ""
