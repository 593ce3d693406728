"""End to end on CPU: synthetic shapes -> run_training -> CAM export (2 shards, merged) -> report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cnncam.cam.export import export
from cnncam.config import RunConfig, load_config
from cnncam.data import generate_shapes
from cnncam.report import build_report
from cnncam.runs import read_json
from cnncam.train import run_training


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    tmp = tmp_path_factory.mktemp("e2e")
    data = generate_shapes(tmp / "shapes", num_classes=3, per_class=14, image_size=32, seed=0)
    cfg = load_config(
        None,
        [
            "name=e2e",
            f"runs_dir={tmp / 'runs'}",
            f"data.root={data}",
            "data.image_size=32",
            "data.resize=32",
            "data.batch_size=8",
            "data.num_workers=0",
            "model.channels=[8,16]",
            "train.epochs=3",
            "train.log_every=2",
            "train.lr=0.01",
            "cam.methods=[gradcam,layercam]",
            "cam.metrics=true",
            "cam.metric_steps=4",
            "cam.batch_size=4",
            "cam.num_workers=0",
            "cam.activations=[features.block1.relu1]",
            "cam.activation_images=2",
            "report.gallery_size=3",
            "report.per_class=1",
            "report.max_channels=8",
        ],
    )
    run_training(cfg)
    export(cfg, num_shards=2)
    return cfg


def test_report_of_a_real_run(exported: RunConfig) -> None:
    run = exported.run_dir
    index = build_report(run)
    assert index == run / "report" / "index.html"
    summary = json.loads((index.parent / "summary.json").read_text())
    # The CAM export re-predicts the test split with best.pt: same confusion as the trainer's.
    trainer = read_json(run / "confusion_matrix.json")
    assert summary["confusion"]["matrix"] == trainer["matrix"]
    assert summary["confusion"]["class_names"] == trainer["classes"]
    cams = summary["cams"]
    assert cams["n_items"] == trainer["count"] and cams["methods"] == ["gradcam", "layercam"]
    # Curves come from the trainer's real metrics.jsonl (3 epochs with validation).
    assert summary["diagnosis"]["verdict"] in ("overfitting", "underfitting", "healthy")
    names = {Path(f).name for f in summary["figures"]}
    for expected in (
        "learning_curves.png",
        "confusion_matrix.png",
        "method_comparison.png",
        "features_00.png",
        "first_conv_filters.png",
        "faithfulness.png",
    ):
        assert expected in names
    for rel in summary["figures"]:
        with Image.open(index.parent / rel) as im:
            im.verify()
    shown = [
        it for g in ("confident_correct", "confident_wrong", "least_confident") for it in cams["galleries"][g]
    ]
    assert shown and all(it["image_found"] for it in shown)  # the shapes are on disk
    assert len(cams["galleries"]["least_confident"]) == min(3, cams["n_items"])
    faith = cams["faithfulness"]
    assert set(faith) == {f"{m}/{layer}" for m in cams["methods"] for layer in cams["layers"]}
    for entry in faith.values():
        assert 0.0 <= entry["deletion_auc"] <= 1.0 and 0.0 <= entry["insertion_auc"] <= 1.0
        assert sum(entry["hist"]["deletion_auc"]) == cams["n_items"]
