"""Training: ``run_training(cfg, stop)`` trains or resumes the run ``cfg.run_dir``.

The heavy imports (data, models) happen on first use, so ``cnncam.train.checkpoint``
and friends stay cheap to import (the launcher and report need them without a dataset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnncam.stop import StopFlag as StopFlag

if TYPE_CHECKING:
    from cnncam.train.trainer import TrainResult as TrainResult
    from cnncam.train.trainer import run_training as run_training


def __getattr__(name: str) -> Any:
    if name in ("run_training", "TrainResult"):
        from cnncam.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'cnncam.train' has no attribute {name!r}")
