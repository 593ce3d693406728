"""Evaluation passes: validation metrics (all-reduced) and the final test predictions."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cnncam.runs import atomic_write_json, atomic_write_text
from cnncam.train.distributed import all_reduce_sum
from cnncam.train.precision import Precision


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int
    # Filled only when collect=True: per-sample dataset index, label, prediction, confidence.
    indices: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    precision: Precision,
    device: torch.device,
    channels_last: bool = False,
    collect: bool = False,
    reduce: bool = True,
) -> EvalResult:
    """Mean loss and accuracy over ``loader`` (summed over ranks when ``reduce``)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, correct, count
    out = EvalResult(0.0, 0.0, 0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels, index in loader:
        images = images.to(device, non_blocking=True, memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(1)
        sums[1] += (pred == labels).sum()
        sums[2] += labels.numel()
        if collect:
            conf = logits.softmax(1).amax(1)
            out.indices += index.tolist()
            out.labels += labels.tolist()
            out.preds += pred.tolist()
            out.confidences += conf.tolist()
    if reduce:
        all_reduce_sum(sums)
    model.train(was_training)
    count = int(sums[2].item())
    out.count = count
    out.loss = float(sums[0].item() / max(count, 1))
    out.accuracy = float(sums[1].item() / max(count, 1))
    return out


def confusion_matrix(labels: list[int], preds: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][pred] counts."""
    m = torch.zeros(num_classes, num_classes, dtype=torch.long)
    if labels:
        idx = torch.tensor(labels) * num_classes + torch.tensor(preds)
        m = torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)
    return m.tolist()


def write_predictions(
    result: EvalResult, paths_by_index: list[str], classes: list[str], predictions: Path, confusion: Path
) -> None:
    """predictions.csv (one row per test image) and confusion_matrix.json."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "path", "label", "pred", "label_name", "pred_name", "confidence"])
    for i, y, p, c in zip(result.indices, result.labels, result.preds, result.confidences):
        writer.writerow([i, paths_by_index[i], y, p, classes[y], classes[p], f"{c:.6f}"])
    atomic_write_text(predictions, buf.getvalue())
    atomic_write_json(
        confusion,
        {
            "classes": classes,
            "matrix": confusion_matrix(result.labels, result.preds, len(classes)),
            "accuracy": result.accuracy,
            "count": result.count,
        },
    )
