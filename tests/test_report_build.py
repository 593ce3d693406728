"""build_report on small synthetic runs: files, numbers, escaping, degraded inputs, atomicity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_report_common import CLASSES, METHODS, N_ITEMS, all_rows, make_run, parse_page, write_cams

from cnncam.config import ReportConfig, load_config
from cnncam.errors import ConfigError
from cnncam.report import build_report, select
from cnncam.report import sections as report_sections
from cnncam.report.build import image_root
from cnncam.report.summary import class_metrics
from cnncam.runs import RunPaths
from cnncam.storage import MERGED_FILENAME

MISSING = (13, 0)  # item 13 is the most confident wrong one, item 0 the least confident one
VOLATILE = ("build", "generated_utc", "figures")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, index.html) of a run with a single-part CAM file and two images missing."""
    run = make_run(tmp_path_factory.mktemp("single"), missing=MISSING)
    return run, build_report(run)


def _summary(index: Path) -> dict[str, Any]:
    return json.loads((index.parent / "summary.json").read_text())


def _stable(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in summary.items() if k not in VOLATILE}
    out["cams"] = {k: v for k, v in out["cams"].items() if k != "path"}
    return out


def test_report_files_are_valid_pngs_all_linked(built: tuple[Path, Path]) -> None:
    run, index = built
    assert index == run / "report" / "index.html"
    summary = _summary(index)
    names = {Path(f).name for f in summary["figures"]}
    expected = {
        "learning_curves.png",
        "confusion_matrix.png",
        "method_comparison.png",
        "faithfulness.png",
        "features_00.png",
        "first_conv_filters.png",
        "class_means_00.png",
        "class_means_01.png",
        *(f"gallery_{g}.png" for g in select.GALLERIES),
        *(f"class_{c:04d}.png" for c in range(3)),
    }
    assert names == expected
    for rel in summary["figures"]:
        path = index.parent / rel
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 50 and im.height > 50
            assert np.asarray(im.convert("L")).std() > 5  # something drawn, not a blank canvas
        with Image.open(path) as im:
            im.verify()  # CRC checks of every chunk
    page = parse_page(index)
    assert sorted(page.images) == sorted(summary["figures"])  # every figure shown, relative links only
    assert len(list(index.parent.glob("figures-*"))) == 1


def test_confusion_and_class_metrics_equal_the_hdf5_predictions(built: tuple[Path, Path]) -> None:
    run, index = built
    d = all_rows(run / "cams" / MERGED_FILENAME)
    expected = np.zeros((3, 3), dtype=int)
    np.add.at(expected, (d["samples/label"], d["samples/pred"]), 1)
    summary = _summary(index)
    assert summary["confusion"]["matrix"] == expected.tolist()
    assert summary["confusion"]["class_names"] == list(CLASSES)
    assert summary["confusion"]["accuracy"] == pytest.approx(np.trace(expected) / N_ITEMS)
    for got, want in zip(summary["confusion"]["per_class"], class_metrics(expected)["classes"], strict=True):
        assert got == pytest.approx(want)
    # The page shows the same counts (table rows: true class, then one count per predicted class).
    table = parse_page(index).table_with("true \\ predicted")
    assert table[0][1:] == list(CLASSES)
    assert [[int(x) for x in row[1:]] for row in table[1:]] == expected.tolist()
    metrics = parse_page(index).table_with("class", "precision", "recall")
    recall = {row[0]: float(row[2]) for row in metrics[1:4]}
    for c, name in enumerate(CLASSES):
        assert recall[name] == pytest.approx(expected[c, c] / expected[c].sum(), abs=1e-4)


def test_page_is_offline_escaped_and_explains_the_curves(built: tuple[Path, Path]) -> None:
    _, index = built
    text = index.read_text(encoding="utf-8")
    page = parse_page(index)
    assert page.scripts == 0 and "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a$b &amp; &#x27;c&#x27;" in text
    assert "http://" not in text and "https://" not in text
    assert all(not src.startswith(("/", "file:")) and ":" not in src for src in page.images)
    assert all(href.startswith(("#", "data:")) for href in page.links)
    assert "Over-fitting from epoch 5" in text and "Early stopping" in text
    assert _summary(index)["diagnosis"]["onset_epoch"] == 5


def test_missing_image_gives_heatmap_only_with_a_note(built: tuple[Path, Path]) -> None:
    _, index = built
    galleries = _summary(index)["cams"]["galleries"]
    items = [it for name in select.GALLERIES for it in galleries[name]]
    items += [it for per in galleries["per_class"].values() for it in per]
    missing = [it for it in items if it["index"] in MISSING]
    present = [it for it in items if it["index"] not in MISSING]
    assert {it["index"] for it in missing} == set(MISSING) and present
    assert all(not it["image_found"] and "file missing" in it["note"] for it in missing)
    assert all(it["image_found"] and it["note"] == "" for it in present)
    assert galleries["confident_wrong"][0]["index"] == 13
    text = index.read_text(encoding="utf-8")
    assert "image not available (file missing): heatmap only" in text
    assert "Some images could not be read" in text


def test_merged_file_and_small_chunks_give_the_same_report(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 parts merged into a virtual file, read 2 rows at a time == 1 part read at once."""
    run = make_run(tmp_path, name="merged", missing=MISSING, shards=3)
    monkeypatch.setattr(select, "CHUNK_ROWS", 2)
    out = tmp_path / "elsewhere"
    index = build_report(run, cams=run / "cams" / MERGED_FILENAME, out=out)
    assert index == out / "index.html" and not (run / "report").exists()
    a, b = _stable(_summary(built[1])), _stable(_summary(index))
    assert a.pop("run") == "rep" and b.pop("run") == "merged"
    assert a == b


def test_report_without_cams_uses_predictions_csv(tmp_path: Path) -> None:
    run = make_run(tmp_path, cams=False)
    index = build_report(run)
    summary = _summary(index)
    assert "cams" not in summary and summary["confusion"]["source"].startswith("predictions.csv")
    # predictions.csv of make_run: items 0, 5, 10 are predicted as the next class.
    assert summary["confusion"]["matrix"] == [[3, 1, 0], [0, 3, 1], [1, 0, 3]]
    assert {Path(f).name for f in summary["figures"]} == {"learning_curves.png", "confusion_matrix.png"}
    assert "no CAM file" in index.read_text(encoding="utf-8")


def test_empty_cam_file_still_gives_a_report(tmp_path: Path) -> None:
    run = make_run(tmp_path, cams=False)
    write_cams(run / "cams", n=0, extras=False).rename(run / "cams" / MERGED_FILENAME)
    summary = _summary(build_report(run))
    assert any("holds no items" in n for n in summary["notes"])
    assert {Path(f).name for f in summary["figures"]} == {"learning_curves.png"}


def test_crash_mid_build_keeps_the_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, cams=False)
    out = run / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = build_report(run)
    before = first.read_bytes(), (out / "summary.json").read_bytes()
    old_dirs = sorted(p.name for p in out.glob("figures-*"))

    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("killed mid-build")

    # learning_curves.png is written first, then the confusion figure fails.
    monkeypatch.setattr(report_sections.F, "confusion_figure", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_report(run)
    assert (first.read_bytes(), (out / "summary.json").read_bytes()) == before
    assert sorted(p.name for p in out.glob("figures-*")) == old_dirs  # the half build is gone
    assert all((out / rel).is_file() for rel in json.loads(before[1])["figures"])
    monkeypatch.undo()
    build_report(run)
    new_dirs = sorted(p.name for p in out.glob("figures-*"))
    assert len(new_dirs) == 1 and new_dirs != old_dirs  # the old build's folder is cleaned up
    assert (out / "notes.txt").read_text() == "mine"  # files we did not write are left alone


def test_report_settings_are_checked(built: tuple[Path, Path]) -> None:
    run, _ = built
    with pytest.raises(ConfigError, match="did you mean 'jet'"):
        build_report(run, out=run / "never", cfg=ReportConfig(colormap="jett"))
    assert not (run / "never" / "index.html").exists()
    with pytest.raises(ConfigError, match="report.gallery_size"):
        ReportConfig(gallery_size=-1)
    with pytest.raises(ConfigError, match="report.dpi"):
        load_config(None, ["report.dpi=5"])


def test_report_settings_change_the_output(built: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = built
    cfg = ReportConfig(gallery_size=2, per_class=1, compare_size=0, max_channels=4, dpi=50, max_classes=2)
    index = build_report(run, out=tmp_path / "small", cfg=cfg)
    summary = _summary(index)
    galleries = summary["cams"]["galleries"]
    assert all(len(galleries[g]) == 2 for g in select.GALLERIES)
    assert all(len(v) == 1 for v in galleries["per_class"].values())
    # Recalls are 0.8, 0.7, 0.7 (see the confusion test): the two weakest classes are kept.
    assert list(galleries["per_class"]) == [CLASSES[1], CLASSES[2]]
    assert "showing the 2 with the lowest recall" in index.read_text(encoding="utf-8")
    assert "method_comparison.png" not in {Path(f).name for f in summary["figures"]}
    with Image.open(index.parent / summary["figures"][0]) as im:  # learning curves: 11 in at 50 dpi
        assert im.width == 550
    assert len(METHODS) == len(summary["cams"]["class_means"])


def test_relative_image_root_is_found_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "data" / "shapes").mkdir(parents=True)
    cfg = load_config(None, ["name=x", "runs_dir=out/runs", "data.root=data/shapes"])
    paths = RunPaths(project / "out" / "runs" / "x")
    monkeypatch.chdir(tmp_path)  # data/shapes does not exist from here
    assert image_root(cfg, paths) == (project / "data" / "shapes").resolve()
    monkeypatch.chdir(project)  # ... but it does from the project folder: used as is
    assert image_root(cfg, paths) == Path("data/shapes")
