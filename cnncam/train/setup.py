"""Build the datasets, loaders and model a training run needs from its config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from cnncam.config import RunConfig
from cnncam.data import (
    DatasetIndex,
    ImageDataset,
    Sample,
    discover,
    eval_transform,
    load_index,
    normalization,
    save_index,
    train_transform,
)
from cnncam.data.splits import read_hashes, split_state
from cnncam.errors import DataError
from cnncam.models import create_model
from cnncam.runs import RunPaths
from cnncam.train import distributed as D
from cnncam.train.sampler import EpochBatchSampler

log = logging.getLogger("cnncam.train")


@dataclass
class DataBundle:
    index: DatasetIndex
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)


def load_or_discover(cfg: RunConfig, paths: RunPaths, dist: D.DistInfo) -> DatasetIndex:
    """The run's split: read from the run dir when saved (resume, CAM export), else discover once.

    Rank 0 scans and writes; the other ranks wait and read the same files, so every rank
    trains on the identical split.  A split that a killed start left incomplete is written
    again (discovery is deterministic); one changed after training began is refused.
    """
    root = Path(cfg.data.root)
    if dist.is_main:
        state, why = split_state(paths)
        if state == "changed" and paths.last_ckpt.is_file():
            raise DataError(
                f"the saved split of run {paths.root} was changed after training began ({why}); "
                "restore it, or train a new run"
            )
        if state in ("none", "partial", "changed"):
            if state != "none":
                log.info("the split of %s is incomplete (%s): writing it again", paths.root, why)
            save_index(discover(cfg.data, cfg.seed, read_hashes(paths)), paths)
    D.barrier()  # every rank, always: the split is complete on disk after it
    return load_index(paths, root)


def build_data(cfg: RunConfig, paths: RunPaths, dist: D.DistInfo) -> DataBundle:
    index = load_or_discover(cfg, paths, dist)
    root = Path(cfg.data.root)
    # Rank 0 computes (and caches) dataset statistics; the others then read the cache.
    if dist.is_main:
        mean, std = normalization(cfg.data, index.splits["train"], root, paths)
    D.barrier()
    if not dist.is_main:
        mean, std = normalization(cfg.data, index.splits["train"], root, paths)
    if cfg.model.mean is not None and cfg.model.std is not None:  # the model's own (e.g. timm's)
        mean, std = list(cfg.model.mean), list(cfg.model.std)
    train_tf = train_transform(cfg.data, mean, std)
    eval_tf = eval_transform(cfg.data, mean, std)
    pixels = cfg.data.max_image_pixels

    def make(split: str, tf: Callable[[Image.Image], torch.Tensor]) -> ImageDataset:
        samples = index.splits[split]
        if split == "train" and cfg.data.permute_labels:  # sanity check: see permuted_labels
            samples = permuted_labels(samples, cfg.seed)
        return ImageDataset(root, samples, tf, pixels, seed=cfg.seed)

    return DataBundle(index, make("train", train_tf), make("val", eval_tf), make("test", eval_tf), mean, std)


def permuted_labels(samples: list[Sample], seed: int) -> list[Sample]:
    """``samples`` with their labels shuffled among them (a seeded permutation, class counts kept).

    The data-randomisation sanity check (Adebayo et al., NeurIPS 2018) trains on these; the
    saved split files keep the true labels, so evaluation and CAM export use the real ones.
    """
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(path, samples[j][1]) for (path, _), j in zip(samples, order)]


def train_loader(
    dataset: ImageDataset, sampler: EpochBatchSampler, cfg: RunConfig, device: torch.device
) -> DataLoader:
    dc = cfg.data
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=dc.num_workers,
        pin_memory=dc.pin_memory and device.type == "cuda",
        persistent_workers=dc.persistent_workers and dc.num_workers > 0,
        # A private generator: otherwise each new iterator draws its base seed from the
        # global torch RNG, and a resumed run's dropout stream would differ.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def eval_loader(dataset: ImageDataset, cfg: RunConfig, dist: D.DistInfo, device: torch.device) -> DataLoader:
    """In-order loader over this rank's share (every world_size-th sample)."""
    data = (
        dataset
        if not dist.is_distributed
        else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    )
    return DataLoader(
        data,
        batch_size=cfg.data.eval_batch_size or cfg.data.batch_size * 2,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
    )


def build_model(
    cfg: RunConfig, num_classes: int, device: torch.device, dist: D.DistInfo
) -> tuple[nn.Module, nn.Module]:
    """(the plain model, the module to call in training: DDP- and/or compile-wrapped)."""
    model = create_model(cfg.model, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped: nn.Module = model
    if dist.is_distributed:
        if cfg.train.sync_bn and device.type == "cuda":
            # Per-rank batch statistics would make N-rank training differ from 1-rank training.
            # (SyncBatchNorm is CUDA-only; on CPU/gloo each rank normalises its own half batch.)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return model, wrapped
