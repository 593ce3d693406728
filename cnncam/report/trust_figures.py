"""Figures of the report's "Can these maps be trusted?" section: arrays in, matplotlib figures out.

No torch: maps are shown as stored (signed, at the layer's resolution) after the display
convention of the rest of the report, ReLU then per-map min-max, and matplotlib's bilinear
resampling stretches them over the input image's extent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cnncam.report.figures import image_grid, label, new_figure
from cnncam.storage.sanity import SIMILARITIES, SanityData

Key = tuple[str, str]
SIM_TITLES = {
    "spearman_abs": "Spearman, |map|",
    "spearman": "Spearman, signed map",
    "ssim": "SSIM of the displayed map",
}
MAX_STEP_COLUMNS = 8  # example rows show at most this many randomisation steps


def display(signed: np.ndarray) -> np.ndarray:
    """(..., h, w) signed maps -> ReLU, per-map min-max to [0, 1] (the report's display convention)."""
    m = np.nan_to_num(np.clip(np.asarray(signed, dtype=np.float64), 0, None))
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return (m - lo) / (hi - lo + 1e-12)


def sanity_curves(data: SanityData, modes: Sequence[str]) -> Figure:
    """Rows = modes, columns = similarity measures; one line per (method, layer) over the steps."""
    fig = new_figure(4.2 * len(SIMILARITIES), 3.2 * max(len(modes), 1))
    axes = np.asarray(fig.subplots(max(len(modes), 1), len(SIMILARITIES), squeeze=False))
    steps = np.arange(len(data.units) + 1)
    threshold, depth = float(data.attrs["flag_threshold"]), int(data.attrs["flag_depth"])
    for row, mode in zip(axes, modes):
        for ax, sim in zip(row, SIMILARITIES):
            for key in data.keys:
                curve = np.concatenate([[1.0], data.curve(mode, key, sim)])  # step 0: the trained model
                ax.plot(steps, curve, "o-", ms=3, label=label(f"{key[0]} @ {key[1]}", 40))
            if sim == data.attrs["flag_metric"] and mode == "cascading":
                ax.axhline(threshold, color="tab:red", ls=":", lw=1, label="flag threshold")
                ax.axvline(min(depth, len(data.units)), color="grey", ls=":", lw=1)
            ax.set(
                title=f"{mode}: {SIM_TITLES[sim]}", xlabel="units randomised (top first)", ylim=(-1.05, 1.05)
            )
            ax.set_xticks(
                steps, ["none", *(_short(u) for u in data.units)], rotation=60, ha="right", fontsize=6
            )
            ax.grid(True, alpha=0.3)
        row[0].legend(fontsize=7)
    return fig


def _short(unit: str) -> str:
    return label(unit.split(" + ")[0], 24)


def _show(ax: Axes, m: np.ndarray, title: str, extent: tuple[float, float, float, float], cmap: str) -> None:
    ax.imshow(display(m), cmap=cmap, vmin=0, vmax=1, interpolation="bilinear", extent=extent)
    ax.set_axis_off()
    ax.set_title(label(title, 28), fontsize=7)


def sanity_examples(data: SanityData, key: Key, mode: str, cmap: str) -> Figure:
    """Rows = example images; columns = input, trained model's map, then maps after chosen steps."""
    n_steps = len(data.units)
    shown = np.unique(np.linspace(0, n_steps - 1, min(n_steps, MAX_STEP_COLUMNS)).round().astype(int))
    images = data.images
    rows = max(len(images), 1)
    fig, axes = image_grid(rows, 2 + len(shown), 1.3, 1.3)
    h, w = images.shape[1:3] if len(images) else (1, 1)
    extent = (0.0, float(w), float(h), 0.0)
    examples = data.model[mode][key]["examples"]
    for i, ax_row in enumerate(axes[: len(images)]):
        ax_row[0].imshow(images[i], extent=extent)
        ax_row[0].set_axis_off()
        ax_row[0].set_title(f"item {int(data.index[i])}", fontsize=7)
        _show(ax_row[1], data.original[key][i], "trained", extent, cmap)
        for ax, step in zip(ax_row[2:], shown):
            _show(ax, examples[step, i], f"{step + 1}: {_short(data.units[step])}", extent, cmap)
    return fig


def data_examples(data: SanityData, keys: Sequence[Key], cmap: str) -> Figure:
    """Rows = example images; columns = input, then per (method, layer): trained vs permuted-label maps."""
    images = data.images
    fig, axes = image_grid(max(len(images), 1), 1 + 2 * len(keys), 1.3, 1.3)
    h, w = images.shape[1:3] if len(images) else (1, 1)
    extent = (0.0, float(w), float(h), 0.0)
    for i, ax_row in enumerate(axes[: len(images)]):
        ax_row[0].imshow(images[i], extent=extent)
        ax_row[0].set_axis_off()
        ax_row[0].set_title(f"item {int(data.index[i])}", fontsize=7)
        for j, key in enumerate(keys):
            _show(ax_row[1 + 2 * j], data.original[key][i], f"{key[0]}: trained", extent, cmap)
            _show(
                ax_row[2 + 2 * j], data.data[key]["examples"][i], f"{key[0]}: permuted labels", extent, cmap
            )
    return fig
