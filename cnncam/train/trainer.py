"""Training orchestration: build everything from the config, train, resume exactly.

State lives in the run directory, never in a job pickle: every start of
``run_training`` resumes from ``checkpoints/last.pt`` when it exists (DINO's
``restart_from_checkpoint`` pattern), so a requeued Slurm job needs no extra flags.

Exact resume: the checkpoint holds model, optimizer, LR schedule, grad scaler,
early-stopping state, the position (epoch, batch) inside the epoch, the running
epoch sums and every RNG (per rank).  Sample order and augmentation are pure
functions of (seed, epoch, index) — see ``sampler.py`` and ``ImageDataset`` — so
"2 epochs" and "1 epoch, stop, resume, 1 epoch" produce bit-identical weights on CPU
(and on GPU with ``train.deterministic``).

Run state: ``last.pt`` is always the state after the last completed step (the final test
evaluates ``best.pt`` in a separate model instance and leaves every RNG as it found it), so a
finished run extended with more epochs continues exactly where it stopped.

No host synchronisation per step: the metric sums stay on the device and are read every
``train.log_every`` steps; under DDP the stop flag rides on that same all-reduce.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cnncam.config import RunConfig, to_dict
from cnncam.console import setup_logging, track
from cnncam.models import set_train_mode
from cnncam.models import unwrap_model as unwrap
from cnncam.runs import MetricsLog, RunPaths, write_config, write_provenance
from cnncam.stop import StopFlag
from cnncam.train import distributed as D
from cnncam.train.checkpoint import (
    check_resume_config,
    config_changes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from cnncam.train.evaluate import evaluate
from cnncam.train.optim import EarlyStopping, LRSchedule, build_optimizer
from cnncam.train.precision import Precision, numerics
from cnncam.train.runstate import final_test, gather_objects, has_work, record_changes, warn_receptive_field
from cnncam.train.sampler import EpochBatchSampler
from cnncam.train.setup import DataBundle, build_data, build_model, eval_loader, train_loader

log = logging.getLogger("cnncam.train")


@dataclass(frozen=True)
class TrainResult:
    status: str  # "completed" | "interrupted"
    epoch: int  # epochs completed
    global_step: int
    best_metric: float | None
    best_epoch: int
    test_accuracy: float | None


def run_training(cfg: RunConfig, stop: StopFlag | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.run_dir``; returns when done or when ``stop`` fires."""
    dist = D.DistInfo.from_env()
    setup_logging(dist.rank)
    device = D.select_device(cfg.train.device, dist)
    with numerics(cfg.train.deterministic, device):
        D.init_process_group(dist, device)
        try:
            return Trainer(cfg, dist, device, stop or StopFlag()).fit()
        finally:
            D.destroy_process_group()


class Trainer:
    def __init__(self, cfg: RunConfig, dist: D.DistInfo, device: torch.device, stop: StopFlag) -> None:
        self.cfg, self.dist, self.device, self.stop = cfg, dist, device, stop
        self.paths = RunPaths(cfg.run_dir)
        self.tc = cfg.train
        self.changes: dict[str, tuple[Any, Any]] = {}  # config keys changed since the checkpoint
        ckpt = self._load_last()
        self.resumed = ckpt is not None
        if dist.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed + dist.rank)
        self.data: DataBundle = build_data(cfg, self.paths, dist)
        self.model, self.ddp_model = build_model(cfg, self.data.num_classes, device, dist)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.tc)
        self.sampler = EpochBatchSampler(
            len(self.data.train),
            cfg.data.batch_size,
            cfg.seed,
            shuffle=True,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.steps_per_epoch = len(self.sampler.global_batches(0))
        self.schedule = LRSchedule(self.optimizer, self.tc, self.steps_per_epoch)
        self.precision = Precision(self.tc.precision, device)
        self.early = EarlyStopping(self.tc.monitor, self.tc.patience, self.tc.min_delta)
        self.metrics = MetricsLog(self.paths.metrics, enabled=dist.is_main)
        self.loader = train_loader(self.data.train, self.sampler, cfg, device)
        self.val_loader = eval_loader(self.data.val, cfg, dist, device) if len(self.data.val) else None
        # Position and running sums; overwritten by a checkpoint.  The sums live on the device
        # (float64: exact counts, order-independent enough) and are read every log_every steps.
        self.epoch, self.batch, self.global_step, self.finished = 0, 0, 0, False
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # epoch loss_sum, correct, count
        self.window = torch.zeros(3, dtype=torch.float64, device=device)  # the same since the last log line
        self.window_seconds = 0.0
        if ckpt is not None:
            self._restore(ckpt)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        if not self._start():
            return self._result("completed", None)
        log.info(
            "training %s: %d train / %d val images, %d classes, %d steps/epoch, device %s, %s, world %d",
            self.cfg.model.name,
            len(self.data.train),
            len(self.data.val),
            self.data.num_classes,
            self.steps_per_epoch,
            self.device,
            self.tc.precision,
            self.dist.world_size,
        )
        while self.epoch < self.tc.epochs and not self.early.should_stop:
            if not self._train_epoch():
                log.warning(
                    "stopping at epoch %d batch %d (%s); checkpoint saved",
                    self.epoch,
                    self.batch,
                    self.stop.reason or "stop requested",
                )
                return self._result("interrupted", None)
            self._end_epoch()
        test_acc = self._final_test()
        self.finished = True
        self._save(self.paths.last_ckpt, full=True)
        return self._result("completed", test_acc)

    def _start(self) -> bool:
        """Decide whether there is work; only then apply the config (config.yaml, provenance, records)."""
        if not has_work(
            self.tc, self.epoch, self.batch, self.finished, self.early.should_stop, self.paths.last_ckpt
        ):
            log.info(
                "run %s already finished at epoch %d (train.epochs=%d); nothing to do, config.yaml unchanged",
                self.paths.root,
                self.epoch,
                self.tc.epochs,
            )
            return False
        if self.finished:
            log.info("extending finished run %s: epoch %d -> %d", self.paths.root, self.epoch, self.tc.epochs)
            self.finished = False
        warn_receptive_field(self.cfg.model, self.cfg.data.image_size)
        self.metrics.truncate_after(self.global_step)  # lines logged after the checkpoint come again
        if self.dist.is_main:
            write_config(self.paths, self.cfg)
            write_provenance(self.paths, self.cfg.seed, resumed=self.resumed)
            next_lr = self.tc.lr * self.schedule.factor(self.global_step)
            record_changes(
                self.paths, self.metrics, self.changes, self.tc, self.epoch, self.global_step, next_lr
            )
        return True

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when stopped early (checkpoint written)."""
        model = set_train_mode(self.ddp_model, self.cfg.model)
        self.sampler.set_epoch(self.epoch, self.batch)
        fmt = torch.channels_last if self.tc.channels_last else torch.contiguous_format
        tick = time.perf_counter()
        desc = f"epoch {self.epoch + 1}/{self.tc.epochs}"
        for images, labels, _ in track(self.loader, desc=desc, enabled=self.dist.is_main, unit="batch"):
            images = images.to(self.device, non_blocking=True, memory_format=fmt)
            labels = labels.to(self.device, non_blocking=True)
            lr = self.schedule.set_step(self.global_step)
            with self.precision.autocast():
                logits = model(images)
            loss_sum = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.tc.label_smoothing, reduction="sum"
            )
            # Normalise by the *global* batch size and undo DDP's 1/world averaging, so N ranks
            # compute exactly the gradient one rank would (also for an uneven last batch).
            gbs = self.sampler.global_batch_size(self.batch)
            loss = loss_sum * (self.dist.world_size / gbs)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward_step(loss, self.optimizer, self.params, self.tc.grad_clip)
            # Device-side sums, no .item()/.cpu(): the host never waits for the GPU here.
            stats = torch.stack(
                [
                    loss_sum.detach().double(),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.full((), labels.numel(), dtype=torch.float64, device=self.device),
                ]
            )
            self.sums += stats
            self.window += stats
            now = time.perf_counter()
            self.window_seconds += now - tick
            tick = now
            self.batch += 1
            self.global_step += 1
            if self._poll(lr):
                self._save(self.paths.last_ckpt, full=True)
                return False
        return True

    def _poll(self, lr: float) -> bool:
        """Write the log_every line when due; True when a stop was requested (on any rank).

        One process reads the flag every step (a Python bool: free).  DDP ranks must stop at the
        same step, which needs an all-reduce: it rides on the log line's, so there is no extra
        sync and a stop lands within ``train.log_every`` steps.
        """
        requested = self.stop.requested
        due = self.global_step % self.tc.log_every == 0
        if self.dist.is_distributed:
            return self._log_window(lr, requested) if due else False
        if due:
            self._log_window(lr, requested)
        return requested

    def _end_epoch(self) -> None:
        sums = D.all_reduce_sum(self.sums.clone()).cpu()
        train_loss, train_acc = _ratio(sums[0], sums[2]), _ratio(sums[1], sums[2])
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.global_step, "lr": lr}
        self.metrics.append({"split": "train", **row, "loss": train_loss, "accuracy": train_acc})
        if self.val_loader is not None:
            val = evaluate(
                self.ddp_model, self.val_loader, self.precision, self.device, self.tc.channels_last
            )
            val_loss, val_acc = val.loss, val.accuracy
            self.metrics.append({"split": "val", **row, "loss": val_loss, "accuracy": val_acc})
        else:  # no validation split: monitor the training metrics instead
            val_loss, val_acc = train_loss, train_acc
        monitored = val_acc if self.tc.monitor == "val_accuracy" else val_loss
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | %s loss %.4f acc %.4f | lr %.2e",
            self.epoch + 1,
            self.tc.epochs,
            train_loss,
            train_acc,
            "val" if self.val_loader is not None else "no val split, monitoring train",
            val_loss,
            val_acc,
            lr,
        )
        self.schedule.epoch_end(monitored, self.early.higher_is_better)
        improved = self.early.update(monitored, self.epoch + 1)
        self.epoch, self.batch = self.epoch + 1, 0
        self.sums.zero_()
        if improved:
            self._save(self.paths.best_ckpt, full=False)
        self._save(self.paths.last_ckpt, full=True)
        if self.early.should_stop:
            log.info(
                "early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                self.tc.monitor,
                self.early.bad_epochs,
                self.early.best,
                self.early.best_epoch,
            )

    def _log_window(self, lr: float, stop: bool) -> bool:
        """Append the iteration line (sums over ranks); returns whether any rank asked to stop."""
        extra = torch.tensor([self.window_seconds, float(stop)], dtype=torch.float64)
        w = D.all_reduce_sum(torch.cat([self.window, extra.to(self.device)])).cpu()
        seconds = float(w[3]) / self.dist.world_size
        self.metrics.append(
            {
                "split": "train",
                "kind": "iter",
                "epoch": self.epoch + self.batch / max(self.steps_per_epoch, 1),
                "step": self.global_step,
                "loss": _ratio(w[0], w[2]),
                "accuracy": _ratio(w[1], w[2]),
                "lr": lr,
                "images_per_s": float(w[2]) / max(seconds, 1e-9),
            }
        )
        self.window.zero_()
        self.window_seconds = 0.0
        return bool(w[4] > 0)

    def _final_test(self) -> float | None:
        """best.pt on the test split (rank 0, a separate model) → predictions.csv, confusion_matrix.json."""
        acc = None
        if self.dist.is_main:
            acc = final_test(
                self.cfg,
                self.data,
                self.paths,
                unwrap(self.model),
                self.precision,
                self.metrics,
                self.global_step,
                self.device,
            )
        D.barrier()
        return acc

    # ------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            "classes": self.data.index.classes,
            "mean": self.data.mean,
            "std": self.data.std,
            "model": self.cfg.model.name,
            "image_size": self.cfg.data.image_size,
        }

    def _save(self, path: Any, full: bool) -> None:
        rngs: list[Any] = []
        totals = torch.zeros(6, dtype=torch.float64)
        if full:  # collective calls: every rank saves
            rngs = gather_objects(rng_state())
            # Ranks hold partial sums: rank 0 saves their total (and restores it; the others restart at 0).
            totals = D.all_reduce_sum(torch.cat([self.sums, self.window])).cpu()
        if not self.dist.is_main:
            return
        state: dict[str, Any] = {
            "model": unwrap(self.model).state_dict(),
            "meta": self._meta(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "monitor": self.tc.monitor,
            "best": self.early.best,
        }
        if full:
            state.update(
                {
                    "batch": self.batch,
                    "finished": self.finished,
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "scaler": self.precision.state_dict(),
                    "early": self.early.state_dict(),
                    "sums": totals[:3].clone(),
                    "window": torch.cat(
                        [totals[3:], torch.tensor([self.window_seconds], dtype=torch.float64)]
                    ),
                    "rng": rngs,
                }
            )
        save_checkpoint(path, state)

    def _load_last(self) -> dict[str, Any] | None:
        if not self.paths.last_ckpt.exists():
            return None
        ckpt = load_checkpoint(self.paths.last_ckpt)
        check_resume_config(to_dict(self.cfg), ckpt["meta"]["config"], self.paths.last_ckpt)
        self.changes = config_changes(to_dict(self.cfg), ckpt["meta"]["config"])
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.precision.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt["early"])
        self.epoch, self.batch, self.global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        self.finished = ckpt["finished"]
        if self.dist.is_main:
            self.sums = ckpt["sums"].to(self.device, torch.float64)
            self.window = ckpt["window"][:3].to(self.device, torch.float64)
        self.window_seconds = float(ckpt["window"][3])
        rngs = ckpt["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "checkpoint has RNG state for %d ranks, this job has %d: RNG streams restart",
                len(rngs),
                self.dist.world_size,
            )
        log.info(
            "resumed from %s at epoch %d batch %d (step %d)",
            self.paths.last_ckpt,
            self.epoch,
            self.batch,
            self.global_step,
        )

    def _result(self, status: str, test_acc: float | None) -> TrainResult:
        return TrainResult(
            status, self.epoch, self.global_step, self.early.best, self.early.best_epoch, test_acc
        )


def _ratio(total: torch.Tensor, count: torch.Tensor) -> float:
    return float(total) / max(float(count), 1.0)
