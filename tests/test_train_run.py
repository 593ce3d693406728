"""A whole small training run: the run-directory contract the other commands build on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import tiny_config, tiny_dataset

from cnncam.config import load_config
from cnncam.data import BadImageWarning
from cnncam.runs import read_metrics
from cnncam.train import run_training


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("run")
    data = tiny_dataset(tmp / "shapes")
    (data / "circle" / "broken.png").write_bytes(b"not a png at all")  # one bad file must not kill the job
    cfg = tiny_config(tmp, data, "train.epochs=3", "train.scheduler=plateau", name="full")
    with pytest.warns(BadImageWarning, match="circle/broken.png"):
        result = run_training(cfg)
    return cfg.run_dir, result


def test_run_directory_contract(run: tuple[Path, object]) -> None:
    run_dir, result = run
    for name in [
        "config.yaml",
        "classes.json",
        "provenance.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "splits/train.csv",
        "splits/val.csv",
        "splits/test.csv",
        "skipped.json",
        "predictions.csv",
        "confusion_matrix.json",
    ]:
        assert (run_dir / name).is_file(), name
    cfg = load_config(run_dir / "config.yaml")  # the resolved config loads back as-is
    assert cfg.train.epochs == 3 and cfg.train.scheduler == "plateau"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["channels"] == [8, 16]
    assert json.loads((run_dir / "classes.json").read_text()) == ["circle", "square", "triangle"]
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert {"git", "versions", "host", "seed", "start_time"} <= prov.keys()
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or prov["versions"]["torch"]
    skipped = json.loads((run_dir / "skipped.json").read_text())
    assert [s["path"] for s in skipped] == ["circle/broken.png"]


def test_metrics_lines(run: tuple[Path, object]) -> None:
    run_dir, result = run
    records = read_metrics(run_dir / "metrics.jsonl")
    iters = [r for r in records if r["kind"] == "iter"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert iters and all(
        {"epoch", "step", "loss", "accuracy", "lr", "images_per_s"} <= r.keys() for r in iters
    )
    assert [r["step"] for r in iters] == list(range(2, result.global_step + 1, 2))  # every log_every=2 steps
    assert [(r["split"], r["epoch"]) for r in epochs] == [(s, e) for e in (1, 2, 3) for s in ("train", "val")]
    final = [r for r in records if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["split"] == "test" and final[0]["accuracy"] == result.test_accuracy


def test_predictions_and_confusion_agree(run: tuple[Path, object]) -> None:
    run_dir, result = run
    rows = list(csv.DictReader((run_dir / "predictions.csv").open()))
    test_split = list(csv.DictReader((run_dir / "splits" / "test.csv").open()))
    assert [r["path"] for r in rows] == [r["path"] for r in test_split]
    assert [int(r["label"]) for r in rows] == [int(r["label"]) for r in test_split]
    conf = json.loads((run_dir / "confusion_matrix.json").read_text())
    expected = [[0] * 3 for _ in range(3)]
    for r in rows:
        expected[int(r["label"])][int(r["pred"])] += 1
    assert conf["matrix"] == expected
    correct = sum(int(r["label"]) == int(r["pred"]) for r in rows)
    assert conf["accuracy"] == pytest.approx(correct / len(rows)) == pytest.approx(result.test_accuracy)


def test_best_checkpoint_is_the_best_epoch(run: tuple[Path, object]) -> None:
    run_dir, result = run
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    vals = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch" and r["split"] == "val"
    ]
    top = max(vals, key=lambda r: r["accuracy"])  # first epoch reaching the max wins (strict improvement)
    assert best["epoch"] == top["epoch"] == result.best_epoch
    assert best["meta"]["classes"] == ["circle", "square", "triangle"]
    assert set(best) >= {"model", "meta"} and "optimizer" not in best  # best.pt is weights + metadata only


def test_early_stopping_stops(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "shapes")
    # lr 0 can never improve val loss after the first epoch: patience 1 stops at epoch 2.
    cfg = tiny_config(
        tmp_path,
        data,
        "train.epochs=5",
        "train.lr=1e-12",
        "train.patience=1",
        "train.monitor=val_loss",
        "train.min_delta=0.1",
        name="es",
    )
    result = run_training(cfg)
    assert result.status == "completed" and result.epoch == 2 and result.best_epoch == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_and_resumes_state(tmp_path: Path, precision: str) -> None:
    data = tiny_dataset(tmp_path / "shapes")
    cfg = tiny_config(
        tmp_path,
        data,
        "train.epochs=1",
        f"train.precision={precision}",
        "train.channels_last=true",
        name=precision,
    )
    result = run_training(cfg)
    last = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert result.status == "completed" and torch.isfinite(torch.tensor(result.best_metric))
    assert all(t.dtype == torch.float32 for t in last["model"].values() if t.is_floating_point())
    assert bool(last["scaler"]) == (precision == "fp16")  # GradScaler state only for fp16
