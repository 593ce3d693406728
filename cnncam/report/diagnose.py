"""Read the learning curves like the seeds' authors do, in plain words: over-, under-fitting or fine.

Pure functions of the ``metrics.jsonl`` records (``cnncam.runs.read_metrics``), so every rule is
unit-testable with crafted records.  The remedies are the ones the seed posts give (day43 §4:
simpler model, more augmentation, lower learning rate, early stopping, weight decay, dropout), and
each is suggested only when the diagnosis calls for it and the run does not already use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from cnncam.config import DataConfig, ModelConfig, TrainConfig

Verdict = Literal["overfitting", "underfitting", "healthy", "diverged", "unknown"]


@dataclass(frozen=True)
class Thresholds:
    """Knobs of the rules; the defaults suit image classifiers trained for 5-100 epochs."""

    rise: float = 0.05  # val loss must rise this fraction above its minimum to count as rising
    rise_abs: float = 0.01  # ... and at least this much in absolute terms (noise on tiny losses)
    acc_gap: float = 0.15  # train - val accuracy gap that counts as over-fitting on its own
    underfit_acc: float = 0.7  # final training accuracy below this is under-fitting
    plateau: float = 0.02  # relative train-loss change over the last third that counts as flat


@dataclass(frozen=True)
class Curves:
    """Per-epoch series (aligned on ``epochs``) and the per-iteration training loss."""

    epochs: tuple[int, ...]
    train_loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    val_loss: tuple[float, ...]  # empty without a validation split
    val_acc: tuple[float, ...]
    lr: tuple[float, ...]
    iter_epoch: tuple[float, ...]  # fractional epoch of each iteration record
    iter_loss: tuple[float, ...]
    iter_lr: tuple[float, ...]
    test_accuracy: float | None = None
    test_loss: float | None = None
    best_epoch: int | None = None  # the epoch the final test used (best.pt)


@dataclass(frozen=True)
class Diagnosis:
    """The verdict, one headline sentence, supporting details and the remedies that apply."""

    verdict: Verdict
    headline: str
    details: tuple[str, ...] = ()
    remedies: tuple[str, ...] = ()
    onset_epoch: int | None = None  # first epoch of over-fitting
    best_val_epoch: int | None = None  # epoch of the lowest validation loss
    loss_gap: float | None = None  # val - train loss at the last epoch
    acc_gap: float | None = None  # train - val accuracy at the last epoch

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def curves(records: Iterable[Mapping[str, Any]]) -> Curves:
    """Split metrics records into per-epoch train/val series and the iteration series.

    A later record for the same (split, epoch) wins, so a resumed run never shows an epoch twice.
    """
    train: dict[int, Mapping[str, Any]] = {}
    val: dict[int, Mapping[str, Any]] = {}
    iters: dict[int, Mapping[str, Any]] = {}
    final: Mapping[str, Any] | None = None
    for r in records:
        kind, split = r.get("kind"), r.get("split")
        if kind == "epoch" and split in ("train", "val"):
            (train if split == "train" else val)[int(r.get("epoch", 0))] = r
        elif kind == "iter":
            iters[int(r.get("step", len(iters)))] = r
        elif kind == "final":
            final = r
    epochs = tuple(sorted(train))
    both = tuple(e for e in epochs if e in val)
    its = [iters[s] for s in sorted(iters)]
    return Curves(
        epochs=epochs,
        train_loss=tuple(_f(train[e], "loss") for e in epochs),
        train_acc=tuple(_f(train[e], "accuracy") for e in epochs),
        val_loss=tuple(_f(val[e], "loss") for e in both) if both == epochs else (),
        val_acc=tuple(_f(val[e], "accuracy") for e in both) if both == epochs else (),
        lr=tuple(_f(train[e], "lr") for e in epochs),
        iter_epoch=tuple(_f(r, "epoch") for r in its),
        iter_loss=tuple(_f(r, "loss") for r in its),
        iter_lr=tuple(_f(r, "lr") for r in its),
        test_accuracy=_f(final, "accuracy") if final else None,
        test_loss=_f(final, "loss") if final else None,
        best_epoch=int(final["epoch"]) if final and final.get("epoch") is not None else None,
    )


def _f(r: Mapping[str, Any], key: str) -> float:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def diagnose(
    records: Iterable[Mapping[str, Any]],
    train: TrainConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    th: Thresholds = Thresholds(),
) -> Diagnosis:
    """Metrics records -> :class:`Diagnosis`.

    Rules, in order: non-finite losses -> ``diverged``; fewer than 2 epochs or no validation
    split -> ``unknown`` (with what can be said); validation loss rising above its minimum while
    the training loss keeps falling, or a large accuracy gap -> ``overfitting``; low training
    accuracy -> ``underfitting``; otherwise ``healthy``.  The configs, when given, tailor the
    remedies (no "add early stopping" when it is already on).
    """
    records = list(records)
    if any(_bad_loss(r) for r in records):
        return _diverged(train)
    c = curves(records)
    if len(c.epochs) < 2:
        n = len(c.epochs)
        return Diagnosis(
            "unknown", f"Only {n} epoch{'s' if n != 1 else ''} logged: too few to judge the learning curves."
        )
    if not c.val_loss:
        return _no_val(c, th)
    gaps = _gaps(c)
    over = _overfitting(c, th, train, data, model)
    if over is not None:
        return over
    if c.train_acc[-1] < th.underfit_acc:
        return _underfitting(c, th, model, gaps)
    details = [
        f"Validation loss ended at {c.val_loss[-1]:.4g} (lowest {min(c.val_loss):.4g}, at epoch "
        f"{_argmin_epoch(c)}); training accuracy {c.train_acc[-1]:.1%}, validation accuracy "
        f"{c.val_acc[-1]:.1%} (gap {gaps[1]:+.1%})."
    ]
    if _still_falling(c.val_loss, th):
        details.append("Validation loss was still falling at the last epoch: more epochs may help.")
    return Diagnosis(
        "healthy",
        "Healthy: no sign of over- or under-fitting.",
        tuple(details),
        (),
        None,
        _argmin_epoch(c),
        *gaps,
    )


def _bad_loss(r: Mapping[str, Any]) -> bool:
    """A training/validation record whose loss is NaN or infinite (json reads NaN/Infinity)."""
    v = r.get("loss")
    return r.get("kind") in ("iter", "epoch") and isinstance(v, float) and not math.isfinite(v)


def _gaps(c: Curves) -> tuple[float, float]:
    return c.val_loss[-1] - c.train_loss[-1], c.train_acc[-1] - c.val_acc[-1]


def _argmin_epoch(c: Curves) -> int:
    i = min(range(len(c.val_loss)), key=lambda j: (c.val_loss[j], j))
    return c.epochs[i]


def _overfitting(
    c: Curves, th: Thresholds, train: TrainConfig | None, data: DataConfig | None, model: ModelConfig | None
) -> Diagnosis | None:
    best_i = min(range(len(c.val_loss)), key=lambda j: (c.val_loss[j], j))
    best = c.val_loss[best_i]
    limit = best + max(th.rise * abs(best), th.rise_abs)
    rising = c.val_loss[-1] > limit and c.train_loss[-1] < c.train_loss[best_i]
    loss_gap, acc_gap = _gaps(c)
    details: list[str] = []
    if rising:
        onset_i = next(i for i in range(best_i + 1, len(c.val_loss)) if c.val_loss[i] > best)
        details.append(
            f"Validation loss was lowest at epoch {c.epochs[best_i]} ({best:.4g}) and rose to "
            f"{c.val_loss[-1]:.4g} by epoch {c.epochs[-1]}, while training loss fell from "
            f"{c.train_loss[best_i]:.4g} to {c.train_loss[-1]:.4g}."
        )
    elif acc_gap > th.acc_gap:
        onset_i = next(i for i, (a, b) in enumerate(zip(c.train_acc, c.val_acc)) if a - b > th.acc_gap)
        details.append(
            f"Training accuracy exceeds validation accuracy by more than {th.acc_gap:.0%} "
            f"since epoch {c.epochs[onset_i]}."
        )
    else:
        return None
    onset = c.epochs[onset_i]
    details.append(
        f"At the last epoch the loss gap (validation - training) is {loss_gap:.4g} and "
        f"the accuracy gap (training - validation) is {acc_gap:.1%}."
    )
    headline = (
        f"Over-fitting from epoch {onset}: the model memorises the training set and "
        "generalises worse as training goes on."
    )
    remedies = _overfit_remedies(c, best_i, train, data, model)
    return Diagnosis(
        "overfitting", headline, tuple(details), remedies, onset, c.epochs[best_i], loss_gap, acc_gap
    )


def _overfit_remedies(
    c: Curves, best_i: int, train: TrainConfig | None, data: DataConfig | None, model: ModelConfig | None
) -> tuple[str, ...]:
    out: list[str] = []
    if data is None or data.augment != "full":
        out.append("More data augmentation (data.augment=full: rotation, shifts, zoom, colour jitter).")
    else:
        out.append(
            "Stronger augmentation (a smaller data.crop_scale lower bound, larger data.rotation "
            "and data.color_jitter)."
        )
    if model is None or model.dropout < 0.5:
        out.append("More dropout before the classifier (model.dropout=0.5).")
    wd = train.weight_decay if train is not None else 0.0
    if wd < 0.1:
        out.append(f"More weight decay (L2 regularisation), e.g. train.weight_decay={max(wd * 10, 1e-2):g}.")
    if train is None or train.patience == 0:
        out.append(
            f"Early stopping (train.patience=3); the best validation loss was at epoch "
            f"{c.epochs[best_i]}, and best.pt keeps the best epoch by train.monitor."
        )
    out.append("More training images, or a smaller model (fewer model.channels / blocks).")
    if _unstable(c.val_loss):
        out.append("A lower learning rate (e.g. train.lr halved): the validation loss oscillates.")
    return tuple(out)


def _underfitting(
    c: Curves, th: Thresholds, model: ModelConfig | None, gaps: tuple[float, float]
) -> Diagnosis:
    falling = _still_falling(c.train_loss, th)
    details = [
        f"Training accuracy is only {c.train_acc[-1]:.1%} after {len(c.epochs)} epochs "
        f"(validation {c.val_acc[-1]:.1%}); training loss is "
        f"{'still falling' if falling else 'flat'} ({c.train_loss[0]:.4g} -> {c.train_loss[-1]:.4g})."
    ]
    remedies = []
    if falling:
        remedies.append("Train longer (more train.epochs): the training loss has not levelled off.")
    remedies.append("A bigger model (more model.channels, or resnet18/resnet50 with pretrained weights).")
    remedies.append("More (or cleaner) training data.")
    if not falling:
        remedies.append(
            "A higher learning rate or less regularisation (lower train.weight_decay / "
            "model.dropout): the training loss is stuck."
        )
    if _unstable(c.train_loss):
        remedies.append("A lower learning rate: the training loss oscillates between epochs.")
    if model is not None and model.dropout >= 0.5:
        remedies.append(
            f"Less dropout (model.dropout={model.dropout:g} is high for a model that under-fits)."
        )
    return Diagnosis(
        "underfitting",
        "Under-fitting: the model has not learnt the training set well.",
        tuple(details),
        tuple(remedies),
        None,
        _argmin_epoch(c),
        *gaps,
    )


def _no_val(c: Curves, th: Thresholds) -> Diagnosis:
    acc = c.train_acc[-1]
    if acc < th.underfit_acc:
        return Diagnosis(
            "underfitting",
            "Under-fitting: training accuracy is low (no validation split to check over-fitting).",
            (f"Final training accuracy {acc:.1%}.",),
            ("Train longer (more train.epochs).", "A bigger model.", "More training data."),
        )
    return Diagnosis(
        "unknown",
        "No validation split: over-fitting cannot be judged.",
        (f"Final training accuracy {acc:.1%}.",),
        ("Keep a validation split (data.split.val > 0) to watch for over-fitting.",),
    )


def _diverged(train: TrainConfig | None) -> Diagnosis:
    remedies = ["A lower learning rate (train.lr) or a longer warm-up (train.warmup_epochs)."]
    if train is None or train.grad_clip is None:
        remedies.append("Gradient clipping (train.grad_clip=1.0).")
    if train is not None and train.precision == "fp16":
        remedies.append("bf16 or fp32 instead of fp16 (train.precision).")
    return Diagnosis("diverged", "Diverged: the loss became NaN or infinite.", (), tuple(remedies))


def _still_falling(series: Sequence[float], th: Thresholds) -> bool:
    """True when the series fell by more than ``th.plateau`` (relative) over its last third."""
    n = len(series)
    start = series[max(0, n - 1 - max(1, n // 3))]
    return series[-1] < start * (1 - th.plateau)


def _unstable(series: Sequence[float]) -> bool:
    """The curve changes direction at least every other epoch: it oscillates (a steady rise
    after a minimum, the over-fitting shape, is not an oscillation)."""
    steps = [b - a for a, b in zip(series, series[1:]) if b != a]
    turns = sum((a > 0) != (b > 0) for a, b in zip(steps, steps[1:]))
    return len(steps) >= 3 and turns >= len(steps) / 2
