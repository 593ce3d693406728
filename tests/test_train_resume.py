"""Exact resume: interrupted (stop flag, SIGKILL) + resumed == uninterrupted, bit for bit, in the
whole last.pt, in best.pt and in every line of metrics.jsonl -- on a fixture whose best epoch is
not the last one, so last.pt and best.pt are two separate checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import (
    BEST_IS_FIRST,
    StopAfter,
    assert_same_run_state,
    checkpoint,
    tiny_config,
    tiny_dataset,
)

from cnncam.errors import CheckpointError
from cnncam.runs import read_metrics
from cnncam.train import run_training

TESTS = Path(__file__).resolve().parent
EPOCHS = 3


def _records(run_dir: Path) -> list[dict]:
    """Every metrics line (iterations, epochs, final test) without the wall-clock throughput."""
    recs = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]


def _assert_same_as(straight: Path, run: Path) -> None:
    assert_same_run_state(straight, run, "last.pt")
    assert_same_run_state(straight, run, "best.pt")
    assert _records(straight) == _records(run)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "iter"]
    assert steps == sorted(set(steps))  # lines logged after a checkpoint are not duplicated


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("straight"), data, f"train.epochs={EPOCHS}", *BEST_IS_FIRST)
    res = run_training(cfg)
    # best != last, or comparing last.pt and best.pt would be one check, not two.
    assert res.status == "completed" and res.epoch == EPOCHS and res.best_epoch == 1
    assert checkpoint(cfg.run_dir)["epoch"] == EPOCHS and checkpoint(cfg.run_dir, "best.pt")["epoch"] == 1
    return cfg.run_dir


def _steps_per_epoch(straight: Path) -> int:
    return int(checkpoint(straight)["global_step"]) // EPOCHS


def test_stops_mid_epoch_and_at_epoch_end_resume_bit_identically(
    tmp_path: Path, data: Path, straight: Path
) -> None:
    cfg = tiny_config(tmp_path, data, f"train.epochs={EPOCHS}", *BEST_IS_FIRST)
    spe = _steps_per_epoch(straight)
    # Stop mid-epoch 1 (step 3), then exactly at the end of epoch 2, then mid-epoch 3, then finish.
    first = run_training(cfg, StopAfter(2))
    assert first.status == "interrupted" and first.global_step == 3
    second = run_training(cfg, StopAfter(2 * spe - 3 - 1))
    assert second.status == "interrupted" and second.global_step == 2 * spe
    third = run_training(cfg, StopAfter(0))
    assert third.status == "interrupted" and third.global_step == 2 * spe + 1
    assert run_training(cfg).status == "completed"
    _assert_same_as(straight, cfg.run_dir)
    prov = json.loads((cfg.run_dir / "provenance.json").read_text())
    assert len(prov["restarts"]) == 3


_CHILD = """
import os, signal, sys
from pathlib import Path
from train_helpers import BEST_IS_FIRST, tiny_config
from cnncam.stop import StopFlag
from cnncam.train import run_training

class KillAt(StopFlag):
    # SIGKILL at poll n: no handler, no checkpoint, no flush -- what the OOM killer does.
    def __init__(self, n):
        super().__init__()
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        if self.n < 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    @requested.setter
    def requested(self, value):
        pass

tmp, data, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
run_training(tiny_config(tmp, data, "train.epochs=%d", *BEST_IS_FIRST), KillAt(n))
"""


def test_sigkill_mid_epoch_resumes_bit_identically(tmp_path: Path, data: Path, straight: Path) -> None:
    spe = _steps_per_epoch(straight)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD % EPOCHS, str(tmp_path), str(data), str(spe + 2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    cfg = tiny_config(tmp_path, data, f"train.epochs={EPOCHS}", *BEST_IS_FIRST)
    saved = checkpoint(cfg.run_dir)
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (1, 0, spe)  # the epoch-1 checkpoint
    logged = max(r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl"))
    assert logged > spe  # lines written after the checkpoint: the resume must drop them
    assert run_training(cfg).status == "completed"
    _assert_same_as(straight, cfg.run_dir)


def test_fp16_stop_and_resume_keeps_the_grad_scaler(tmp_path: Path, data: Path) -> None:
    runs = {}
    for name, stops in (("a", []), ("b", [4, 0])):
        cfg = tiny_config(tmp_path, data, "train.epochs=2", "train.precision=fp16", name=name)
        for n in stops:
            assert run_training(cfg, StopAfter(n)).status == "interrupted"
        assert run_training(cfg).status == "completed"
        runs[name] = cfg.run_dir
    assert checkpoint(runs["a"])["scaler"]["scale"] > 1  # a real GradScaler state is compared
    assert_same_run_state(runs["a"], runs["b"])


def test_changing_only_free_keys_on_resume_keeps_the_run_identical(
    tmp_path: Path, data: Path, straight: Path
) -> None:
    # RESUME_FREE keys may change between starts without changing a single number.
    cfg = tiny_config(tmp_path, data, f"train.epochs={EPOCHS}", *BEST_IS_FIRST)
    assert run_training(cfg, StopAfter(_steps_per_epoch(straight) + 1)).status == "interrupted"
    moved = tmp_path / "moved"
    moved.symlink_to(data)
    changed = tiny_config(
        tmp_path, data, f"train.epochs={EPOCHS}", *BEST_IS_FIRST, "data.num_workers=2", f"data.root={moved}"
    )
    assert run_training(changed).status == "completed"
    free = ("data.root", "data.num_workers")
    assert_same_run_state(straight, cfg.run_dir, "last.pt", ignore=free)
    assert_same_run_state(straight, cfg.run_dir, "best.pt")  # epoch 1: saved before the change


def test_resume_with_changed_maths_is_refused_naming_the_key(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "train.epochs=2", name="ref")
    run_training(cfg, StopAfter(1))
    before = (cfg.run_dir / "config.yaml").read_bytes()
    for key, value in [
        ("train.lr", "0.5"),
        ("model.channels", "[8,32]"),
        ("data.image_size", "24"),
        ("train.label_smoothing", "0.1"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(key) + ": .* -> "):
            run_training(tiny_config(tmp_path, data, "train.epochs=2", f"{key}={value}", name="ref"))
    assert (cfg.run_dir / "config.yaml").read_bytes() == before
    # More epochs is fine: that is how a user extends a run.
    assert run_training(tiny_config(tmp_path, data, "train.epochs=3", name="ref")).epoch == 3
