"""Training orchestration: build everything from the config, train, resume exactly.

State lives in the run directory, never in a job pickle: every start of
``run_training`` resumes from ``checkpoints/last.pt`` when it exists (DINO's
``restart_from_checkpoint`` pattern), so a requeued Slurm job needs no extra flags.

Exact resume: the checkpoint holds model, optimizer, LR schedule, grad scaler,
early-stopping state, the position (epoch, batch) inside the epoch, the running
epoch sums and every RNG (per rank).  Sample order and augmentation are pure
functions of (seed, epoch, index) — see ``sampler.py`` and ``ImageDataset`` — so
"2 epochs" and "1 epoch, stop, resume, 1 epoch" produce bit-identical weights on CPU.
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
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from cnncam.train.evaluate import evaluate, write_predictions
from cnncam.train.optim import EarlyStopping, LRSchedule, build_optimizer
from cnncam.train.precision import Precision
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
        ckpt = self._load_last()
        if dist.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            write_config(self.paths, cfg)
            write_provenance(self.paths, cfg.seed, resumed=ckpt is not None)
        seed_everything(cfg.seed + dist.rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
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
        # Position and running sums; overwritten by a checkpoint.
        self.epoch, self.batch, self.global_step, self.finished = 0, 0, 0, False
        self.sums = torch.zeros(3, dtype=torch.float64)  # epoch loss_sum, correct, count
        self.window = torch.zeros(4, dtype=torch.float64)  # loss_sum, correct, count, seconds
        if ckpt is not None:
            self._restore(ckpt)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        if self.finished:
            log.info("run %s already finished at epoch %d; nothing to do", self.paths.root, self.epoch)
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
            step_stats = torch.stack(
                [
                    loss_sum.detach().double(),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device),
                ]
            ).cpu()
            self.sums += step_stats
            now = time.perf_counter()
            self.window += torch.cat([step_stats, torch.tensor([now - tick], dtype=torch.float64)])
            tick = now
            self.batch += 1
            self.global_step += 1
            if self.global_step % self.tc.log_every == 0:
                self._log_window(lr)
            if D.any_rank(self.stop.requested, self.device):
                self._save(self.paths.last_ckpt, full=True)
                return False
        return True

    def _end_epoch(self) -> None:
        sums = D.all_reduce_sum(self.sums.to(self.device)).cpu()
        train_loss, train_acc = _ratio(sums[0], sums[2]), _ratio(sums[1], sums[2])
        lr = self.optimizer.param_groups[0]["lr"]
        self.metrics.append(
            {
                "split": "train",
                "kind": "epoch",
                "epoch": self.epoch + 1,
                "step": self.global_step,
                "loss": train_loss,
                "accuracy": train_acc,
                "lr": lr,
            }
        )
        if self.val_loader is not None:
            val = evaluate(
                self.ddp_model, self.val_loader, self.precision, self.device, self.tc.channels_last
            )
            val_loss, val_acc = val.loss, val.accuracy
            self.metrics.append(
                {
                    "split": "val",
                    "kind": "epoch",
                    "epoch": self.epoch + 1,
                    "step": self.global_step,
                    "loss": val_loss,
                    "accuracy": val_acc,
                    "lr": lr,
                }
            )
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

    def _log_window(self, lr: float) -> None:
        w = D.all_reduce_sum(self.window.to(self.device)).cpu()
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

    def _final_test(self) -> float | None:
        """Evaluate best.pt on the test split (rank 0) → predictions.csv, confusion_matrix.json."""
        if not len(self.data.test):
            log.info("no test split: skipping final evaluation")
            return None
        acc = None
        if self.dist.is_main:
            model = unwrap(self.model)
            if self.paths.best_ckpt.exists():
                model.load_state_dict(load_checkpoint(self.paths.best_ckpt, self.device)["model"])
            loader = eval_loader(self.data.test, self.cfg, D.DistInfo(), self.device)
            res = evaluate(
                model, loader, self.precision, self.device, self.tc.channels_last, collect=True, reduce=False
            )
            write_predictions(
                res,
                [p for p, _ in self.data.index.splits["test"]],
                self.data.index.classes,
                self.paths.predictions,
                self.paths.confusion,
            )
            self.metrics.append(
                {
                    "split": "test",
                    "kind": "final",
                    "epoch": self.early.best_epoch,
                    "step": self.global_step,
                    "loss": res.loss,
                    "accuracy": res.accuracy,
                }
            )
            log.info(
                "test (best epoch %d): loss %.4f accuracy %.4f on %d images",
                self.early.best_epoch,
                res.loss,
                res.accuracy,
                res.count,
            )
            acc = res.accuracy
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
        rngs = _gather_objects(rng_state()) if full else []
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
                    "sums": self.sums.clone(),
                    "window": self.window.clone(),
                    "rng": rngs,
                }
            )
        save_checkpoint(path, state)

    def _load_last(self) -> dict[str, Any] | None:
        if not self.paths.last_ckpt.exists():
            return None
        ckpt = load_checkpoint(self.paths.last_ckpt)
        check_resume_config(to_dict(self.cfg), ckpt["meta"]["config"], self.paths.last_ckpt)
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.precision.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt["early"])
        self.epoch, self.batch, self.global_step = ckpt["epoch"], ckpt["batch"], ckpt["global_step"]
        self.finished = ckpt["finished"]
        self.sums, self.window = ckpt["sums"].clone(), ckpt["window"].clone()
        rngs = ckpt["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "checkpoint has RNG state for %d ranks, this job has %d: RNG streams restart",
                len(rngs),
                self.dist.world_size,
            )
        self.metrics.truncate_after(self.global_step)
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


def _gather_objects(obj: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
