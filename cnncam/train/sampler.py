"""A resumable, rank-aware batch sampler.

The order of epoch ``e`` is ``torch.randperm(n, generator=Generator().manual_seed(seed * 1_000_003 + e))``:
a function of ``(seed, e)`` alone, so resuming at batch ``k`` of epoch ``e`` needs nothing but
``(e, k)``, and a run keeps its order across cnncam versions (a changed formula would break the
exact resume of runs started with the old one).  Each *global* batch (the batch a
single-GPU run would see) is split across ranks, so an N-rank run sees exactly the
same global batches as a 1-rank run; the loss is normalised by the global batch size
(see ``trainer.py``) which makes DDP's gradient average equal the 1-rank gradient.

It yields ``(index, epoch)`` pairs: the dataset seeds each sample's augmentation from
them, which stays correct with persistent DataLoader workers (they never see
``set_epoch`` calls made in the main process).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_small: bool = True,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        # A final global batch smaller than the number of ranks would leave a rank empty
        # (and BatchNorm cannot train on 0 or 1 sample): drop it.
        self.drop_small = drop_small
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[torch.Tensor]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self, epoch: int) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        batches = list(torch.split(order, self.batch_size))
        min_size = max(2, self.world_size) if self.shuffle else 1
        if self.drop_small and batches and len(batches[-1]) < min_size:
            batches = batches[:-1]
        self._cache = (epoch, batches)
        return batches

    def global_batch_size(self, batch_in_epoch: int) -> int:
        return len(self.global_batches(self.epoch)[batch_in_epoch])

    def __len__(self) -> int:
        return max(0, len(self.global_batches(self.epoch)) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches(self.epoch)[self.start_batch :]:
            local = torch.tensor_split(batch, self.world_size)[self.rank]
            yield [(int(i), self.epoch) for i in local]
