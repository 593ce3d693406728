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


# A fixture whose best epoch is never the last: with min_delta 10 no epoch after the first can
# "improve" the monitored accuracy, so best.pt is epoch 1 and last.pt must differ from it.
BEST_IS_FIRST = ("train.min_delta=10",)


def checkpoint(run_dir: Path, which: str = "last.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / which, weights_only=True)  # type: ignore[no-any-return]


def assert_same_tree(a: object, b: object, where: str = "") -> None:
    """Equal nested dicts/lists/tensors/numbers, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run_state(a: Path, b: Path, which: str = "last.pt", ignore: tuple[str, ...] = ()) -> None:
    """Two runs' checkpoints hold the same state: everything but their names, the config keys
    ``ignore`` (dotted) and wall-clock seconds."""
    ca, cb = checkpoint(a, which), checkpoint(b, which)
    for c in (ca, cb):
        for key in ("name", "runs_dir", *ignore):
            *parents, leaf = key.split(".")
            section = c["meta"]["config"]
            for part in parents:
                section = section[part]
            section.pop(leaf)
        if "window" in c:
            c["window"] = c["window"][:3]  # the 4th entry is elapsed seconds
    assert_same_tree(ca, cb, which)


def epoch_rows(run_dir: Path) -> list[dict]:
    from cnncam.runs import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
