"""The report's sections: each turns data into figures (saved through a :class:`FigureWriter`),
an HTML fragment and the matching entries of ``summary.json``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cnncam.config import DataConfig, ReportConfig
from cnncam.report import figures as F
from cnncam.report import html as H
from cnncam.report.diagnose import Curves, Diagnosis
from cnncam.report.imaging import upsample
from cnncam.report.items import Item, input_size, load_items
from cnncam.report.select import GALLERIES, Scan
from cnncam.report.summary import class_metrics
from cnncam.storage import CamFile

log = logging.getLogger(__name__)
Key = tuple[str, str]
GALLERY_TITLES = {
    "confident_correct": "Most confident correct",
    "confident_wrong": "Most confident wrong",
    "least_confident": "Least confident",
}


@dataclass
class FigureWriter:
    """Saves figures as ``<folder>/<name>.png`` and returns their links relative to the report."""

    folder: Path
    dpi: int
    written: list[str] = field(default_factory=list)

    def save(self, fig: Figure, name: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        F.save_png(fig, self.folder / f"{name}.png", self.dpi)
        rel = f"{self.folder.name}/{name}.png"
        self.written.append(rel)
        return rel


def key_name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def shown_classes(conf: np.ndarray, limit: int) -> list[int]:
    """Class ids that get per-class figures: all when there are at most ``limit``, else the
    ``limit`` with the lowest recall (ties: lower id; classes absent from the file last), in id order."""
    n = len(conf)
    if n <= limit:
        return list(range(n))
    support = conf.sum(axis=1)
    recall = np.where(support > 0, np.diag(conf) / np.maximum(support, 1), np.inf)
    return sorted(int(c) for c in np.lexsort((np.arange(n), recall))[:limit])


def _limit_note(names: Sequence[str], shown: Sequence[int]) -> list[object]:
    if len(shown) == len(names):
        return []
    return [
        H.note(f"{len(names)} classes: showing the {len(shown)} with the lowest recall (report.max_classes).")
    ]


# ----------------------------------------------------------------------------------------------
# Learning curves and classification


def curves_section(c: Curves, diag: Diagnosis, figs: FigureWriter) -> H.Raw:
    """Verdict, reasons, remedies that apply, and the 2x2 learning-curve figure."""
    if not c.epochs and not c.iter_loss:
        missing = H.note("metrics.jsonl is missing or empty: no curves.")
        return H.section("curves", "Learning curves", [missing])
    body: list[object] = [H.tag("div", diag.headline, class_=f"verdict {diag.verdict}")]
    if diag.details:
        body.append(H.bullets(diag.details))
    if diag.remedies:
        body += [H.tag("h3", "What usually helps"), H.bullets(diag.remedies)]
    body.append(H.img(figs.save(F.learning_curves(c, diag), "learning_curves"), "learning curves"))
    return H.section("curves", "Learning curves", body)


def classification_section(
    conf: np.ndarray, names: Sequence[str], source: str, figs: FigureWriter
) -> tuple[H.Raw, dict[str, Any]]:
    """Confusion matrices (figure + counts table) and the per-class precision/recall/F1 table."""
    cm = class_metrics(conf)
    rows = [
        (name, m["precision"], m["recall"], m["f1"], m["support"]) for name, m in zip(names, cm["classes"])
    ]
    for avg in ("macro", "weighted"):
        rows.append((f"{avg} average", cm[avg]["precision"], cm[avg]["recall"], cm[avg]["f1"], cm["count"]))
    acc = "—" if cm["accuracy"] is None else f"{cm['accuracy']:.2%}"
    body: list[object] = [
        H.para(f"{cm['count']:,} images from {source}; accuracy {acc}."),
        H.img(figs.save(F.confusion_figure(conf, names), "confusion_matrix"), "confusion matrix"),
        H.tag("h3", "Per-class metrics"),
        H.table(["class", "precision", "recall", "F1", "support"], rows),
    ]
    if len(names) <= 30:
        body += [
            H.tag("h3", "Confusion matrix (rows: true class, columns: predicted)"),
            H.table(["true \\ predicted", *names], ([n, *map(int, r)] for n, r in zip(names, conf))),
        ]
    summary = {
        "source": source,
        "class_names": list(names),
        "matrix": conf.tolist(),
        "per_class": cm["classes"],
        **{k: v for k, v in cm.items() if k != "classes"},
    }
    return H.section("classification", "Confusion matrix and per-class metrics", body), summary


# ----------------------------------------------------------------------------------------------
# CAM galleries, comparison, class means


def _caption_rows(items: Sequence[Item], names: Sequence[str]) -> list[tuple[object, ...]]:
    return [
        (
            i + 1,
            it.index,
            H.tag("code", it.path),
            names[it.label],
            names[it.pred],
            f"{it.confidence:.1%}",
            it.note or "",
        )
        for i, it in enumerate(items)
    ]


def _gallery(
    title: str,
    items: Sequence[Item],
    key: Key,
    names: Sequence[str],
    rc: ReportConfig,
    figs: FigureWriter,
    fig_name: str,
) -> list[object]:
    out: list[object] = [H.tag("h3", title)]
    if not items:
        return out + [H.para("No images fall in this group.", class_="muted")]
    if any(it.image is None for it in items):
        out.append(H.note("Some images could not be read; their rows show the heatmap only."))
    fig = F.gallery_figure(items, key, names, rc.alpha, rc.colormap)
    out.append(H.img(figs.save(fig, fig_name), title))
    out.append(
        H.table(
            ["#", "index", "path", "true", "predicted", "confidence", "note"], _caption_rows(items, names)
        )
    )
    return out


def gallery_section(
    cams: CamFile,
    scan: Scan,
    keys: Sequence[Key],
    rc: ReportConfig,
    data: DataConfig,
    root: Path,
    figs: FigureWriter,
) -> tuple[H.Raw, dict[str, Any]]:
    """The seeds' 3-panel galleries (first method/layer), then the method/layer comparison."""
    names, key = cams.class_names, keys[0]
    body: list[object] = [
        H.para(
            f"Maps: {key[0]} at layer {key[1]}, explaining the predicted class (targets "
            f"{cams.attrs.get('targets')}); overlay alpha {rc.alpha:g}, colormap {rc.colormap}."
        )
    ]
    if not root.is_dir():
        body.append(H.note(f"Image folder {root} not found: galleries show heatmaps only."))
    summary: dict[str, Any] = {}
    loaded: dict[str, list[Item]] = {}
    for name in GALLERIES:
        items = load_items(cams, scan.galleries[name], keys, data, root)
        loaded[name] = items
        summary[name] = [it.to_dict(names) for it in items]
        body += _gallery(GALLERY_TITLES[name], items, key, names, rc, figs, f"gallery_{name}")
    body.append(H.tag("h3", "Per class: the most typical images (highest probability of their class)"))
    classes = shown_classes(scan.confusion, rc.max_classes)
    body += _limit_note(names, classes)
    per_class: dict[str, Any] = {}
    for c in classes:
        items = load_items(cams, scan.per_class[c], keys, data, root)
        per_class[names[c]] = [it.to_dict(names) for it in items]
        body += _gallery(f"Class {names[c]}", items, key, names, rc, figs, f"class_{c:04d}")
    summary["per_class"] = per_class
    if len(keys) > 1 and rc.compare_size > 0:
        body += _comparison(loaded, keys, names, rc, figs)
    return H.section("galleries", "CAM galleries", body), summary


def _comparison(
    loaded: dict[str, list[Item]],
    keys: Sequence[Key],
    names: Sequence[str],
    rc: ReportConfig,
    figs: FigureWriter,
) -> list[object]:
    """Up to ``compare_size`` images, alternating confident-correct and confident-wrong ones."""
    picks: list[Item] = []
    seen: set[int] = set()
    pools = [loaded["confident_correct"], loaded["confident_wrong"], loaded["least_confident"]]
    for i in range(max(map(len, pools), default=0)):
        for pool in pools:
            if i < len(pool) and pool[i].row not in seen and len(picks) < rc.compare_size:
                picks.append(pool[i])
                seen.add(pool[i].row)
    out: list[object] = [H.tag("h3", "Methods and layers side by side (same images)")]
    if not picks:
        return out + [H.para("No images to compare.", class_="muted")]
    fig = F.comparison_figure(picks, keys, names, rc.alpha, rc.colormap)
    out.append(H.img(figs.save(fig, "method_comparison"), "method comparison"))
    out.append(
        H.table(
            ["#", "index", "path", "true", "predicted", "confidence", "note"], _caption_rows(picks, names)
        )
    )
    return out


def means_section(
    cams: CamFile, scan: Scan, keys: Sequence[Key], rc: ReportConfig, figs: FigureWriter
) -> tuple[H.Raw, dict[str, Any]]:
    """Mean normalised map per class and (method, layer), upsampled to the input size."""
    size = input_size(cams)
    body: list[object] = [
        H.para(
            "Each panel averages the min-max normalised maps that explain class c over the images of "
            "class c (with targets=pred: the correctly classified ones); n is the number of maps."
        )
    ]
    classes = shown_classes(scan.confusion, rc.max_classes)
    body += _limit_note(cams.class_names, classes)
    summary: dict[str, Any] = {}
    for i, key in enumerate(keys):
        means = scan.class_means(key)[classes].astype(np.float32)
        shown = np.clip(upsample(means, size), 0, 1)
        fig = F.class_means_figure(
            shown, scan.class_counts[key][classes], [cams.class_names[c] for c in classes], rc.colormap
        )
        body += [
            H.tag("h3", f"{key[0]} at {key[1]}"),
            H.img(figs.save(fig, f"class_means_{i:02d}"), f"class means {key_name(key)}"),
        ]
        summary[key_name(key)] = {"counts": scan.class_counts[key].tolist()}
    return H.section("means", "Per-class mean CAMs", body), summary


# ----------------------------------------------------------------------------------------------
# Feature maps, filters, faithfulness


def features_section(cams: CamFile, rc: ReportConfig, figs: FigureWriter) -> H.Raw | None:
    """Channel grids of the first recorded image for each recorded layer, and first-layer filters."""
    layers = cams.activation_layers()
    filters = cams.filters()
    if not layers and filters is None:
        return None
    body: list[object] = []
    for i, layer in enumerate(layers):
        d = cams.dataset(f"activations/{layer}")
        if d.shape[0] == 0:
            continue
        acts = np.asarray(d[0, : rc.max_channels], dtype=np.float32)  # one image only: bounded
        index = int(cams.dataset("activations/index")[0])
        shown = f"{d.shape[1]} channels"
        if d.shape[1] > acts.shape[0]:
            shown = f"{acts.shape[0]} of {shown}"
        fig = F.feature_grid(
            acts, f"{layer}: {shown}, {d.shape[2]}x{d.shape[3]} (image {index})", rc.images_per_row
        )
        body += [
            H.tag("h3", f"{layer} ({shown}, item {index})"),
            H.img(figs.save(fig, f"features_{i:02d}"), f"feature maps of {layer}"),
        ]
    if filters is not None:
        shown_f = filters[: rc.max_channels]
        body += [
            H.tag("h3", f"First convolution: {len(shown_f)} of {len(filters)} filters"),
            H.img(
                figs.save(F.filter_grid(shown_f, rc.images_per_row), "first_conv_filters"),
                "first layer filters",
            ),
        ]
    return H.section("features", "Feature maps and filters", body)


def faithfulness_section(scan: Scan, figs: FigureWriter) -> tuple[H.Raw | None, dict[str, Any]]:
    """Deletion/insertion AUC histograms and the pointing-game rate, when they were exported."""
    if not scan.metrics:
        return None, {}
    rows, summary = [], {}
    for key, st in scan.metrics.items():
        entry: dict[str, Any] = {}
        for n in st.hist:
            mean = st.mean(n)
            entry[n] = None if mean is None else round(mean, 6)
        entry.update(
            pointing_rate=st.pointing_rate,
            pointing_n=st.pointing_total,
            hist={n: h.tolist() for n, h in st.hist.items()},
        )
        summary[key_name(key)] = entry
        rate = st.pointing_rate
        pointing = None if rate is None else f"{rate:.1%} of {st.pointing_total:,}"
        rows.append(
            (
                key[0],
                key[1],
                st.count.get("deletion_auc"),
                st.mean("deletion_auc"),
                st.mean("insertion_auc"),
                st.mean("energy_in_box"),
                pointing,
            )
        )
    body = [
        H.para(
            "Deletion AUC: lower is more faithful (removing the highlighted pixels first kills the "
            "score). Insertion AUC: higher is better. Pointing game: the map's peak lies in the "
            "object's box."
        ),
        H.table(
            ["method", "layer", "images", "deletion AUC", "insertion AUC", "energy in box", "pointing game"],
            rows,
        ),
        H.img(figs.save(F.faithfulness_figure(scan.metrics), "faithfulness"), "faithfulness histograms"),
    ]
    return H.section("faithfulness", "Faithfulness", body), summary
