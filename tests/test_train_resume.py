"""Exact resume: N epochs straight == interrupted + resumed, bit for bit, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import StopAfter, assert_bit_identical, state_of, tiny_config, tiny_dataset

from cnncam.errors import CheckpointError
from cnncam.runs import read_metrics
from cnncam.train import run_training


def _epoch_records(run_dir: Path) -> list[dict]:
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] != "iter"]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("shapes"))


def test_resume_is_bit_identical(tmp_path: Path, data: Path) -> None:
    straight = tiny_config(tmp_path, data, name="straight")
    res = run_training(straight)
    assert res.status == "completed" and res.epoch == 2

    split = tiny_config(tmp_path, data, name="split")
    steps_per_epoch = res.global_step // 2
    # Stop mid-epoch 1, then exactly at the end of epoch 1, then run to the end.
    first = run_training(split, StopAfter(2))
    assert first.status == "interrupted" and first.global_step == 3
    second = run_training(split, StopAfter(steps_per_epoch - 3 - 1))
    assert second.status == "interrupted" and second.global_step == steps_per_epoch
    third = run_training(split)
    assert third.status == "completed"

    assert_bit_identical(state_of(straight.run_dir), state_of(split.run_dir))
    assert_bit_identical(state_of(straight.run_dir, "best.pt"), state_of(split.run_dir, "best.pt"))
    # Metrics logged before each stop are not duplicated; epoch records are identical.
    assert _epoch_records(straight.run_dir) == _epoch_records(split.run_dir)
    steps = [r["step"] for r in read_metrics(split.run_dir / "metrics.jsonl") if r["kind"] == "iter"]
    assert steps == sorted(set(steps))
    prov = json.loads((split.run_dir / "provenance.json").read_text())
    assert len(prov["restarts"]) == 2


def test_worker_count_does_not_change_training(tmp_path: Path, data: Path) -> None:
    a = tiny_config(tmp_path, data, "train.epochs=1", name="w0")
    b = tiny_config(tmp_path, data, "train.epochs=1", "data.num_workers=2", name="w2")
    run_training(a)
    run_training(b)
    assert_bit_identical(state_of(a.run_dir), state_of(b.run_dir))


def test_finished_run_is_a_no_op(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "train.epochs=1", name="done")
    run_training(cfg)
    before = (cfg.run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = run_training(cfg)
    assert again.status == "completed" and again.epoch == 1
    assert (cfg.run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_resume_with_changed_maths_is_refused(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "train.epochs=1", name="ref")
    run_training(cfg, StopAfter(1))
    changed = tiny_config(tmp_path, data, "train.epochs=1", "train.lr=0.5", name="ref")
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        run_training(changed)
    # More epochs is fine: that is how a user extends a run.
    longer = tiny_config(tmp_path, data, "train.epochs=2", name="ref")
    assert run_training(longer).epoch == 2
