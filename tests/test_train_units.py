"""Unit tests of the training pieces: checkpoints, RNG, precision, schedule, sampler."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnncam.config import load_config
from cnncam.errors import CheckpointError
from cnncam.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cnncam.train.distributed import DistInfo, first_host
from cnncam.train.optim import EarlyStopping, LRSchedule, build_optimizer
from cnncam.train.precision import Precision
from cnncam.train.sampler import EpochBatchSampler


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    state = {
        "model": nn.Linear(3, 2).state_dict(),
        "meta": {"classes": ["a", "b"], "x": [1, 2.5, None]},
        "rng": [rng_state()],
    }
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["meta"] == state["meta"]
    # Only plain types and tensors: loadable by torch.load(weights_only=True) directly.
    torch.load(tmp_path / "c.pt", weights_only=True)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    real_save = torch.save

    def dying_save(obj: object, f: object, *a: object, **k: object) -> None:
        real_save(obj, f, *a, **k)
        f.write(b"garbage")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_on_cpu(mode: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = Precision(mode, torch.device("cpu"))
    assert prec.scaler.is_enabled() == (mode == "fp16")  # GradScaler only for fp16
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    with prec.autocast():
        out = model(x)
    assert out.dtype == dtype
    loss = nn.functional.cross_entropy(out.float(), y)
    prec.backward_step(loss, opt, list(model.parameters()), clip=1.0)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = prec.state_dict()
    if mode == "fp16":
        assert state["scale"] > 0
        other = Precision(mode, torch.device("cpu"))
        other.load_state_dict(state)
        assert other.scaler.get_scale() == prec.scaler.get_scale()


def _schedule(*overrides: str, steps: int = 10) -> LRSchedule:
    cfg = load_config(None, ["train.lr=1.0", "train.epochs=4", *overrides]).train
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    return LRSchedule(opt, cfg, steps)


def test_warmup_then_cosine() -> None:
    s = _schedule("train.scheduler=cosine", "train.warmup_epochs=1", "train.min_lr=0.1")
    assert s.set_step(0) == pytest.approx(0.1)  # (0+1)/10 of the way up
    assert s.set_step(9) == pytest.approx(1.0)
    mid = 10 + 15  # halfway through the 30 post-warm-up steps
    assert s.set_step(mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.set_step(40) == pytest.approx(0.1)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_step_and_plateau_schedules() -> None:
    s = _schedule("train.scheduler=step", "train.step_size=2", "train.gamma=0.5")
    assert [s.set_step(e * 10) for e in range(4)] == pytest.approx([1, 1, 0.5, 0.5])
    p = _schedule("train.scheduler=plateau", "train.plateau_patience=1", "train.plateau_factor=0.5")
    for acc in [0.5, 0.6, 0.6, 0.6]:  # two epochs without improvement > patience 1
        p.epoch_end(acc, higher_is_better=True)
    assert p.set_step(0) == pytest.approx(0.5)
    q = _schedule("train.scheduler=plateau")
    q.load_state_dict(p.state_dict())
    assert q.set_step(0) == pytest.approx(0.5)


def test_early_stopping() -> None:
    e = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert e.update(1.0, 1) and e.update(0.9, 2)
    assert not e.update(0.895, 3)  # within min_delta: not an improvement
    assert not e.should_stop
    assert not e.update(0.95, 4)
    assert e.should_stop and e.best == 0.9 and e.best_epoch == 2


def test_sampler_ranks_cover_the_global_batches() -> None:
    single = EpochBatchSampler(23, 8, seed=1)
    ranks = [EpochBatchSampler(23, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(3)
    singles = list(single)
    per_rank = [list(r) for r in ranks]
    assert len(singles) == len(per_rank[0]) == len(per_rank[1]) == 3
    for b, (b0, b1) in enumerate(zip(*per_rank)):
        assert sorted(singles[b]) == sorted(b0 + b1)
        assert single.global_batch_size(b) == len(singles[b])
    assert all(epoch == 3 for batch in singles for _, epoch in batch)
    # Deterministic per (seed, epoch) and resumable at any batch.
    single.set_epoch(3, start_batch=1)
    assert list(single) == singles[1:]
    single.set_epoch(4)
    assert list(single) != singles


def test_sampler_drops_a_final_batch_too_small_for_batchnorm() -> None:
    s = EpochBatchSampler(17, 8, seed=0)  # 8 + 8 + 1
    assert [len(b) for b in s] == [8, 8]


def test_dist_info_from_slurm_env() -> None:
    env = {
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
    }
    d = DistInfo.from_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr) == (1, 1, 2, "gpu07")
    assert d.master_port == 20000 + 1234
    # The batch script of a 2-task job is one process, not rank 0 of 2.
    batch = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}
    assert not DistInfo.from_env(batch).is_distributed
    assert DistInfo.from_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}).world_size == 4
    assert first_host("node1") == "node1" and first_host("a[3],b") == "a3"


def test_optimizer_choices_and_no_decay_on_norms() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for name, cls in [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]:
        cfg = load_config(None, [f"train.optimizer={name}", "train.weight_decay=0.1"]).train
        opt = build_optimizer(model, cfg)
        assert isinstance(opt, cls)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert len(opt.param_groups[0]["params"]) == 1  # only the conv weight is decayed
