"""Unit tests of the training pieces: checkpoints, RNG, precision, schedule, sampler."""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnncam.config import load_config, to_dict, valid_keys
from cnncam.errors import CheckpointError
from cnncam.train.checkpoint import (
    FORMAT_VERSION,
    RESUME_FREE,
    RESUME_MUTABLE,
    RESUME_NUMERICS,
    RESUME_RULED,
    check_resume_config,
    config_changes,
    load_checkpoint,
    load_checkpoint_and_sha256,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from cnncam.train.distributed import DistInfo, first_host
from cnncam.train.optim import EarlyStopping, LRSchedule, build_optimizer
from cnncam.train.precision import Precision, numerics
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
    with pytest.raises(CheckpointError, match="'.*nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="'.*torn.pt' cannot be loaded"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="'.*foreign.pt' has format_version None"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save([1, 2], tmp_path / "list.pt")  # not even a dict
    with pytest.raises(CheckpointError, match="has format_version None"):
        load_checkpoint(tmp_path / "list.pt")
    # A pickled object is never unpickled (weights_only): loading it cannot run code.
    torch.save({"format_version": FORMAT_VERSION, "evil": argparse.Namespace(a=1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "pickle.pt")
    save_checkpoint(tmp_path / "ok.pt", {"model": {}})
    assert load_checkpoint_and_sha256(tmp_path / "ok.pt", digest=False)[1] == ""


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
    assert q.state_dict() == p.state_dict() == {"plateau_scale": 0.5, "plateau_best": 0.6, "plateau_bad": 0}


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
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    conv, bn, lin = model[0], model[1], model[3]
    for name, cls in [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]:
        cfg = load_config(None, [f"train.optimizer={name}", "train.weight_decay=0.1", "train.lr=0.05"]).train
        opt = build_optimizer(model, cfg)
        assert isinstance(opt, cls)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
        # Weights of every rank >= 2 decay; biases and norm scales (rank 1) do not; frozen ones are left out.
        decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
        assert decay == {id(conv.weight), id(lin.weight)}
        assert no_decay == {id(conv.bias), id(bn.weight), id(bn.bias), id(lin.bias)}
    sgd = build_optimizer(model, load_config(None, ["train.optimizer=sgd", "train.momentum=0.9"]).train)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is True
    plain = build_optimizer(model, load_config(None, ["train.optimizer=sgd", "train.momentum=0"]).train)
    assert plain.param_groups[0]["nesterov"] is False  # torch refuses Nesterov without momentum


# ----------------------------------------------------------------------------------------------
# Tests that bite: each one fails on a named mutant of precision/optim/sampler/checkpoint.


def _linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])


def _reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("clip_ratio", [None, 0.25])
def test_backward_step_is_one_sgd_step_on_the_clipped_gradient(clip_ratio: float | None) -> None:
    model, x, y = _linear_problem()
    params = list(model.parameters())
    grads = _reference_grads(model, x, y)
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    clip = None if clip_ratio is None else norm * clip_ratio
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    Precision("fp32", torch.device("cpu")).backward_step(loss, opt, params, clip)
    scale = 1.0 if clip is None else clip / (norm + 1e-6)  # clip_grad_norm_'s coefficient
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), b - 0.5 * scale * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_ratio", [None, 0.25])
def test_fp16_grad_scaler_scales_the_backward_and_unscales_before_clip_and_step(
    clip_ratio: float | None,
) -> None:
    model, x, y = _linear_problem()
    x = x * 0.1  # gradients ~0.03: times the 2**16 loss scale they still fit in fp16
    twin = copy.deepcopy(model)
    prec = Precision("fp16", torch.device("cpu"))
    with prec.autocast():  # reference: the same fp16 forward, plain backward
        ref_loss = nn.functional.cross_entropy(twin(x).float(), y)
    ref = list(torch.autograd.grad(ref_loss, list(twin.parameters())))
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in ref)))
    clip = None if clip_ratio is None else norm * clip_ratio
    seen: list[torch.Tensor] = []
    model.weight.register_hook(lambda g: seen.append(g.detach().clone()))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    scale = prec.scaler.get_scale()
    assert scale > 1  # a real loss scale (2**16 by default)
    with prec.autocast():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    prec.backward_step(loss, torch.optim.SGD(params, lr=0.5), params, clip)
    torch.testing.assert_close(seen[0], ref[0] * scale, rtol=2e-3, atol=1e-2)  # backward saw scaled grads
    coef = 1.0 if clip is None else clip / (norm + 1e-6)
    for p, b, g in zip(params, before, ref):  # ...and the step the true (clipped) ones
        torch.testing.assert_close(p.detach(), b - 0.5 * coef * g, rtol=2e-3, atol=1e-5)
    assert prec.scaler.get_scale() == scale  # no overflow: the scale stays (it grows after 2000 steps)


def test_fp16_overflow_skips_the_step_and_halves_the_scale() -> None:
    model, x, y = _linear_problem()
    prec = Precision("fp16", torch.device("cpu"))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    scale = prec.scaler.get_scale()
    with prec.autocast():
        loss = nn.functional.cross_entropy(
            model(x * 1e3).float(), y, reduction="sum"
        )  # scaled grads overflow
    prec.backward_step(loss, torch.optim.SGD(params, lr=0.5), params, None)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))  # the inf step was skipped
    assert prec.scaler.get_scale() == scale / 2
    assert Precision("bf16", torch.device("cpu")).state_dict() == {}  # bf16 needs no scaler


def test_numerics_sets_and_restores_the_global_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    with numerics(True, torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    ) == before
    with numerics(False, torch.device("cuda")):  # a device object; no GPU needed
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with numerics(False, torch.device("cpu")):
        assert not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before[0]


def test_schedule_with_one_step_per_epoch() -> None:
    s = _schedule("train.scheduler=cosine", steps=1)  # 4 epochs of one step: the total is 4 steps
    assert [s.factor(k) for k in range(5)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    )
    st = _schedule("train.scheduler=step", "train.step_size=1", "train.gamma=0.5", steps=1)
    assert [st.factor(k) for k in range(3)] == pytest.approx([1.0, 0.5, 0.25])


def test_schedule_factors_follow_the_formulas() -> None:
    s = _schedule("train.scheduler=none", "train.warmup_epochs=0.5")  # 5 warm-up steps of 10/epoch
    assert [s.factor(k) for k in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert s.factor(39) == 1.0 and s.factor(400) == 1.0
    c = _schedule("train.scheduler=cosine", "train.min_lr=0.2")  # 40 steps, no warm-up
    assert c.factor(0) == pytest.approx(1.0)
    assert c.factor(10) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert c.factor(40) == pytest.approx(0.2) and c.factor(80) == pytest.approx(0.2)
    st = _schedule("train.scheduler=step", "train.step_size=1", "train.gamma=0.1", "train.min_lr=0.05")
    assert [st.factor(e * 10 + 9) for e in range(4)] == pytest.approx([1.0, 0.1, 0.05, 0.05])
    assert st.factor(9) == 1.0 and st.factor(10) == pytest.approx(0.1)  # steps at the epoch boundary


def test_plateau_waits_patience_epochs_then_scales() -> None:
    p = _schedule("train.scheduler=plateau", "train.plateau_patience=2", "train.plateau_factor=0.5")
    for loss in [1.0, 1.1, 1.2]:  # two bad epochs: not more than patience 2 yet
        p.epoch_end(loss, higher_is_better=False)
    assert p.factor(0) == 1.0
    p.epoch_end(1.3, higher_is_better=False)
    assert p.factor(0) == pytest.approx(0.5)
    p.epoch_end(0.9, higher_is_better=False)  # improvement resets the count
    for loss in [0.95, 0.95]:
        p.epoch_end(loss, higher_is_better=False)
    assert p.factor(0) == pytest.approx(0.5)
    p.epoch_end(0.95, higher_is_better=False)  # a third bad epoch: the scale shrinks again
    assert p.factor(0) == pytest.approx(0.25)
    acc = _schedule("train.scheduler=plateau", "train.plateau_patience=0")
    acc.epoch_end(0.5, higher_is_better=True)
    acc.epoch_end(0.6, higher_is_better=True)  # higher accuracy is an improvement
    assert acc.factor(0) == 1.0
    acc.epoch_end(0.6, higher_is_better=True)
    assert acc.factor(0) == pytest.approx(0.5)
    state = acc.state_dict()
    assert state == {"plateau_scale": 0.5, "plateau_best": 0.6, "plateau_bad": 0}


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_stops_after_exactly_patience_bad_epochs(patience: int) -> None:
    e = EarlyStopping("val_accuracy", patience=patience, min_delta=0.0)
    assert e.update(0.5, 1) and not e.should_stop
    for bad in range(1, patience + 1):
        assert not e.update(0.5, 1 + bad)  # equal is not better
        assert e.should_stop == (bad == patience)
    assert e.best == 0.5 and e.best_epoch == 1 and e.bad_epochs == patience
    assert e.update(0.51, 9) and e.bad_epochs == 0 and not e.should_stop
    off = EarlyStopping("val_loss", patience=0, min_delta=0.0)
    off.update(1.0, 1)
    for k in range(20):
        off.update(2.0, k + 2)
    assert not off.should_stop  # patience 0 disables early stopping
    restored = EarlyStopping("val_accuracy", patience=patience, min_delta=0.0)
    restored.load_state_dict(e.state_dict())
    assert restored.state_dict() == {"best": 0.51, "best_epoch": 9, "bad_epochs": 0}


def test_early_stopping_min_delta_is_strict_in_both_directions() -> None:
    acc = EarlyStopping("val_accuracy", patience=5, min_delta=0.1)
    assert acc.update(0.5, 1)
    assert not acc.update(0.6, 2)  # +0.1 is not more than min_delta
    assert acc.update(0.61, 3)
    loss = EarlyStopping("val_loss", patience=5, min_delta=0.1)
    assert loss.update(1.0, 1)
    assert not loss.update(0.9, 2) and not loss.update(1.5, 3)
    assert loss.update(0.89, 4) and loss.best == 0.89


def test_sampler_rank_shares_are_contiguous_slices_of_the_global_batch() -> None:
    single = EpochBatchSampler(27, 8, seed=3)  # 8 + 8 + 8 + 3: every rank gets a share
    ranks = [EpochBatchSampler(27, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    for epoch in (0, 5):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        shares = [list(r) for r in ranks]
        for b, whole in enumerate(single):
            # rank 0 takes the first third, rank 1 the next...: concatenated in rank order == the batch
            assert [i for share in shares for i in share[b]] == whole
            assert [len(share[b]) for share in shares] == [
                len(t) for t in torch.tensor_split(torch.arange(len(whole)), 3)
            ]


def test_sampler_epoch_orders_are_seeded_permutations() -> None:
    s = EpochBatchSampler(40, 8, seed=7)
    orders = {}
    for epoch in range(4):
        s.set_epoch(epoch)
        flat = [i for batch in s for i, e in batch]
        assert sorted(flat) == list(range(40))  # every sample once per epoch (40 = 5 full batches)
        assert all(e == epoch for batch in s for _, e in batch)
        orders[epoch] = flat
    assert len({tuple(o) for o in orders.values()}) == 4  # each epoch its own order
    again = EpochBatchSampler(40, 8, seed=7)
    again.set_epoch(2)
    assert [i for batch in again for i, _ in batch] == orders[2]  # a pure function of (seed, epoch)
    other = EpochBatchSampler(40, 8, seed=8)
    other.set_epoch(2)
    assert [i for batch in other for i, _ in batch] != orders[2]
    plain = EpochBatchSampler(20, 8, seed=7, shuffle=False)
    assert [i for batch in plain for i, _ in batch] == list(range(20))  # in order, small last batch kept
    assert len(s) == 5
    s.set_epoch(1, start_batch=3)
    assert len(s) == 2 and [len(b) for b in s] == [8, 8]


def test_sampler_drops_a_last_batch_smaller_than_the_ranks() -> None:
    assert len(EpochBatchSampler(17, 8, seed=0, world_size=1).global_batches(0)) == 2  # 1 sample: dropped
    assert len(EpochBatchSampler(18, 8, seed=0, world_size=1).global_batches(0)) == 3  # 2 samples: kept
    assert len(EpochBatchSampler(19, 8, seed=0, world_size=4).global_batches(0)) == 2  # 3 < 4 ranks
    assert len(EpochBatchSampler(20, 8, seed=0, world_size=4).global_batches(0)) == 3


def test_config_changes_and_refusal_name_the_keys(tmp_path: Path) -> None:
    saved = to_dict(load_config(None, ["train.epochs=2"]))
    now = to_dict(load_config(None, ["train.epochs=5", "data.num_workers=0", "cam.batch_size=3"]))
    assert config_changes(now, saved) == {"train.epochs": (2, 5), "data.num_workers": (2, 0)}
    check_resume_config(now, saved, tmp_path / "last.pt")  # all allowed
    bad = to_dict(load_config(None, ["train.lr=0.5", "model.dropout=0.1", "train.epochs=5"]))
    with pytest.raises(CheckpointError) as err:
        check_resume_config(bad, saved, tmp_path / "last.pt")
    msg = str(err.value)
    assert (
        "model.dropout: 0.3 -> 0.1" in msg and "train.lr: 0.001 -> 0.5" in msg and "train.epochs" not in msg
    )
    assert "last.pt" in msg and "--set name=" in msg


def test_resume_key_lists_name_real_keys() -> None:
    keys = set(valid_keys())
    assert set(RESUME_MUTABLE) <= keys
    assert set(RESUME_MUTABLE) == set(RESUME_FREE) | set(RESUME_RULED) | set(RESUME_NUMERICS)
    # The keys that change a step's maths must never be listed as mutable.
    for key in ("train.lr", "train.scheduler", "train.warmup_epochs", "train.label_smoothing", "seed"):
        assert key not in RESUME_MUTABLE


def test_checkpoint_format_version_is_written_and_checked(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}})
    state, sha = load_checkpoint_and_sha256(tmp_path / "c.pt")
    assert sha == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()
    assert torch.equal(state["model"]["w"], torch.ones(2))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "c.pt")


def test_fresh_early_stopping_and_sampler_state() -> None:
    e = EarlyStopping("val_accuracy", patience=1, min_delta=0.0)
    assert e.state_dict() == {"best": None, "best_epoch": -1, "bad_epochs": 0}
    assert not e.should_stop  # patience 1 must not stop a run before its first epoch
    s = EpochBatchSampler(20, 8, seed=1)
    first = list(s)  # no set_epoch yet: epoch 0 from its start
    s.set_epoch(0)
    assert first == list(s) and all(e == 0 for batch in first for _, e in batch)
    s.set_epoch(0, start_batch=len(s.global_batches(0)))
    assert len(s) == 0 and list(s) == []  # resumed exactly at an epoch's end: nothing left


def test_sampler_order_is_the_documented_permutation_and_cached() -> None:
    s = EpochBatchSampler(50, 10, seed=3)
    for epoch in (0, 1, 7):
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert torch.equal(torch.cat(s.global_batches(epoch)), expected)
    # global_batch_size() runs every step: the permutation is computed once per epoch, not per call.
    assert s.global_batches(7) is s.global_batches(7)


def test_seed_everything_seeds_every_rng() -> None:
    def draws() -> tuple[float, float, float]:
        return float(torch.rand(1)), float(np.random.rand()), random.random()

    seed_everything(5)
    a = draws()
    seed_everything(5)
    assert draws() == a
    seed_everything(7)
    b = draws()
    assert all(x != y for x, y in zip(a, b))
    seed_everything(2**32 + 5)  # numpy takes 32-bit seeds: reduced modulo 2**32, not an error
    assert draws()[1] == a[1]


def test_resume_check_fills_keys_added_since_with_their_defaults(tmp_path: Path) -> None:
    now = to_dict(load_config(None, []))
    old = to_dict(load_config(None, []))
    del old["model"]["head"], old["train"]["deterministic"]  # a checkpoint from before these keys
    check_resume_config(now, old, tmp_path / "last.pt")
    assert config_changes(now, old) == {}
    assert config_changes(now, {**old, "train": {**old["train"], "dropped_key": 1}}) == {
        "train.dropped_key": (1, None)
    }
    flat = to_dict(load_config(None, ["model.head=flatten"]))
    with pytest.raises(CheckpointError, match=r"model\.head: 'gap' -> 'flatten'"):
        check_resume_config(flat, old, tmp_path / "last.pt")
    old["train"]["dropped_key"] = 1  # a key this version no longer has is a difference
    with pytest.raises(CheckpointError, match=r"train\.dropped_key: 1 -> None"):
        check_resume_config(now, old, tmp_path / "last.pt")


def test_resume_refusal_lists_eight_keys_then_counts() -> None:
    saved = to_dict(load_config(None, []))
    keys = [
        "train.lr=0.5",
        "train.momentum=0.5",
        "train.weight_decay=0.5",
        "train.gamma=0.5",
        "train.min_lr=0.0001",
        "train.label_smoothing=0.5",
        "train.warmup_epochs=3",
        "train.step_size=3",
        "train.plateau_factor=0.25",
        "train.plateau_patience=9",
    ]
    now = to_dict(load_config(None, keys))
    with pytest.raises(CheckpointError) as err:
        check_resume_config(now, saved, "last.pt")
    msg = str(err.value)
    assert "(train.gamma: 0.1 -> 0.5, train.label_smoothing: 0.0 -> 0.5, train.lr: 0.001 -> 0.5, " in msg
    assert msg.count(" -> ") == 8 and "and 2 more)" in msg


def test_resume_refusal_with_exactly_eight_keys_counts_nothing_more() -> None:
    saved = to_dict(load_config(None, []))
    keys = ["train.lr=0.5", "train.momentum=0.5", "train.weight_decay=0.5", "train.gamma=0.5"]
    keys += ["train.min_lr=0.0001", "train.label_smoothing=0.5", "train.warmup_epochs=3", "train.step_size=3"]
    with pytest.raises(CheckpointError) as err:
        check_resume_config(to_dict(load_config(None, keys)), saved, "last.pt")
    msg = str(err.value)
    assert msg.count(" -> ") == 8 and "more)" not in msg


def test_cosine_ends_at_min_lr_whatever_the_base_lr() -> None:
    """min_lr is an absolute learning rate: the decay floor is min_lr / lr (the tests above use lr 1)."""
    c = _schedule("train.lr=0.5", "train.scheduler=cosine", "train.min_lr=0.1")  # 40 steps
    assert c.factor(40) == pytest.approx(0.2) and c.set_step(40) == pytest.approx(0.1)
    args = ("train.lr=0.5", "train.scheduler=step", "train.step_size=1", "train.gamma=0.01")
    assert _schedule(*args, "train.min_lr=0").set_step(35) == pytest.approx(0.5 * 0.01**3)
    assert _schedule(*args, "train.min_lr=0.001").set_step(35) == pytest.approx(0.001)  # the floor


def test_fp16_scaler_is_enabled_on_the_cpu_device() -> None:
    """The scaler belongs to the device it runs on: a CUDA scaler on a CPU-only machine disables itself."""
    prec = Precision("fp16", torch.device("cpu"))
    assert prec.scaler.is_enabled() and prec.scaler.get_scale() > 1
    assert not Precision("bf16", torch.device("cpu")).scaler.is_enabled()


def test_checkpoints_are_read_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch >= 2.6 defaults to weights_only=True, but the clusters' torch >= 2.3 does not: pass it."""
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    seen: list[object] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path)
    load_checkpoint_and_sha256(path)
    assert seen == [True, True]


def test_rng_state_restores_numpy_gaussian_cache_and_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    np.random.seed(0)
    np.random.standard_normal()  # legacy numpy caches the second normal of each pair
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    a = np.random.standard_normal(3)
    set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(3), a)
    # CUDA generators: restored when the checkpoint has them and a GPU is visible (recorded here).
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    set_rng_state({**state, "cuda": [torch.ones(3, dtype=torch.uint8)]})
    assert len(calls) == 1 and torch.equal(calls[0][0], torch.ones(3, dtype=torch.uint8))  # type: ignore[index]
    set_rng_state({**state, "cuda": []})  # a checkpoint written on a CPU-only node
    assert len(calls) == 1


def test_sampler_keeps_an_eval_style_last_batch_of_one_and_counts_fresh() -> None:
    plain = EpochBatchSampler(17, 8, seed=0, shuffle=False)
    assert [len(b) for b in plain] == [8, 8, 1]  # in-order (evaluation) batches lose no sample
    assert len(EpochBatchSampler(17, 8, seed=0)) == 2 and len(plain) == 3


def test_load_checkpoint_maps_devices_and_does_not_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}})
    assert load_checkpoint(tmp_path / "c.pt", "meta")["model"]["w"].device.type == "meta"
    assert load_checkpoint(tmp_path / "c.pt")["model"]["w"].device.type == "cpu"

    def no_hash(f: object) -> str:
        raise AssertionError("load_checkpoint hashed the file: a full extra read of every checkpoint")

    monkeypatch.setattr("cnncam.train.checkpoint.file_sha256", no_hash)
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.ones(2))


def test_rng_state_saves_cuda_generators_when_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rng_state()["cuda"] == [] or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((4,), 7, dtype=torch.uint8)])
    state = rng_state()
    assert len(state["cuda"]) == 1 and torch.equal(state["cuda"][0], torch.full((4,), 7, dtype=torch.uint8))
