"""Optimizers and one resumable learning-rate schedule.

Warm-up, cosine / step decay and reduce-on-plateau are folded into one small class
whose whole state is three numbers, so exact resume never depends on the internals
of chained torch schedulers.  The LR is set every iteration from the global step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cnncam.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm parameters (standard practice, e.g. timm's
    # param_groups_weight_decay): decaying BN scales fights the normalisation.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


class LRSchedule:
    """lr(step) = base_lr · warmup(step) · decay(step), decay ∈ {1, cosine, step, plateau}."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.plateau_scale = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0

    def factor(self, step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        min_ratio = cfg.min_lr / cfg.lr
        if cfg.scheduler == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            decay = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.scheduler == "step":
            decay = max(min_ratio, cfg.gamma ** ((step // self.steps_per_epoch) // cfg.step_size))
        elif cfg.scheduler == "plateau":
            decay = max(min_ratio, self.plateau_scale)
        else:
            decay = 1.0
        return warm * decay

    def set_step(self, step: int) -> float:
        lr = self.cfg.lr * self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def epoch_end(self, metric: float, higher_is_better: bool) -> None:
        """ReduceLROnPlateau semantics: scale by plateau_factor after `plateau_patience` bad epochs."""
        if self.cfg.scheduler != "plateau":
            return
        value = metric if higher_is_better else -metric
        if self.plateau_best is None or value > self.plateau_best:
            self.plateau_best, self.plateau_bad = value, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.plateau_bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]


class EarlyStopping:
    """Tracks the monitored metric: best value/epoch and epochs without improvement."""

    def __init__(self, monitor: str, patience: int, min_delta: float) -> None:
        self.higher_is_better = monitor.endswith("accuracy")
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's metric; True when it is a new best."""
        signed = value if self.higher_is_better else -value
        best = None if self.best is None else (self.best if self.higher_is_better else -self.best)
        if best is None or signed > best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
