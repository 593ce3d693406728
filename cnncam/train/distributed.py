"""Who am I in a distributed job, read from torchrun or Slurm variables.

Slurm's ``srun`` starts one task per GPU and sets SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS; torchrun sets RANK / LOCAL_RANK / WORLD_SIZE.  We map both to one
:class:`DistInfo` (the DINOv2 pattern) and use ``env://``-free TCP rendezvous on the
first node of the allocation, with a port seeded by the job id so two jobs sharing
a node do not collide (mmengine's fixed 29500 does).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from cnncam.errors import LaunchError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or an explicit export
            return cls(
                rank=int(env["RANK"]),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                world_size=int(env["WORLD_SIZE"]),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
            )
        # Only trust SLURM_NTASKS inside an srun step: the batch script of a 2-task job also
        # sees SLURM_NTASKS=2 but is a single process, and would wait forever for rank 1.
        if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            job_id = int(env.get("SLURM_JOB_ID", "0"))
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
            return cls(
                rank=int(env["SLURM_PROCID"]),
                local_rank=int(env.get("SLURM_LOCALID", "0")),
                world_size=int(env["SLURM_NTASKS"]),
                master_addr=first_host(nodelist),
                master_port=20000 + job_id % 40000,
            )
        return cls()


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: ``gpu[03-05,09],cpu1`` → ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def select_device(requested: str, dist: DistInfo) -> torch.device:
    """cuda:<local rank> when GPUs are visible, else CPU.

    When Slurm binds one GPU per task (CUDA_VISIBLE_DEVICES holds one id) every task sees
    its GPU as cuda:0, so ``local_rank % device_count`` picks the right one in both cases.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    index = dist.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_process_group(dist: DistInfo, device: torch.device, timeout_min: float = 30.0) -> None:
    if not dist.is_distributed or tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(
        backend,
        init_method=f"tcp://{dist.master_addr}:{dist.master_port}",
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )


def destroy_process_group() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity when not distributed."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when any rank passes True — so all ranks stop at the same step."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)
