"""One chunked pass over a CAM file: confusion matrix, gallery rows, per-class mean maps, metrics.

Memory stays bounded for any number of items: the file is read in windows of at most
:data:`CHUNK_ROWS` rows (fewer when the rows are wide, see :data:`CHUNK_BYTES`); galleries keep
only their current top-k candidates; class means are running sums of shape (C, h, w).  Ties are
broken by row number, so the result does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cnncam.console import track
from cnncam.report.imaging import normalize
from cnncam.storage import CamFile, cam_path, metric_path

CHUNK_ROWS = 4096  # rows per read window (tests monkeypatch it to check chunk independence)
CHUNK_BYTES = 64 << 20  # cap on the bytes one window of all the datasets read together may take
HIST_BINS = np.linspace(0.0, 1.0, 21)  # AUCs and box energy live in [0, 1]
AUC_METRICS = ("deletion_auc", "insertion_auc", "energy_in_box")
GALLERIES = ("confident_correct", "confident_wrong", "least_confident")
LABEL, PRED, LOGITS, TARGETS = "samples/label", "samples/pred", "samples/logits", "samples/targets"


class TopK:
    """The ``k`` best (score, row) pairs seen so far; ties go to the lower row."""

    def __init__(self, k: int, largest: bool = True) -> None:
        self.k, self.largest = k, largest
        self.scores = np.empty(0, dtype=np.float64)
        self.rows = np.empty(0, dtype=np.int64)

    def update(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Offer candidates ``scores`` (n,) at file rows ``rows`` (n,); non-finite scores are ignored."""
        ok = np.isfinite(scores)
        s = np.concatenate([self.scores, scores[ok].astype(np.float64)])
        r = np.concatenate([self.rows, rows[ok].astype(np.int64)])
        order = np.lexsort((r, -s if self.largest else s))[: self.k]
        self.scores, self.rows = s[order], r[order]


@dataclass
class MetricStats:
    """Faithfulness of one (method, layer): histograms on :data:`HIST_BINS`, means, pointing game."""

    hist: dict[str, np.ndarray] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    pointing_hits: int = 0
    pointing_total: int = 0  # items with a box (hit or miss)

    def mean(self, name: str) -> float | None:
        n = self.count.get(name, 0)
        return self.total[name] / n if n else None

    @property
    def pointing_rate(self) -> float | None:
        return self.pointing_hits / self.pointing_total if self.pointing_total else None


@dataclass
class Scan:
    """What the pass found.  Rows are row numbers in the file (not global dataset indices)."""

    n_items: int
    confusion: np.ndarray  # (C, C) int64, [true, predicted]
    galleries: dict[str, np.ndarray]  # name -> rows, best first
    per_class: list[np.ndarray]  # class c -> rows of the most typical images of class c
    class_sums: dict[tuple[str, str], np.ndarray]  # (method, layer) -> (C, h, w) float64 sums
    class_counts: dict[tuple[str, str], np.ndarray]  # (method, layer) -> (C,) maps summed
    metrics: dict[tuple[str, str], MetricStats]

    def class_means(self, key: tuple[str, str]) -> np.ndarray:
        """(C, h, w) mean of the per-map min-max normalised maps; zeros for a class with none."""
        counts = self.class_counts[key][:, None, None]
        return np.where(counts > 0, self.class_sums[key] / np.maximum(counts, 1), 0.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(n, C) logits -> (n, C) float64 probabilities (max-subtracted for stability)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def map_for_class(targets: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """(n, K) explained classes, (n,) wanted class -> (n,) map slot explaining it, or -1."""
    hit = targets == cls[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def minmax(maps: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-map min-max to [0, 1] over the last two dims, in float64: ``cnncam.cam.viz.normalize``."""
    return normalize(maps.astype(np.float64), eps)


def metric_datasets(cams: CamFile) -> dict[tuple[str, str], list[str]]:
    """(method, layer) -> names of the metrics stored for it (empty dict when none)."""
    have = set(cams.datasets())
    out: dict[tuple[str, str], list[str]] = {}
    for m in cams.methods:
        for layer in cams.layers:
            names = [n for n in (*AUC_METRICS, "pointing_hit") if metric_path(m, layer, n) in have]
            if names:
                out[(m, layer)] = names
    return out


def chunk_rows(cams: CamFile, names: Sequence[str]) -> int:
    """Rows per window: :data:`CHUNK_ROWS`, fewer when a window would exceed :data:`CHUNK_BYTES`."""
    row_bytes = sum(
        int(np.prod(cams.dataset(n).shape[1:], dtype=np.int64)) * cams.dataset(n).dtype.itemsize
        for n in names
    )
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(row_bytes, 1)))


def scan(
    cams: CamFile, gallery_size: int, per_class: int, mean_maps: Sequence[tuple[str, str]] | None = None
) -> Scan:
    """Read ``cams`` once, window by window, and collect everything the report needs.

    Galleries (of ``gallery_size`` rows): ``confident_correct`` / ``confident_wrong`` rank by the
    softmax probability of the predicted class, highest first; ``least_confident`` lowest first.
    ``per_class[c]``: the ``per_class`` images of true class c with the highest probability of c.
    Class means, for every (method, layer) in ``mean_maps`` (default: all): the mean min-max
    normalised map *explaining class c* over images *of class c* (with ``targets=pred`` these are
    the correctly classified ones).
    """
    n_cls = len(cams.class_names)
    everything = [(m, lyr) for m in cams.methods for lyr in cams.layers]
    keys = list(mean_maps) if mean_maps is not None else everything
    mets = metric_datasets(cams)
    names = [LABEL, PRED, LOGITS, TARGETS, *(cam_path(*k) for k in keys)]
    names += [metric_path(m, lyr, n) for (m, lyr), ns in mets.items() for n in ns]
    conf = np.zeros((n_cls, n_cls), dtype=np.int64)
    tops = {
        "confident_correct": TopK(gallery_size),
        "confident_wrong": TopK(gallery_size),
        "least_confident": TopK(gallery_size, largest=False),
    }
    typical = [TopK(per_class) for _ in range(n_cls)]
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts = {k: np.zeros(n_cls, dtype=np.int64) for k in keys}
    stats = {k: MetricStats() for k in mets}
    start, window = 0, chunk_rows(cams, names)
    windows = cams.iter_rows(names, chunk=window)
    for chunk in track(windows, total=-(-cams.n_items // window), desc="report: scanning", unit="window"):
        rows = np.arange(start, start + len(chunk[LABEL]), dtype=np.int64)
        start += len(rows)
        label, pred = chunk[LABEL], chunk[PRED]
        np.add.at(conf, (label, pred), 1)
        prob = softmax(chunk[LOGITS])
        p_pred = np.take_along_axis(prob, pred[:, None], 1)[:, 0]
        right = label == pred
        tops["confident_correct"].update(p_pred[right], rows[right])
        tops["confident_wrong"].update(p_pred[~right], rows[~right])
        tops["least_confident"].update(p_pred, rows)
        p_label = np.take_along_axis(prob, label[:, None], 1)[:, 0]
        for c in np.unique(label):
            sel = label == c
            typical[c].update(p_label[sel], rows[sel])
        slot = map_for_class(chunk[TARGETS], label)
        for key in keys:
            _accumulate_means(sums, counts[key], key, chunk[cam_path(*key)], label, slot, n_cls)
        for key, ns in mets.items():
            _accumulate_metrics(stats[key], {n: chunk[metric_path(*key, n)] for n in ns})
    for key in keys:  # a file with no items still gets (C, h, w) zeros
        if key not in sums:
            sums[key] = np.zeros((n_cls, *cams.dataset(cam_path(*key)).shape[2:]), dtype=np.float64)
    galleries = {k: t.rows for k, t in tops.items()}
    return Scan(start, conf, galleries, [t.rows for t in typical], sums, counts, stats)


def _accumulate_means(
    sums: dict[tuple[str, str], np.ndarray],
    counts: np.ndarray,
    key: tuple[str, str],
    maps: np.ndarray,
    label: np.ndarray,
    slot: np.ndarray,
    n_cls: int,
) -> None:
    """Add the normalised maps (n, K, h, w) explaining each row's label to the per-class sums."""
    if key not in sums:
        sums[key] = np.zeros((n_cls, *maps.shape[2:]), dtype=np.float64)
    ok = slot >= 0
    picked = maps[np.flatnonzero(ok), slot[ok]]  # (n', h, w)
    finite = np.isfinite(picked).all(axis=(1, 2))  # NaN = a fill value, never a real map
    np.add.at(sums[key], label[ok][finite], minmax(picked[finite]))
    np.add.at(counts, label[ok][finite], 1)


def _accumulate_metrics(st: MetricStats, values: dict[str, np.ndarray]) -> None:
    for name, v in values.items():
        if name == "pointing_hit":
            st.pointing_hits += int((v == 1).sum())
            st.pointing_total += int(((v == 0) | (v == 1)).sum())  # -1 no box, -128 fill value
            continue
        v = v[np.isfinite(v)].astype(np.float64)
        hist, _ = np.histogram(np.clip(v, 0.0, 1.0), bins=HIST_BINS)
        st.hist[name] = st.hist.get(name, np.zeros(len(HIST_BINS) - 1, dtype=np.int64)) + hist
        st.total[name] = st.total.get(name, 0.0) + float(v.sum())
        st.count[name] = st.count.get(name, 0) + int(v.size)
