"""The learning-curve diagnosis: crafted metrics.jsonl records -> the verdict a person would give."""

from __future__ import annotations

import math

from test_report_common import OVERFIT, epoch_records

from cnncam.config import DataConfig, ModelConfig, TrainConfig
from cnncam.report import Thresholds, curves, diagnose


def _joined(d: object) -> str:
    return " ".join([d.headline, *d.details, *d.remedies])  # type: ignore[attr-defined]


def test_overfitting_names_the_epoch_and_the_gap() -> None:
    d = diagnose(epoch_records(**OVERFIT))
    assert d.verdict == "overfitting"
    # Validation loss is lowest at epoch 4 and higher from epoch 5 on, while training loss falls.
    assert d.best_val_epoch == 4 and d.onset_epoch == 5
    assert "epoch 5" in d.headline and "Over-fitting" in d.headline
    assert d.loss_gap is not None and d.acc_gap is not None
    assert math.isclose(d.loss_gap, 0.97 - 0.12) and math.isclose(d.acc_gap, 0.98 - 0.70)
    assert any("lowest at epoch 4" in x and "0.97" in x for x in d.details)
    text = _joined(d)
    for remedy in ("augmentation", "dropout", "weight decay", "Early stopping"):
        assert remedy.lower() in text.lower(), remedy
    assert "bigger model" not in text.lower()  # an under-fitting remedy


def test_overfitting_remedies_respect_what_the_run_already_does() -> None:
    d = diagnose(
        epoch_records(**OVERFIT),
        train=TrainConfig(patience=3, weight_decay=0.5),
        data=DataConfig(augment="full"),
        model=ModelConfig(dropout=0.5),
    )
    assert d.verdict == "overfitting"
    text = _joined(d)
    assert "Early stopping" not in text and "More dropout" not in text and "More weight decay" not in text
    assert "Stronger augmentation" in text and "data.augment=full" not in text


def test_accuracy_gap_alone_counts_as_overfitting() -> None:
    # Validation loss never rises, but training accuracy runs away from validation accuracy.
    d = diagnose(
        epoch_records(
            train_loss=[1.0, 0.7, 0.5, 0.3, 0.2],
            val_loss=[1.0, 0.8, 0.7, 0.68, 0.67],
            train_acc=[0.5, 0.7, 0.85, 0.95, 0.99],
            val_acc=[0.5, 0.65, 0.72, 0.75, 0.76],
        )
    )
    assert d.verdict == "overfitting"
    assert d.onset_epoch == 4  # first epoch with gap > 15%: 0.95 - 0.75
    assert "since epoch 4" in " ".join(d.details)


def test_healthy_run_gets_no_remedies() -> None:
    d = diagnose(
        epoch_records(
            train_loss=[1.0, 0.6, 0.4, 0.3, 0.25, 0.22],
            val_loss=[0.95, 0.6, 0.42, 0.33, 0.3, 0.29],
            train_acc=[0.6, 0.8, 0.88, 0.91, 0.93, 0.94],
            val_acc=[0.6, 0.79, 0.86, 0.9, 0.91, 0.92],
        )
    )
    assert d.verdict == "healthy" and d.remedies == ()
    assert d.headline.startswith("Healthy") and d.onset_epoch is None
    assert d.best_val_epoch == 6
    assert "still falling" in " ".join(d.details)  # val loss fell over the last epochs


def test_underfitting_suggests_capacity_not_regularisation() -> None:
    d = diagnose(
        epoch_records(
            train_loss=[1.1, 1.08, 1.07, 1.07, 1.06, 1.06],
            val_loss=[1.1, 1.09, 1.08, 1.08, 1.07, 1.07],
            train_acc=[0.33, 0.35, 0.36, 0.37, 0.37, 0.38],
            val_acc=[0.33, 0.34, 0.35, 0.36, 0.36, 0.37],
        ),
        model=ModelConfig(dropout=0.6),
    )
    assert d.verdict == "underfitting"
    text = _joined(d)
    assert "38.0%" in text and "flat" in text
    assert "bigger model" in text.lower() and "more (or cleaner) training data" in text.lower()
    assert "Less dropout" in text
    assert "Early stopping" not in text and "More dropout" not in text and "augmentation" not in text.lower()


def test_underfitting_still_learning_suggests_more_epochs() -> None:
    d = diagnose(
        epoch_records(
            train_loss=[2.0, 1.6, 1.3, 1.0],
            val_loss=[2.0, 1.62, 1.33, 1.05],
            train_acc=[0.2, 0.35, 0.45, 0.55],
            val_acc=[0.2, 0.34, 0.44, 0.53],
        )
    )
    assert d.verdict == "underfitting"
    assert any("Train longer" in r for r in d.remedies)


def test_nan_loss_is_divergence() -> None:
    recs = epoch_records(train_loss=[1.0, 0.9, 0.8], val_loss=[1.0, 0.9, 0.8], train_acc=[0.5, 0.6, 0.7])
    recs[4]["loss"] = float("nan")  # an iteration record of epoch 2
    d = diagnose(recs, train=TrainConfig(precision="fp16"))
    assert d.verdict == "diverged"
    assert any("grad_clip" in r for r in d.remedies) and any("bf16" in r for r in d.remedies)


def test_too_little_data_is_unknown() -> None:
    assert diagnose([]).verdict == "unknown"
    one = epoch_records(train_loss=[1.0], val_loss=[1.0], train_acc=[0.5])
    d = diagnose(one)
    assert d.verdict == "unknown" and "1 epoch" in d.headline


def test_no_validation_split() -> None:
    d = diagnose(epoch_records(train_loss=[1.0, 0.5, 0.2], val_loss=None, train_acc=[0.6, 0.9, 0.97]))
    assert d.verdict == "unknown" and "validation" in d.headline
    assert any("data.split.val" in r for r in d.remedies)


def test_thresholds_are_parameters() -> None:
    recs = epoch_records(
        train_loss=[1.0, 0.8, 0.6, 0.5],
        val_loss=[1.0, 0.8, 0.7, 0.72],
        train_acc=[0.8, 0.85, 0.9, 0.92],
        val_acc=[0.8, 0.84, 0.86, 0.86],
    )
    assert diagnose(recs).verdict == "healthy"  # +0.02 over the minimum: within the default 5%
    assert diagnose(recs, th=Thresholds(rise=0.01, rise_abs=0.001)).verdict == "overfitting"


def test_curves_deduplicate_resumed_epochs_and_read_the_final_record() -> None:
    recs = epoch_records(train_loss=[1.0, 0.8], val_loss=[1.1, 0.9], train_acc=[0.5, 0.6])
    again = [dict(r, loss=r["loss"] / 2) for r in recs if r["kind"] == "epoch" and r["epoch"] == 2]
    final = {"split": "test", "kind": "final", "epoch": 2, "step": 6, "loss": 0.5, "accuracy": 0.81}
    c = curves(recs + again + [final])
    assert c.epochs == (1, 2)
    assert c.train_loss == (1.0, 0.4) and c.val_loss == (1.1, 0.45)  # the later record wins
    assert len(c.iter_loss) == 6 and c.iter_epoch[-1] == 2.0
    assert c.test_accuracy == 0.81 and c.best_epoch == 2
