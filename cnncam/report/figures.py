"""Pure functions: arrays in, ``matplotlib.figure.Figure`` out (object API, no pyplot state).

Nothing here reads files or touches global matplotlib state, so figures can be built in any
thread or process, headless (``FigureCanvasAgg``).  Layouts follow the seeds: the 3-panel
image / heatmap / overlay row (jet, ``alpha`` blend), 16 feature maps per row (viridis).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnncam.report.diagnose import Curves, Diagnosis
from cnncam.report.imaging import overlay
from cnncam.report.items import Item
from cnncam.report.select import AUC_METRICS, HIST_BINS, MetricStats

Key = tuple[str, str]  # (method, layer)
PANEL_IN = 2.2  # inches per gallery panel


def new_figure(
    width: float, height: float, layout: Literal["constrained", "compressed", "tight"] | None = "constrained"
) -> Figure:
    """A figure attached to an Agg canvas (headless; no pyplot figure manager)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def image_grid(rows: int, cols: int, panel_w: float, panel_h: float) -> tuple[Figure, np.ndarray]:
    """A rows x cols grid of image axes with fixed margins: no constrained layout, which costs
    more than the drawing itself for grids of images with axes off."""
    title_in = 0.32  # room for a one-line 8 pt title above each row
    fig = new_figure(cols * panel_w, rows * (panel_h + title_in) + 0.1, layout=None)
    height = rows * (panel_h + title_in) + 0.1
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.05 / height,
        top=1 - (title_in + 0.05) / height,
        wspace=0.04,
        hspace=title_in / panel_h,
    )
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def save_png(fig: Figure, path: Path, dpi: int) -> None:
    """Render ``fig`` to ``path`` as PNG (the caller owns the folder and its atomicity)."""
    fig.savefig(path, format="png", dpi=dpi)


def label(text: object, limit: int = 40) -> str:
    """Data text for matplotlib: '$' would start mathtext (and can raise), so escape it."""
    s = str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _blank(ax: Axes, note: str = "") -> None:
    ax.set_axis_off()
    if note:
        ax.text(
            0.5, 0.5, label(note, 60), ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes
        )


# ----------------------------------------------------------------------------------------------
# Learning curves and confusion matrix


def learning_curves(c: Curves, diag: Diagnosis | None = None) -> Figure:
    """2x2: per-iteration loss, learning rate, per-epoch loss and accuracy (train vs validation)."""
    fig = new_figure(11, 7.5)
    (a_it, a_lr), (a_loss, a_acc) = fig.subplots(2, 2)
    if c.iter_loss:
        a_it.plot(c.iter_epoch, c.iter_loss, lw=0.8, alpha=0.8, label="train (per logged iteration)")
        a_it.legend(fontsize=8)
    else:
        _blank(a_it, "no iteration records")
    a_it.set(title="Training loss per iteration", xlabel="epoch", ylabel="loss")
    xs, ys = (c.iter_epoch, c.iter_lr) if c.iter_lr else (c.epochs, c.lr)
    if any(math.isfinite(y) for y in ys):
        a_lr.plot(xs, ys, color="tab:purple")
        if all(y > 0 for y in ys if math.isfinite(y)) and max(ys) / max(min(ys), 1e-30) > 50:
            a_lr.set_yscale("log")
    a_lr.set(title="Learning rate", xlabel="epoch", ylabel="lr")
    panels = ((a_loss, c.train_loss, c.val_loss, "loss"), (a_acc, c.train_acc, c.val_acc, "accuracy"))
    for ax, tr, va, name in panels:
        ax.plot(c.epochs, tr, "o-", ms=3, label=f"train {name}")
        if va:
            ax.plot(c.epochs, va, "o-", ms=3, label=f"validation {name}")
        if diag is not None and diag.best_val_epoch is not None:
            ax.axvline(diag.best_val_epoch, color="grey", ls=":", label="lowest validation loss")
        if diag is not None and diag.onset_epoch is not None:
            ax.axvspan(diag.onset_epoch, max(c.epochs), color="tab:red", alpha=0.08, label="over-fitting")
        ax.set(title=f"{name.capitalize()} per epoch", xlabel="epoch", ylabel=name)
        ax.legend(fontsize=8)
    if c.test_accuracy is not None:
        a_acc.axhline(c.test_accuracy, color="k", ls="--", lw=0.8, label="test (best epoch)")
        a_acc.legend(fontsize=8)
    for ax in (a_it, a_lr, a_loss, a_acc):
        ax.grid(True, alpha=0.3)
    return fig


def confusion_figure(matrix: np.ndarray, names: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall) confusion matrices side by side; (C, C) [true, pred]."""
    n = len(names)
    side = min(max(4.0, 0.45 * n + 2), 16)
    fig = new_figure(2 * side + 1, side)
    axes = fig.subplots(1, 2)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    ticks = [label(x, 18) for x in names]
    panels = ((axes[0], matrix, "Counts", "d"), (axes[1], norm, "Row-normalised (recall)", ".2f"))
    for ax, data, title, fmt in panels:
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(float(data.max()), 1e-12) if fmt == "d" else 1)
        fig.colorbar(im, ax=ax, shrink=0.8)
        show_ticks = n <= 40
        pos, text, size = (range(n), ticks, max(5, 10 - n // 8)) if show_ticks else ([], [], 8)
        ax.set_xticks(pos, text, rotation=60, ha="right", fontsize=size)
        ax.set_yticks(pos, text, fontsize=size)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        if n <= 15:
            top = float(data.max()) or 1.0
            for (i, j), v in np.ndenumerate(data):
                ax.text(
                    j,
                    i,
                    format(v, fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v > 0.6 * top else "black",
                )
    return fig


# ----------------------------------------------------------------------------------------------
# CAM galleries


def gallery_figure(items: Sequence[Item], key: Key, names: Sequence[str], alpha: float, cmap: str) -> Figure:
    """One row per item, the seeds' 3 panels: image, heatmap, overlay (heatmap only without image)."""
    fig, axes = image_grid(max(len(items), 1), 3, PANEL_IN, PANEL_IN)
    for ax_row, it in zip(axes, items):
        m = it.map01[key]
        mark = "✓" if it.correct else "✗"
        if it.image is not None:
            ax_row[0].imshow(it.image)
            ax_row[0].set_axis_off()
        else:
            _blank(ax_row[0], it.note or "image not available")
        ax_row[0].set_title(label(f"true: {names[it.label]}", 30), fontsize=8)
        ax_row[1].imshow(m, cmap=cmap, vmin=0, vmax=1)
        ax_row[1].set_axis_off()
        ax_row[1].set_title(label(f"explains: {names[it.explained]}", 30), fontsize=8)
        if it.image is not None:
            ax_row[2].imshow(overlay(it.image, m, alpha, cmap))
            ax_row[2].set_axis_off()
        else:
            _blank(ax_row[2], "heatmap only")
        ax_row[2].set_title(label(f"{mark} pred: {names[it.pred]} ({it.confidence:.0%})", 30), fontsize=8)
    if not items:
        for ax in axes.ravel():
            _blank(ax)
    return fig


def comparison_figure(
    items: Sequence[Item], keys: Sequence[Key], names: Sequence[str], alpha: float, cmap: str
) -> Figure:
    """Rows = items; columns = the image, then one overlay per (method, layer) for the same image."""
    n_rows, n_cols = max(len(items), 1), 1 + len(keys)
    fig, axes = image_grid(n_rows, n_cols, PANEL_IN * 0.9, PANEL_IN * 0.9)
    for ax_row, it in zip(axes, items):
        if it.image is not None:
            ax_row[0].imshow(it.image)
            ax_row[0].set_axis_off()
        else:
            _blank(ax_row[0], "image not available")
        ax_row[0].set_title(label(f"{names[it.label]} → {names[it.pred]}", 26), fontsize=8)
        for ax, key in zip(ax_row[1:], keys):
            m = it.map01[key]
            ax.imshow(
                overlay(it.image, m, alpha, cmap) if it.image is not None else m,
                cmap=None if it.image is not None else cmap,
                vmin=0,
                vmax=1,
            )
            ax.set_axis_off()
            ax.set_title(label(f"{key[0]} @ {key[1]}", 28), fontsize=7)
    return fig


def class_means_figure(
    means: np.ndarray, counts: np.ndarray, names: Sequence[str], cmap: str, per_row: int = 8
) -> Figure:
    """Per-class mean maps (C, H, W) in [0, 1], one panel per class titled with its map count."""
    n = len(names)
    cols = max(1, min(n, per_row))
    rows = max(1, math.ceil(n / cols))
    fig, grid = image_grid(rows, cols, 1.6, 1.6)
    axes = grid.ravel()
    for c, ax in enumerate(axes):
        if c >= n:
            _blank(ax)
            continue
        if counts[c] > 0:
            ax.imshow(means[c], cmap=cmap, vmin=0, vmax=1)
            ax.set_axis_off()
        else:
            _blank(ax, "no maps")
        ax.set_title(label(f"{names[c]} (n={int(counts[c])})", 22), fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# Feature maps, filters, faithfulness


def _tile(tiles: np.ndarray, per_row: int) -> np.ndarray:
    """(n, h, w[, 3]) -> one grid image with ``per_row`` columns and 1-pixel NaN gaps."""
    n, h, w = tiles.shape[:3]
    cols = max(1, min(per_row, n))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *tiles.shape[3:]), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tiles[i]
    return grid


def standardize_channels(acts: np.ndarray) -> np.ndarray:
    """The seeds' display scaling per channel: (x - mean) / std * 64 + 128, clipped to 0..255.

    (C, h, w) -> (C, h, w) float32; a constant channel becomes a flat 128.
    """
    a = acts.astype(np.float64)
    mean = a.mean(axis=(1, 2), keepdims=True)
    std = a.std(axis=(1, 2), keepdims=True)
    out = (a - mean) / np.where(std > 0, std, 1.0) * 64 + 128
    return np.clip(out, 0, 255).astype(np.float32)


def _grid_figure(
    grid: np.ndarray, title: str, tiles_per_row: int, tile_in: float, vrange: tuple[float, float] = (0.0, 1.0)
) -> Figure:
    """One image (a tiled grid; NaN gaps shown white) filling the figure under a one-line title."""
    title_in = 0.35
    width = max(2.5, tile_in * tiles_per_row)
    img_h = width * grid.shape[0] / grid.shape[1]
    fig = new_figure(width, img_h + title_in, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, img_h / (img_h + title_in)))
    if grid.ndim == 3:  # RGB has no "bad" colour: paint the gaps white
        ax.imshow(np.where(np.isnan(grid), 1.0, grid), interpolation="nearest", aspect="auto")
    else:
        cm = matplotlib.colormaps["viridis"].with_extremes(bad="white")
        ax.imshow(grid, cmap=cm, interpolation="nearest", aspect="auto", vmin=vrange[0], vmax=vrange[1])
    ax.set_axis_off()
    fig.text(
        0.5, 1 - 0.5 * title_in / (img_h + title_in), label(title, 90), ha="center", va="center", fontsize=9
    )
    return fig


def feature_grid(acts: np.ndarray, title: str, per_row: int = 16) -> Figure:
    """Every channel of one image's activations (C, h, w) as a grid (viridis, like the seeds)."""
    grid = _tile(standardize_channels(np.nan_to_num(acts)), per_row)
    return _grid_figure(grid, title, min(per_row, len(acts)), 0.9, (0.0, 255.0))


def filter_grid(filters: np.ndarray, per_row: int = 16) -> Figure:
    """First-layer filters (O, I, kh, kw): RGB tiles when I == 3, else the channel mean (viridis).

    Each filter is min-max scaled on its own, the usual way to show what it responds to.
    """
    f = np.nan_to_num(filters.astype(np.float64))
    tiles = f.transpose(0, 2, 3, 1) if f.shape[1] == 3 else f.mean(axis=1)
    axes_ = tuple(range(1, tiles.ndim))
    lo, hi = tiles.min(axis=axes_, keepdims=True), tiles.max(axis=axes_, keepdims=True)
    tiles = (tiles - lo) / np.where(hi > lo, hi - lo, 1.0)
    grid = _tile(tiles.astype(np.float32), per_row)
    title = f"First conv layer: {f.shape[0]} filters of {f.shape[1]}x{f.shape[2]}x{f.shape[3]}"
    return _grid_figure(grid, title, min(per_row, len(f)), 0.45)


def faithfulness_figure(stats: Mapping[Key, MetricStats]) -> Figure:
    """Histograms of deletion AUC (lower = more faithful), insertion AUC (higher) and box energy."""
    keys = list(stats)
    cols = [m for m in AUC_METRICS if any(m in stats[k].hist for k in keys)]
    fig = new_figure(3.6 * max(len(cols), 1), 2.6 * max(len(keys), 1))
    axes = np.asarray(fig.subplots(max(len(keys), 1), max(len(cols), 1), squeeze=False))
    width = np.diff(HIST_BINS)
    for ax_row, key in zip(axes, keys):
        for ax, name in zip(ax_row, cols):
            st = stats[key]
            if name not in st.hist:
                _blank(ax, "not recorded")
                continue
            ax.bar(HIST_BINS[:-1], st.hist[name], width=width, align="edge", edgecolor="white")
            mean = st.mean(name)
            ax.set_title(
                label(
                    f"{key[0]} @ {key[1]}\n{name} (mean {mean:.3f})"
                    if mean is not None
                    else f"{key[0]} @ {key[1]}\n{name}",
                    60,
                ),
                fontsize=8,
            )
            ax.set(xlim=(0, 1), xlabel=name, ylabel="images")
    return fig
