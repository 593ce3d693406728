"""The report's "Can these maps be trusted?" section, from the HDF5 files alone (no model, no torch).

Four parts, each with one sentence of reading help, shown when their data exist:

* sanity checks (``cams/sanity.h5``, :mod:`cnncam.storage.sanity`): similarity curves as layers
  are randomised, example maps, the plain-words flag, and the permuted-label comparison;
* localisation with baselines: the pointing game (exact and 15 px) beside the centre-point
  baseline, energy-in-box beside the box-area baseline, on the same images
  (:mod:`cnncam.localisation`);
* ROAD MoRF / LeRF;
* deletion / insertion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.figure import Figure

from cnncam.errors import SchemaError
from cnncam.localisation import box_area_baseline, centre_baseline, pointing_tolerance
from cnncam.report import html as H
from cnncam.report import trust_figures as TF
from cnncam.storage import CamFile, metric_path
from cnncam.storage.sanity import SIMILARITIES, SanityData, read_sanity

log = logging.getLogger(__name__)
Key = tuple[str, str]
BOXES = "samples/boxes"
READ_ROWS = 65536  # rows per window: a few small columns only
LOCALISATION = ("pointing_hit", "pointing_hit_exact", "energy_in_box")
SCORES = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")


class Saver(Protocol):
    """What the section needs of the report's figure writer (``FigureWriter.save``)."""

    def save(self, fig: Figure, name: str) -> str: ...


@dataclass
class Column:
    """Running sum and count of one per-image value (NaN and fill values left out)."""

    total: float = 0.0
    count: int = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        self.total += float(v.sum())
        self.count += int(v.size)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class KeyStats:
    """Per (method, layer): every per-image metric, and the baselines over the same images."""

    columns: dict[str, Column] = field(default_factory=dict)

    def col(self, name: str) -> Column:
        return self.columns.setdefault(name, Column())


def read_optional_sanity(path: Path) -> tuple[SanityData | None, str | None]:
    """The sanity file if there is one; a damaged or foreign one becomes a note, not a failed report."""
    if not path.is_file():
        return None, None
    try:
        return read_sanity(path), None
    except SchemaError as e:
        log.warning("report: %s", e)
        return None, f"sanity checks not shown: {e}"


def metric_stats(cams: CamFile) -> dict[Key, KeyStats]:
    """One windowed pass over the per-image metrics (and boxes) of every (method, layer)."""
    have = set(cams.datasets())
    wanted = {
        (m, layer): [n for n in (*LOCALISATION, *SCORES) if metric_path(m, layer, n) in have]
        for m in cams.methods
        for layer in cams.layers
    }
    wanted = {k: v for k, v in wanted.items() if v}
    if not wanted:
        return {}
    h, w = (int(s) for s in cams.attrs["input_size"])
    tolerance = pointing_tolerance(h, w)
    names = [metric_path(*k, n) for k, ns in wanted.items() for n in ns]
    with_boxes = BOXES in have
    stats = {k: KeyStats() for k in wanted}
    for rows in cams.iter_rows([*names, *([BOXES] if with_boxes else [])], chunk=READ_ROWS):
        boxes = rows[BOXES] if with_boxes else None
        base = None
        if boxes is not None:
            base = {
                "centre": centre_baseline(boxes, h, w, tolerance),
                "centre_exact": centre_baseline(boxes, h, w, 0.0),
                "box_area": box_area_baseline(boxes, h, w),
            }
        for key, ns in wanted.items():
            _accumulate(stats[key], {n: rows[metric_path(*key, n)] for n in ns}, base)
    return stats


def _accumulate(st: KeyStats, values: dict[str, np.ndarray], base: dict[str, np.ndarray] | None) -> None:
    for name, v in values.items():
        if name.startswith("pointing_hit"):
            scored = (v == 0) | (v == 1)  # -1 no box, -128 fill value
            st.col(name).add(v[scored])
            if base is not None:
                st.col(name + ":baseline").add(
                    base["centre" if name == "pointing_hit" else "centre_exact"][scored]
                )
        elif name == "energy_in_box":
            scored = np.isfinite(v)
            st.col(name).add(v[scored])
            if base is not None:
                st.col(name + ":baseline").add(base["box_area"][scored])
        else:
            st.col(name).add(v)


# ----------------------------------------------------------------------------------------------
# The section


def trust_section(
    cams: CamFile | None, sanity: SanityData | None, note: str | None, figs: Saver, cmap: str
) -> tuple[H.Raw | None, dict[str, Any]]:
    """The HTML section and its ``summary.json`` entry; (None, {}) when there is nothing to show."""
    stats = metric_stats(cams) if cams is not None else {}
    body: list[object] = [H.note(note)] if note else []
    if sanity is not None and cams is not None:
        theirs, ours = sanity.attrs.get("checkpoint_sha256"), cams.attrs.get("checkpoint_sha256")
        if theirs != ours:
            body.append(
                H.note(
                    f"The sanity checks were run on another checkpoint (sha256 {str(theirs)[:12]}) than the "
                    f"CAM file ({str(ours)[:12]}): run `launch.py sanity` again for this one."
                )
            )
    summary: dict[str, Any] = {}
    if sanity is not None:
        part, summary["sanity"] = _sanity(sanity, figs, cmap)
        body += part
    if stats:
        part, summary["metrics"] = _metrics(stats)
        body += part
    if not body:
        return None, {}
    intro = H.para(
        "A heatmap that looks plausible is not evidence. These checks ask whether the maps depend on "
        "what the model learned, whether they beat trivial baselines, and whether the model's score "
        "follows them."
    )
    return H.section("trust", "Can these maps be trusted?", [intro, *body]), summary


def _fmt(value: float | None) -> object:
    return None if value is None or value != value else round(float(value), 4)


def _sanity(data: SanityData, figs: Saver, cmap: str) -> tuple[list[object], dict[str, Any]]:
    modes = [m for m in ("cascading", "independent") if m in data.model]
    depth, threshold, metric = (
        int(data.attrs["flag_depth"]),
        float(data.attrs["flag_threshold"]),
        data.attrs["flag_metric"],
    )
    top = ", ".join(data.units[: min(depth, len(data.units))])
    body: list[object] = [
        H.tag("h3", "Sanity check: randomise the model's weights"),
        H.para(
            "Reading help: a map that explains the model must change when its weights are replaced by "
            "random ones, so each curve should fall well below 1 as more layers are randomised from the "
            "top; a curve that stays high means the map shows the image, not what the model learned."
        ),
        H.para(
            f"{len(data.index)} images of the {data.attrs.get('split')} split; classes explained: "
            f"{data.attrs.get('targets')} of the trained model; units randomised from the top: "
            f"{', '.join(data.units)}.",
            class_="muted",
        ),
    ]
    verdicts, summary = [], {}
    for key in data.keys:
        name = f"{key[0]} at {key[1]}"
        after = data.curve("cascading", key, metric) if "cascading" in data.model else np.array([])
        value = float(after[min(depth, after.size) - 1]) if after.size else float("nan")
        bad = data.flagged(key)
        if bad:
            verdicts.append(
                H.tag(
                    "div",
                    f"Warning: {name} maps stay similar to the trained model's ({metric} {value:.2f} >= "
                    f"{threshold:g}) after the top {depth} unit(s) ({top}) are randomised. They do not "
                    "depend much on what the model learned; do not read them as explanations of its "
                    "decisions.",
                    class_="verdict overfitting",
                )
            )
        elif value == value:
            verdicts.append(
                H.tag(
                    "div",
                    f"{name}: maps change once the top {depth} unit(s) are randomised ({metric} falls to "
                    f"{value:.2f} < {threshold:g}): passes.",
                    class_="verdict healthy",
                )
            )
        summary[f"{key[0]}/{key[1]}"] = {
            "flagged": bad,
            "after_top": _fmt(value),
            **{
                f"{mode}_{s}": [_fmt(v) for v in data.curve(mode, key, s)]
                for mode in modes
                for s in SIMILARITIES
            },
        }
    body += verdicts
    if modes:
        body.append(H.img(figs.save(TF.sanity_curves(data, modes), "sanity_curves"), "sanity curves"))
        rows = [
            (
                key[0],
                key[1],
                *(_fmt(data.curve(mode, key, s)[-1]) for mode in modes[:1] for s in SIMILARITIES),
            )
            for key in data.keys
        ]
        headers = ["method", "layer", *(f"{SIM_HEAD[s]} (all {modes[0]})" for s in SIMILARITIES)]
        body += [H.tag("h4", "Mean similarity with every unit randomised"), H.table(headers, rows)]
    if len(data.images) and modes:
        body.append(H.tag("h4", f"Example maps as units are randomised ({modes[0]})"))
        for i, key in enumerate(data.keys):
            fig = TF.sanity_examples(data, key, modes[0], cmap)
            body.append(H.img(figs.save(fig, f"sanity_examples_{i:02d}"), f"sanity examples {key[0]}"))
    if data.data:
        body += _data_test(data, figs, cmap, summary)
    body.append(H.para(f"What is randomised: {data.attrs.get('randomisation', '')}", class_="muted"))
    return body, summary


SIM_HEAD = {"spearman_abs": "Spearman |map|", "spearman": "Spearman signed", "ssim": "SSIM"}


def _data_test(data: SanityData, figs: Saver, cmap: str, summary: dict[str, Any]) -> list[object]:
    threshold, metric = float(data.attrs["flag_threshold"]), str(data.attrs["flag_metric"])
    rows = []
    for key, values in data.data.items():
        means = {s: _mean(values[s]) for s in SIMILARITIES}
        chosen = means[metric]
        similar = chosen is not None and chosen >= threshold
        rows.append(
            (key[0], key[1], *(_fmt(means[s]) for s in SIMILARITIES), "yes: suspicious" if similar else "no")
        )
        summary.setdefault(f"{key[0]}/{key[1]}", {})["data_test"] = {s: _fmt(means[s]) for s in SIMILARITIES}
    body: list[object] = [
        H.tag("h3", "Sanity check: train on permuted labels"),
        H.para(
            "Reading help: the same network trained on shuffled labels learned nothing about the "
            "classes, so its maps should look unlike the trained model's; similar maps follow the image, "
            "not the model."
        ),
        H.para(f"Permuted-label run: {data.attrs.get('permuted_run', '')}", class_="muted"),
        H.table(
            ["method", "layer", *(SIM_HEAD[s] for s in SIMILARITIES), f"{metric} >= {threshold:g}"], rows
        ),
    ]
    if len(data.images):
        fig = TF.data_examples(data, list(data.data), cmap)
        body.append(H.img(figs.save(fig, "sanity_data_examples"), "permuted-label comparison"))
    return body


def _mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _metrics(stats: dict[Key, KeyStats]) -> tuple[list[object], dict[str, Any]]:
    body: list[object] = []
    summary = {
        f"{k[0]}/{k[1]}": {n: {"mean": _fmt(c.mean), "n": c.count} for n, c in st.columns.items()}
        for k, st in stats.items()
    }
    for title, reading, headers, selector, row in _PARTS:
        keys = [k for k, st in stats.items() if selector in st.columns]
        if keys:
            rows = [(k[0], k[1], *row(stats[k])) for k in keys]
            body += [
                H.tag("h3", title),
                H.para(reading),
                H.table(["method", "layer", "images", *headers], rows),
            ]
    return body, summary


def _diff(a: float | None, b: float | None) -> object:
    return None if a is None or b is None else round(a - b, 4)


def _loc_row(st: KeyStats) -> tuple[object, ...]:
    c = st.columns
    names = ("pointing_hit", "pointing_hit_exact", "energy_in_box")
    values = [_fmt(c[n].mean) if n in c else None for m in names for n in (m, m + ":baseline")]
    return (max((c[n].count for n in names if n in c), default=0), *values)


def _pair_row(st: KeyStats, first: str, second: str) -> tuple[object, ...]:
    a, b = st.col(first).mean, st.col(second).mean
    return (st.col(first).count, _fmt(a), _fmt(b), _diff(b, a))


# (title, reading help, headers after method/layer/images, the metric that selects a key, row builder)
_PARTS: tuple[tuple[str, str, tuple[str, ...], str, Callable[[KeyStats], tuple[object, ...]]], ...] = (
    (
        "Localisation, beside trivial baselines",
        "Reading help: a localisation score means something only above its baseline on the same images: "
        "always pointing at the image centre, or a flat map that spreads its energy evenly; a method at or "
        "below its baseline localises no better than a guess.",
        ("pointing (15 px)", "centre baseline", "pointing (exact)", "centre baseline (exact)",
         "energy in box", "box-area baseline"),
        "pointing_hit",
        _loc_row,
    ),
    (
        "ROAD (remove and debias)",
        "Reading help: the pixels a faithful map ranks highest carry the class, so removing them first "
        "(MoRF) should drop the class probability far more than removing the lowest-ranked first (LeRF); "
        "the gap LeRF - MoRF should be clearly above 0.",
        ("MoRF (lower is better)", "LeRF (higher is better)", "LeRF - MoRF"),
        "road_morf",
        lambda st: _pair_row(st, "road_morf", "road_lerf"),
    ),
    (
        "Deletion and insertion",
        "Reading help: deleting the map's top pixels first should kill the class score quickly (low "
        "deletion AUC) and revealing them first should restore it quickly (high insertion AUC); insertion "
        "minus deletion near 0 means the ranking says little.",
        ("deletion AUC", "insertion AUC", "insertion - deletion"),
        "deletion_auc",
        lambda st: _pair_row(st, "deletion_auc", "insertion_auc"),
    ),
)  # fmt: skip
