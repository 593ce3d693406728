"""What a run's training state means across starts: is there work, what changed, which model is best.

A run directory is started many times (requeues, resumes, "train it for longer").  The rules:

* an *interrupted* run resumes where ``last.pt`` stopped; ``train.epochs`` may grow, never shrink
  below what was already trained (an error names the smallest valid value);
* a *finished* run asked for more epochs (or with a patience that no longer stops it) trains them;
  asked for the same or fewer, it is left alone and ``config.yaml`` is not rewritten;
* every accepted config change is recorded in ``provenance.json`` (the restart's
  ``config_changes``); a change of ``train.epochs`` also writes a ``kind: schedule`` line to
  ``metrics.jsonl``: from that step on the LR is the one a run of the new length has at the same
  step (cosine is re-defined over the new total; warm-up, step and plateau do not depend on it).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnncam.config import ModelConfig, RunConfig, TrainConfig
from cnncam.errors import CheckpointError
from cnncam.models import create_model
from cnncam.models.simple import receptive_field
from cnncam.runs import MetricsLog, RunPaths, atomic_write_json, read_json
from cnncam.train.checkpoint import load_checkpoint, rng_state, set_rng_state
from cnncam.train.distributed import DistInfo
from cnncam.train.evaluate import evaluate, write_predictions
from cnncam.train.precision import Precision
from cnncam.train.setup import DataBundle, eval_loader

log = logging.getLogger("cnncam.train")


def has_work(tc: TrainConfig, epoch: int, batch: int, finished: bool, should_stop: bool, path: Path) -> bool:
    """Whether a start with ``tc`` trains (or tests) anything, given the checkpoint's position.

    Raises :class:`CheckpointError` when an interrupted run is asked for fewer epochs than it has
    already (partly) trained.
    """
    more = epoch < tc.epochs and not should_stop
    if finished:
        return more
    trained = epoch + (1 if batch > 0 else 0)
    if trained > tc.epochs:
        raise CheckpointError(
            f"{path}: train.epochs={tc.epochs} is below what this interrupted run has trained "
            f"({epoch} epochs and {batch} steps of the next); use train.epochs >= {trained}"
        )
    return True


def record_changes(
    paths: RunPaths,
    metrics: MetricsLog,
    changes: dict[str, tuple[Any, Any]],
    tc: TrainConfig,
    epoch: int,
    step: int,
    next_lr: float,
) -> None:
    """Write this start's accepted config ``changes`` (key -> (saved, now)) to provenance/metrics."""
    if not changes:
        return
    prov = read_json(paths.provenance)
    prov.setdefault("restarts", [{}])[-1]["config_changes"] = {k: list(v) for k, v in changes.items()}
    atomic_write_json(paths.provenance, prov)
    if "train.epochs" not in changes:
        return
    old, new = changes["train.epochs"]
    metrics.append(
        {
            "split": "train",
            "kind": "schedule",
            "epoch": epoch,
            "step": step,
            "key": "train.epochs",
            "from": old,
            "to": new,
            "scheduler": tc.scheduler,
            "rule": "new_total_from_current_step",
            "lr": next_lr,
        }
    )
    log.info(
        "train.epochs %s -> %s at step %d: from here the %s schedule is that of a %s-epoch run (lr %.3g)",
        old,
        new,
        step,
        tc.scheduler,
        new,
        next_lr,
    )


def warn_receptive_field(model: ModelConfig, image_size: int) -> bool:
    """Log a warning (and return True) when simple_cnn's GAP head cannot see a whole image."""
    if model.name != "simple_cnn" or model.head != "gap":
        return False
    rf = receptive_field(len(model.channels), model.convs_per_block, model.last_pool)
    if rf >= image_size:
        return False
    log.warning(
        "simple_cnn sees %d px per position (%d blocks x %d convs) but data.image_size is %d: the GAP "
        "head only averages local patches. Use model.convs_per_block=2, more model.channels blocks, "
        "or model.head=flatten",
        rf,
        len(model.channels),
        model.convs_per_block,
        image_size,
    )
    return True


def final_test(
    cfg: RunConfig,
    data: DataBundle,
    paths: RunPaths,
    trained: nn.Module,
    precision: Precision,
    metrics: MetricsLog,
    step: int,
    device: torch.device,
) -> float | None:
    """Evaluate best.pt on the test split → predictions.csv, confusion_matrix.json, a ``final`` line.

    best.pt goes into a *separate* model (:func:`best_model`): ``trained`` keeps the last step's
    weights, saved as last.pt right after.  Every RNG is restored afterwards (model init and the
    loader draw from them), so a finished run extended later continues as if never tested.
    """
    if not len(data.test):
        log.info("no test split: skipping final evaluation")
        return None
    rngs = rng_state()
    try:
        model, best_epoch = best_model(
            cfg.model, data.num_classes, paths.best_ckpt, trained, device, cfg.train.channels_last
        )
        loader = eval_loader(data.test, cfg, DistInfo(), device)
        res = evaluate(model, loader, precision, device, cfg.train.channels_last, collect=True, reduce=False)
    finally:
        set_rng_state(rngs)
    tests = [p for p, _ in data.index.splits["test"]]
    write_predictions(res, tests, data.index.classes, paths.predictions, paths.confusion)
    epoch = best_epoch  # None: no best.pt (deleted?), the last weights were tested
    metrics.append(
        {
            "split": "test",
            "kind": "final",
            "epoch": epoch,
            "step": step,
            "loss": res.loss,
            "accuracy": res.accuracy,
        }
    )
    log.info(
        "test (epoch %s): loss %.4f accuracy %.4f on %d images", epoch, res.loss, res.accuracy, res.count
    )
    return res.accuracy


def best_model(
    cfg: ModelConfig,
    num_classes: int,
    best: Path,
    fallback: nn.Module,
    device: torch.device,
    channels_last: bool,
) -> tuple[nn.Module, int | None]:
    """(a *new* model holding ``best``'s weights, its epoch); ``fallback``'s weights when absent.

    The training model is never loaded with other weights: it must stay the last step's state.
    """
    # Weights come from the file: no ImageNet file needed, and freezing does not matter in eval.
    model = create_model(replace(cfg, pretrained=None, freeze_backbone=False), num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if best.exists():
        state = load_checkpoint(best, device)
        model.load_state_dict(state["model"])
        return model, int(state["epoch"])
    model.load_state_dict(fallback.state_dict())
    return model, None


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` when not distributed."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
