"""Shared helpers for the training tests: a tiny synthetic dataset and config."""

from __future__ import annotations

from pathlib import Path

import torch

from cnncam.config import RunConfig, load_config
from cnncam.data import generate_shapes
from cnncam.stop import StopFlag


def tiny_dataset(root: Path, per_class: int = 16, size: int = 32, classes: int = 3) -> Path:
    if not (root / "boxes.json").exists():
        generate_shapes(root, num_classes=classes, per_class=per_class, image_size=size, seed=0)
    return root


def tiny_config(tmp: Path, data: Path, *extra: str, name: str = "t") -> RunConfig:
    overrides = [
        f"name={name}",
        f"runs_dir={tmp / 'runs'}",
        f"data.root={data}",
        "data.image_size=32",
        "data.resize=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.augment=full",
        "model.channels=[8,16]",
        "train.epochs=2",
        "train.log_every=2",
        "train.lr=0.01",
        "train.warmup_epochs=0.5",
        *extra,
    ]
    return load_config(None, overrides)


def state_of(run_dir: Path, which: str = "last.pt") -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / which, weights_only=True)
    return ckpt["model"]


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{k} differs: max abs diff {(a[k].float() - b[k].float()).abs().max()}"
        )


class StopAfter(StopFlag):
    """Requests a stop once it has been polled ``n`` times (training polls once per step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    @property  # type: ignore[override]
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass
