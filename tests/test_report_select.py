"""The chunked pass over a CAM file equals brute force over the whole file, for any chunk size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report_common import CLASSES, LAYER, METHODS, N_ITEMS, all_rows, write_cams

from cnncam.errors import CnncamError
from cnncam.report import select
from cnncam.report.sections import shown_classes
from cnncam.report.select import TopK, minmax, scan, softmax
from cnncam.report.summary import class_metrics, confusion_from_predictions
from cnncam.storage import CamFile, open_cams


@pytest.fixture(scope="module")
def cams_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three parts merged into one virtual cams.h5 (the report reads across part boundaries)."""
    return write_cams(tmp_path_factory.mktemp("cams"), shards=3)


def _brute(path: Path, gallery: int, per_class: int) -> dict[str, Any]:
    d = all_rows(path)
    label, pred = d["samples/label"], d["samples/pred"]
    prob = softmax(d["samples/logits"])
    p_pred, p_label = prob[np.arange(len(label)), pred], prob[np.arange(len(label)), label]
    rows = np.arange(len(label))

    def top(mask: np.ndarray, score: np.ndarray, largest: bool = True) -> list[int]:
        order = sorted(rows[mask], key=lambda r: (-score[r] if largest else score[r], r))
        return [int(r) for r in order[:gallery]]

    conf = np.zeros((3, 3), dtype=np.int64)
    for y, p in zip(label, pred):
        conf[y, p] += 1
    means = {}
    for m in METHODS:
        maps = d[f"cams/{m}/{LAYER}"][:, 0].astype(np.float64)
        ok = label == pred  # targets=pred: a map explains class c only for images predicted c
        means[m] = np.stack([minmax(maps[ok & (label == c)]).mean(0) for c in range(3)])
    return {
        "conf": conf,
        "confident_correct": top(label == pred, p_pred),
        "confident_wrong": top(label != pred, p_pred),
        "least_confident": top(rows >= 0, p_pred, largest=False),
        "per_class": [sorted(rows[label == c], key=lambda r: (-p_label[r], r))[:per_class] for c in range(3)],
        "means": means,
        "metrics": d,
    }


@pytest.mark.parametrize("chunk", [1, 4, 7, 4096])
def test_scan_equals_brute_force(cams_file: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "CHUNK_ROWS", chunk)
    ref = _brute(cams_file, gallery=5, per_class=3)
    with open_cams(cams_file) as cams:
        res = scan(cams, gallery_size=5, per_class=3)
    assert res.n_items == N_ITEMS
    np.testing.assert_array_equal(res.confusion, ref["conf"])
    for name in select.GALLERIES:
        assert res.galleries[name].tolist() == ref[name], name
    assert [r.tolist() for r in res.per_class] == [[int(x) for x in r] for r in ref["per_class"]]
    for m in METHODS:
        np.testing.assert_allclose(res.class_means((m, LAYER)), ref["means"][m], rtol=1e-12, atol=1e-12)
        assert res.class_counts[(m, LAYER)].sum() == np.trace(ref["conf"])
    d = ref["metrics"]
    for m in METHODS:
        st = res.metrics[(m, LAYER)]
        dele = d[f"metrics/{m}/{LAYER}/deletion_auc"].astype(np.float64)
        hist, _ = np.histogram(dele, bins=select.HIST_BINS)
        np.testing.assert_array_equal(st.hist["deletion_auc"], hist)
        assert st.mean("deletion_auc") == pytest.approx(dele.mean(), abs=1e-12)
        energy = d[f"metrics/{m}/{LAYER}/energy_in_box"]
        assert st.count["energy_in_box"] == np.isfinite(energy).sum()  # NaN = no box, left out
        hit = d[f"metrics/{m}/{LAYER}/pointing_hit"]
        assert (st.pointing_hits, st.pointing_total) == ((hit == 1).sum(), (hit >= 0).sum())


def test_scan_reads_in_bounded_windows(cams_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No read of a per-item dataset ever asks for more rows than the window size."""
    monkeypatch.setattr(select, "CHUNK_ROWS", 4)
    sizes: list[int] = []
    real_block = CamFile._block

    def spy(self: CamFile, names: list[str], a: int, b: int, **kw: bool) -> dict[str, np.ndarray]:
        out = real_block(self, names, a, b, **kw)
        sizes.extend(len(v) for v in out.values())
        return out

    monkeypatch.setattr(CamFile, "_block", spy)
    with open_cams(cams_file) as cams:
        res = scan(cams, gallery_size=3, per_class=1)
    assert res.n_items == N_ITEMS
    assert sizes and max(sizes) <= 4
    assert len(sizes) >= N_ITEMS // 4  # really many windows, not one read


def test_window_shrinks_for_wide_rows(cams_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "CHUNK_BYTES", 1000)
    with open_cams(cams_file) as cams:
        names = ["samples/logits", f"cams/gradcam/{LAYER}"]
        row = 3 * 4 + 36 * 2  # float32 logits + one float16 6x6 map
        assert select.chunk_rows(cams, names) == 1000 // row


def test_topk_breaks_ties_by_row_whatever_the_order() -> None:
    a = TopK(3)
    a.update(np.array([0.5, 0.9, 0.5]), np.array([7, 8, 2]))
    a.update(np.array([0.5, np.nan, 0.9]), np.array([1, 3, 9]))
    assert a.rows.tolist() == [8, 9, 1]  # 0.9 (row 8), 0.9 (row 9), 0.5 (lowest row 1)
    b = TopK(2, largest=False)
    b.update(np.array([0.3, 0.1, 0.1]), np.array([0, 5, 4]))
    assert b.rows.tolist() == [4, 5]


def test_classes_shown_are_the_weakest_when_there_are_too_many() -> None:
    conf = np.array([[9, 1, 0, 0], [5, 5, 0, 0], [0, 0, 0, 0], [2, 0, 0, 8]])  # recall .9 .5 n/a .8
    assert shown_classes(conf, 4) == [0, 1, 2, 3]
    assert shown_classes(conf, 2) == [1, 3]  # lowest recall, in id order; absent class 2 last
    assert shown_classes(conf, 3) == [0, 1, 3]


def test_class_metrics_by_hand() -> None:
    # true 0: 8 right, 2 called 1; true 1: 1 called 0, 4 right; true 2: never predicted.
    m = class_metrics(np.array([[8, 2, 0], [1, 4, 0], [1, 1, 0]]))
    c0, c1, c2 = m["classes"]
    assert c0["precision"] == pytest.approx(8 / 10) and c0["recall"] == pytest.approx(8 / 10)
    assert c1["precision"] == pytest.approx(4 / 7) and c1["recall"] == pytest.approx(4 / 5)
    assert c1["f1"] == pytest.approx(2 * (4 / 7) * (4 / 5) / (4 / 7 + 4 / 5))
    assert c2 == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["accuracy"] == pytest.approx(12 / 17) and m["count"] == 17
    assert m["macro"]["recall"] == pytest.approx((0.8 + 0.8 + 0) / 3)
    assert m["weighted"]["recall"] == pytest.approx(m["accuracy"])  # weighted recall == accuracy


def test_confusion_from_predictions_csv(tmp_path: Path) -> None:
    p = tmp_path / "predictions.csv"
    p.write_text(
        "index,path,label,pred,label_name,pred_name,confidence\n"
        "0,a.png,0,0,x,x,0.9\n1,b.png,1,0,y,x,0.8\n2,c.png,1,1,y,y,0.7\n"
    )
    np.testing.assert_array_equal(
        confusion_from_predictions(p, len(CLASSES)), [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    )
    p.write_text("index,path,label,pred\n0,a.png,0,5\n")
    with pytest.raises(CnncamError, match="out of range"):
        confusion_from_predictions(p, len(CLASSES))
