"""``build_report``: a run directory (+ its CAM file) -> ``report/index.html`` with PNG figures.

Needs no model and no GPU: only ``config.yaml``, ``metrics.jsonl``, the small run files and the
HDF5 export, read in bounded-memory windows (:mod:`cnncam.report.select`).

Atomicity: figures go to a fresh ``figures-<build id>/`` folder, then ``summary.json`` and
``index.html`` are replaced atomically (``cnncam.runs.atomic_write_text``), and only then are
older ``figures-*`` folders removed.  A crash at any point leaves the previous report intact.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cnncam.config import ReportConfig, RunConfig, load_config
from cnncam.errors import CamError, ConfigError, SchemaError
from cnncam.export_only import export_only_facts, is_export_only
from cnncam.report import html as H
from cnncam.report import sections as S
from cnncam.report import summary as R
from cnncam.report.diagnose import Curves, curves, diagnose
from cnncam.report.imaging import colormap_lut
from cnncam.report.select import scan
from cnncam.report.trust import read_optional_sanity, trust_section
from cnncam.runs import (
    RunPaths,
    atomic_write_json,
    atomic_write_text,
    cams_dir,
    load_run,
    read_classes,
    read_metrics,
    require_run_folder,
)
from cnncam.storage import MERGED_FILENAME, CamFile, open_cams
from cnncam.storage.sanity import SANITY_FILENAME

log = logging.getLogger(__name__)
# Export-only runs (issue 10): rows of the run facts that describe training, left out with a note.
TRAINING_FACTS = frozenset({"optimizer", "augmentation", "epochs", "best epoch", "monitor", "test accuracy"})
EXPORT_ONLY_NOTE = (
    "Export-only run: the model was trained outside cnncam (its weights file is named in the summary), "
    "so there are no learning curves, training settings or test predictions from training; "
    "the classification results come from the CAM export."
)
FIGURE_DIR = re.compile(r"^figures-\d{8}T\d{6}-[0-9a-f]{8}$")


def build_report(
    run_dir: Path,
    cams: Path | None = None,
    out: Path | None = None,
    cfg: ReportConfig | None = None,
    run_cfg: RunConfig | None = None,
) -> Path:
    """Build the offline report of ``run_dir`` and return the path of its ``index.html``.

    Parameters
    ----------
    run_dir : a cnncam run directory (``config.yaml`` required; everything else optional).  Its
        files are read from where it is now: a copied or moved run never reads the original's.
    cams : CAM file to show (merged ``cams.h5`` or one part); None = ``cams.h5`` in ``cam.out`` (default
        ``<run>/cams``) if present, else a report without CAMs.
    out : output folder; None = ``<run>/report``.
    cfg : report settings; None = the run config's ``report`` section.
    run_cfg : the run's config as the caller resolved it (the CLI's ``--set cam.out=...``,
        ``data.root=...``); None = ``config.yaml`` of ``run_dir``.
    """
    if run_cfg is None:
        run_cfg, paths = load_run(run_dir)
    else:
        paths = require_run_folder(run_dir)
    saved_runs_dir = _saved_runs_dir(paths)
    rc = cfg if cfg is not None else run_cfg.report
    try:
        colormap_lut(rc.colormap)
    except CamError as e:
        raise ConfigError(f"report.colormap: {e}") from None
    out = Path(out) if out is not None else paths.report
    cams_path = Path(cams) if cams is not None else _default_cams(run_cfg, paths)
    out.mkdir(parents=True, exist_ok=True)
    build_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.urandom(4).hex()}"
    figs = S.FigureWriter(out / f"figures-{build_id}", rc.dpi)
    try:
        sections, summary = _build(run_cfg, paths, cams_path, rc, figs, saved_runs_dir)
        summary.update(
            build=build_id,
            generated_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            figures=list(figs.written),
        )
        atomic_write_json(out / "summary.json", _plain(summary))
        subtitle = f"{paths.root} · generated {summary['generated_utc']}"
        atomic_write_text(out / "index.html", H.page(f"cnncam report: {run_cfg.name}", subtitle, sections))
    except BaseException:
        shutil.rmtree(figs.folder, ignore_errors=True)
        raise
    _remove_old_figures(out, keep=figs.folder.name)
    log.info("report written to %s (%d figures)", out / "index.html", len(figs.written))
    return out / "index.html"


def _default_cams(cfg: RunConfig, paths: RunPaths) -> Path | None:
    """``cams.h5`` where the export writes it (``cam.out``, else ``<run>/cams``), if it exists."""
    merged = cams_dir(cfg) / MERGED_FILENAME
    return merged if merged.is_file() else None


def _saved_runs_dir(paths: RunPaths) -> str:
    """``runs_dir`` as saved in config.yaml (the CLI's folder wins over it, but a relative
    ``data.root`` was relative to the folder that held it)."""
    return load_config(paths.config).runs_dir


def _build(
    cfg: RunConfig,
    paths: RunPaths,
    cams_path: Path | None,
    rc: ReportConfig,
    figs: S.FigureWriter,
    saved_runs_dir: str,
) -> tuple[list[tuple[str, str, H.Raw]], dict[str, Any]]:
    records = read_metrics(paths.metrics) if paths.metrics.is_file() else []
    c = curves(records)
    diag = diagnose(records, cfg.train, cfg.data, cfg.model)
    summary: dict[str, Any] = {"run": cfg.name, "diagnosis": diag.to_dict(), "notes": []}
    training = not is_export_only(paths)  # issue 10: a model trained elsewhere has no training sections
    if not training:
        summary["export_only"] = True
        summary["notes"].append(EXPORT_ONLY_NOTE)
    sections: list[tuple[str, str, H.Raw]] = []
    if cams_path is None:
        summary["notes"].append("no CAM file: the report shows curves and predictions.csv only")
        names = _class_names(paths, None)
        sections.append(("summary", "Summary", _summary(cfg, paths, c, names, None, None, summary["notes"])))
        if training:
            sections.append(("curves", "Curves", S.curves_section(c, diag, figs)))
        conf = _confusion_fallback(paths, names)
        if conf is not None:
            source = "predictions.csv (test split)"
            html, summary["confusion"] = S.classification_section(conf, names, source, figs)
            sections.append(("classification", "Confusion", html))
        summary["classes"] = names
        _trust(sections, summary, cfg, None, rc, figs)
        return sections, summary
    with open_cams(cams_path) as cams:
        names = _class_names(paths, cams)
        summary["classes"] = names
        summary["notes"] += R.foreign_cam_notes(cfg, paths, cams)
        if cams.n_items == 0:
            summary["notes"].append(f"{cams_path} holds no items")
            facts = _summary(cfg, paths, c, names, cams, None, summary["notes"])
            sections.append(("summary", "Summary", facts))
            if training:
                sections.append(("curves", "Curves", S.curves_section(c, diag, figs)))
            return sections, summary
        keys = [(m, layer) for m in cams.methods for layer in cams.layers]
        log.info("report: scanning %d items of %s", cams.n_items, cams_path)
        result = scan(cams, rc.gallery_size, rc.per_class, keys)
        sections.append(
            ("summary", "Summary", _summary(cfg, paths, c, names, cams, result.confusion, summary["notes"]))
        )
        if training:
            sections.append(("curves", "Curves", S.curves_section(c, diag, figs)))
        source = f"{cams_path.name} ({cams.attrs.get('split')} split)"
        html, summary["confusion"] = S.classification_section(result.confusion, names, source, figs)
        sections.append(("classification", "Confusion", html))
        root = image_root(cfg, paths, saved_runs_dir)
        html, galleries = S.gallery_section(cams, result, keys, rc, cfg.data, root, figs)
        sections.append(("galleries", "Galleries", html))
        summary["notes"] += R.outside_root_notes(galleries)
        html, means = S.means_section(cams, result, keys, rc, figs)
        sections.append(("means", "Class means", html))
        features = S.features_section(cams, rc, figs)
        if features is not None:
            sections.append(("features", "Feature maps", features))
        faith, faith_summary = S.faithfulness_section(result, figs)
        if faith is not None:
            sections.append(("faithfulness", "Faithfulness", faith))
        summary["cams"] = {
            "path": str(cams_path),
            "n_items": result.n_items,
            "split": cams.attrs.get("split"),
            "methods": cams.methods,
            "layers": cams.layers,
            "targets": cams.attrs.get("targets"),
            "galleries": galleries,
            "class_means": means,
            "faithfulness": faith_summary,
        }
        _trust(sections, summary, cfg, cams, rc, figs)
    return sections, summary


def _trust(
    sections: list[tuple[str, str, H.Raw]],
    summary: dict[str, Any],
    cfg: RunConfig,
    cams: CamFile | None,
    rc: ReportConfig,
    figs: S.FigureWriter,
) -> None:
    """The "Can these maps be trusted?" section (cnncam.report.trust), when there is anything to show."""
    sanity, note = read_optional_sanity(cams_dir(cfg) / SANITY_FILENAME)
    html, summary["trust"] = trust_section(cams, sanity, note, figs, rc.colormap)
    if html is not None:
        sections.append(("trust", "Trust", html))


def image_root(cfg: RunConfig, paths: RunPaths, saved_runs_dir: str | None = None) -> Path:
    """``data.root``; a relative root that does not exist from here is tried relative to the
    folder that held ``runs_dir`` (the report may run from another working directory).
    ``saved_runs_dir``: the runs_dir the run was trained with (default ``cfg.runs_dir``)."""
    root = Path(cfg.data.root)
    runs_dir = Path(saved_runs_dir if saved_runs_dir is not None else cfg.runs_dir)
    if root.is_absolute() or root.is_dir() or runs_dir.is_absolute():
        return root
    base = paths.root.resolve()
    for _ in range(len(runs_dir.parts) + 1):  # <base>/<runs_dir>/<name> -> <base>
        base = base.parent
    return base / root if (base / root).is_dir() else root


def _class_names(paths: RunPaths, cams: CamFile | None) -> list[str]:
    """Class names from the CAM file, else classes.json, else confusion_matrix.json.

    A CAM file whose classes differ from the run's ``classes.json`` belongs to another run: its
    tables would be mixed with this run's split counts, so it is refused.
    """
    from_run = read_classes(paths) if paths.classes.is_file() else None
    if cams is not None:
        if from_run is not None and from_run != cams.class_names:
            raise SchemaError(
                f"{cams.path}: its classes {cams.class_names} differ from {paths.classes} {from_run}; "
                "it belongs to another run. Pass this run's own CAM file (--cams) or none."
            )
        return cams.class_names
    if from_run is not None:
        return from_run
    conf = R.read_optional_json(paths.confusion)
    return list(conf.get("classes", [])) if isinstance(conf, dict) else []


def _confusion_fallback(paths: RunPaths, names: list[str]) -> np.ndarray | None:
    if paths.predictions.is_file() and names:
        return R.confusion_from_predictions(paths.predictions, len(names))
    return None


def _summary(
    cfg: RunConfig,
    paths: RunPaths,
    c: Curves,
    names: list[str],
    cams: CamFile | None,
    conf: np.ndarray | None,
    notes: list[str],
) -> H.Raw:
    """Run facts, class counts per split, provenance and jobs."""
    facts = R.run_facts(cfg, paths, c.best_epoch, len(c.epochs), c.test_accuracy)
    if is_export_only(paths):
        facts = [f for f in facts if f[0] not in TRAINING_FACTS] + export_only_facts(paths)
    if cams is not None:
        facts.append(
            (
                "CAM file",
                f"{cams.path} ({cams.n_items:,} items, {cams.attrs.get('split')} split, "
                f"methods {', '.join(cams.methods)}, layers {', '.join(cams.layers)})",
            )
        )
    body: list[object] = [H.kv_table(facts)]
    counts = R.split_counts(paths, len(names))
    headers = ["class", *counts]
    columns = list(counts.values())
    if conf is not None:
        headers.append(f"CAM file ({cams.attrs.get('split') if cams else ''})")
        columns.append(conf.sum(axis=1).tolist())
    if names:
        body += [
            H.tag("h3", f"Classes ({len(names)})"),
            H.table(headers, ([n, *(col[i] for col in columns)] for i, n in enumerate(names))),
        ]
    body += [H.tag("h3", "Provenance"), H.kv_table(R.provenance_facts(paths, cams.attrs if cams else None))]
    jobs = R.job_rows(paths)
    if jobs:
        headers = ["kind", "executor", "job id", "tasks", "state", "submitted"]
        body += [H.tag("h3", "Jobs"), H.table(headers, jobs)]
    body += [H.note(n) for n in notes]
    return H.section("summary", "Run summary", body)


def _plain(obj: Any) -> Any:
    """numpy scalars/arrays -> plain JSON values (NaN -> None, which JSON can represent)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _remove_old_figures(out: Path, keep: str) -> None:
    """Delete figure folders of earlier builds (only folders this module names)."""
    for p in out.iterdir():
        if p.is_dir() and p.name != keep and FIGURE_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
