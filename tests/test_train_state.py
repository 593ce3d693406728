"""Run state that means what it says: last.pt is the last step, best.pt the best epoch, the final
test uses best.pt without touching the training model, and a finished run asked for more epochs
trains them (config.yaml is rewritten only when a change is applied)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import (
    BEST_IS_FIRST,
    StopAfter,
    assert_bit_identical,
    assert_same_run_state,
    checkpoint,
    epoch_rows,
    state_of,
    tiny_config,
    tiny_dataset,
)

from cnncam.config import load_config
from cnncam.errors import CheckpointError
from cnncam.models import create_model, unwrap_model
from cnncam.runs import RunPaths, read_metrics
from cnncam.train import run_training
from cnncam.train.distributed import DistInfo
from cnncam.train.evaluate import evaluate
from cnncam.train.precision import Precision
from cnncam.train.sampler import EpochBatchSampler
from cnncam.train.setup import build_data, eval_loader
from cnncam.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("shapes"))


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_last_is_the_last_step_and_best_the_best_epoch(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights: list[dict[str, torch.Tensor]] = []  # the training model's weights after each epoch's last step
    end_epoch = Trainer._end_epoch

    def spy(self: Trainer) -> None:
        weights.append({k: v.clone() for k, v in unwrap_model(self.model).state_dict().items()})
        end_epoch(self)

    monkeypatch.setattr(Trainer, "_end_epoch", spy)
    cfg = tiny_config(tmp_path, data, "train.epochs=3", *BEST_IS_FIRST)
    result = run_training(cfg)
    assert result.best_epoch == 1 and result.epoch == 3  # the fixture: best is not last
    assert any(not torch.equal(weights[0][k], weights[-1][k]) for k in weights[0])
    assert_bit_identical(state_of(cfg.run_dir, "last.pt"), weights[-1])
    assert_bit_identical(state_of(cfg.run_dir, "best.pt"), weights[0])
    last = checkpoint(cfg.run_dir)
    assert last["finished"] and last["epoch"] == 3 and last["batch"] == 0

    # The final test evaluated best.pt: the same numbers from an independent evaluation of its weights.
    bundle = build_data(cfg, RunPaths(cfg.run_dir), DistInfo())
    model = create_model(cfg.model, bundle.num_classes)
    model.load_state_dict(state_of(cfg.run_dir, "best.pt"))
    loader = eval_loader(bundle.test, cfg, DistInfo(), torch.device("cpu"))
    res = evaluate(model, loader, Precision("fp32", torch.device("cpu")), torch.device("cpu"), collect=True)
    final = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["epoch"] == 1
    assert final[0]["loss"] == res.loss and final[0]["accuracy"] == res.accuracy == result.test_accuracy
    rows = list(csv.DictReader((cfg.run_dir / "predictions.csv").open()))
    assert [float(r["confidence"]) for r in rows] == [round(c, 6) for c in res.confidences]


def test_extending_a_finished_run_trains_the_extra_epochs(tmp_path: Path, data: Path) -> None:
    # The step schedule does not depend on train.epochs: "1 epoch, then extended to 2" must equal
    # "2 epochs" bit for bit (the final test in between leaves no trace in the training state).
    common = ("train.scheduler=step", "train.step_size=1", "train.gamma=0.5", *BEST_IS_FIRST)
    straight = tiny_config(tmp_path, data, "train.epochs=2", *common, name="two")
    run_training(straight)
    one = tiny_config(tmp_path, data, "train.epochs=1", *common, name="ext")
    assert run_training(one).epoch == 1
    steps_one = checkpoint(one.run_dir)["global_step"]
    longer = run_training(tiny_config(tmp_path, data, "train.epochs=2", *common, name="ext"))
    assert longer.status == "completed" and longer.epoch == 2 and longer.test_accuracy is not None

    assert_same_run_state(straight.run_dir, one.run_dir, "last.pt")
    assert_bit_identical(state_of(straight.run_dir, "best.pt"), state_of(one.run_dir, "best.pt"))
    assert (
        checkpoint(one.run_dir, "best.pt")["epoch"] == 1
    )  # saved before the extension: its meta says 1 epoch
    assert epoch_rows(straight.run_dir) == epoch_rows(one.run_dir)
    assert load_config(one.run_dir / "config.yaml").train.epochs == 2
    records = read_metrics(one.run_dir / "metrics.jsonl")
    schedule = [r for r in records if r["kind"] == "schedule"]
    assert len(schedule) == 1
    assert schedule[0] | {"lr": 0} == {
        "split": "train",
        "kind": "schedule",
        "epoch": 1,
        "step": steps_one,
        "key": "train.epochs",
        "from": 1,
        "to": 2,
        "scheduler": "step",
        "rule": "new_total_from_current_step",
        "lr": 0,
    }
    assert schedule[0]["lr"] == pytest.approx(0.01 * 0.5)  # epoch 2 of a gamma-0.5, step-1 schedule
    assert [r["step"] for r in records if r["kind"] == "final"] == [steps_one, 2 * steps_one]
    prov = json.loads((one.run_dir / "provenance.json").read_text())
    assert prov["restarts"][-1]["config_changes"] == {"train.epochs": [1, 2]}


def test_extension_redefines_cosine_over_the_new_total(tmp_path: Path, data: Path) -> None:
    common = ("train.scheduler=cosine", "train.warmup_epochs=0", "train.min_lr=0.001")
    run_training(tiny_config(tmp_path, data, "train.epochs=1", *common))
    spe = checkpoint(tmp_path / "runs" / "t")["global_step"]
    cfg = tiny_config(tmp_path, data, "train.epochs=3", *common)
    run_training(cfg)

    def cosine(step: int, total: int) -> float:  # the documented rule, written out independently
        return 0.001 + (0.01 - 0.001) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    iters = [r for r in records if r["kind"] == "iter"]
    assert iters and all(
        r["lr"] == pytest.approx(cosine(r["step"] - 1, spe)) for r in iters if r["step"] <= spe
    )
    later = [r for r in iters if r["step"] > spe]
    assert later and all(r["lr"] == pytest.approx(cosine(r["step"] - 1, 3 * spe)) for r in later)
    (change,) = [r for r in records if r["kind"] == "schedule"]
    assert (change["from"], change["to"], change["step"]) == (1, 3, spe)
    assert change["lr"] == pytest.approx(cosine(spe, 3 * spe)) and change["lr"] > 0.005


def test_finished_run_not_extended_is_left_alone(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "train.epochs=2", name="done")
    run_training(cfg)
    before = _files(cfg.run_dir)
    for epochs in (2, 1):
        again = run_training(tiny_config(tmp_path, data, f"train.epochs={epochs}", name="done"))
        assert again.status == "completed" and again.epoch == 2
        assert _files(cfg.run_dir) == before  # config.yaml, metrics, provenance, checkpoints: untouched
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        run_training(tiny_config(tmp_path, data, "train.epochs=3", "train.lr=0.5", name="done"))
    assert _files(cfg.run_dir) == before


def test_early_stopped_run_resumes_only_with_more_patience(tmp_path: Path, data: Path) -> None:
    # lr ~0 never improves val loss by 0.1: patience 1 stops at epoch 2.
    base = ("train.lr=1e-12", "train.monitor=val_loss", "train.min_delta=0.1", "train.epochs=6")
    cfg = tiny_config(tmp_path, data, *base, "train.patience=1")
    assert run_training(cfg).epoch == 2
    before = _files(cfg.run_dir)
    assert run_training(cfg).epoch == 2 and _files(cfg.run_dir) == before  # still stopped: nothing to do
    more = run_training(tiny_config(tmp_path, data, *base, "train.patience=3"))
    assert (more.epoch, more.best_epoch) == (4, 1)  # 3 epochs without improvement after the best
    prov = json.loads((cfg.run_dir / "provenance.json").read_text())
    assert prov["restarts"][-1]["config_changes"] == {"train.patience": [1, 3]}


def test_interrupted_run_cannot_shrink_below_what_it_trained(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "train.epochs=3")
    run_training(cfg, StopAfter(0))  # step 1; now the split exists
    n_train = len((cfg.run_dir / "splits" / "train.csv").read_text().splitlines()) - 1
    spe = len(EpochBatchSampler(n_train, 8, seed=0).global_batches(0))
    stopped = run_training(cfg, StopAfter(spe))  # 1 + (spe + 1) steps: batch 2 of epoch 2
    assert stopped.status == "interrupted" and (stopped.epoch, checkpoint(cfg.run_dir)["batch"]) == (1, 2)
    config = (cfg.run_dir / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=r"train\.epochs=1 is below .* use train\.epochs >= 2"):
        run_training(tiny_config(tmp_path, data, "train.epochs=1"))
    assert (cfg.run_dir / "config.yaml").read_bytes() == config
    assert run_training(tiny_config(tmp_path, data, "train.epochs=2")).epoch == 2
    assert load_config(cfg.run_dir / "config.yaml").train.epochs == 2
    # The same rule as for a finished run, recorded where it was applied (mid-epoch here).
    (change,) = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if r["kind"] == "schedule"]
    assert (change["from"], change["to"], change["step"]) == (3, 2, spe + 2)
