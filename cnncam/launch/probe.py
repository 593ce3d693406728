"""A small, deterministic stand-in for training and CAM export: ``launch.py probe``.

It checks a cluster set-up end to end without data or a model: what each task sees
(rank, GPUs, restarts), optional gloo rendezvous between ranks, and checkpoint/requeue.
It follows the same contract as ``run_training``: state in the run directory, polled
:class:`StopFlag`, atomic save at a step boundary, "interrupted" or "completed".

Files under ``<run>/probe/`` (suffix ``-<k>`` for shard k of an array):
``state.json`` (rank 0's position and value), ``rank<r>.json`` (environment, host and the
folder cnncam was imported from, per task),
``part-<k>.json`` (a finished shard), ``merged.json`` (the merge of all parts).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnncam.errors import LaunchError
from cnncam.launch.snapshot import source_root
from cnncam.launch.tasks import LaunchTask
from cnncam.runs import atomic_write_json
from cnncam.stop import StopFlag

ENV_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NNODES",
    "SLURM_JOB_NODELIST",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_PARTITION",
    "SLURM_CPUS_PER_TASK",
    "SLURM_JOB_NAME",
    "CUDA_VISIBLE_DEVICES",
    "SUBMITIT_EXECUTOR",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
MODULUS = 1_000_003


def next_value(value: int, step: int) -> int:
    """One deterministic "training step": the final value depends on every step, in order."""
    return (value * 31 + step + 1) % MODULUS


def expected_value(steps: int) -> int:
    value = 0
    for step in range(steps):
        value = next_value(value, step)
    return value


def _suffix(shard: int | None) -> str:
    return "" if shard is None else f"-{shard}"


def _rank() -> tuple[int, int]:
    """(rank, world size) from torch-style or Slurm variables, as the training code reads them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1"))
    return 0, 1


def _allreduce_sum(value: int) -> int:
    """Sum ``value`` over all ranks with gloo, rendezvous from the cnncam DistInfo."""
    import torch

    from cnncam.train import distributed as D

    dist = D.DistInfo.from_env()
    D.init_process_group(dist, torch.device("cpu"), timeout_min=2.0)
    try:
        t = torch.tensor([float(value)])
        D.all_reduce_sum(t)
        return int(t.item())
    finally:
        D.destroy_process_group()


def run_probe(
    root: Path, steps: int, step_s: float, stop: StopFlag, shard: int | None = None, allreduce: bool = False
) -> tuple[str, dict[str, Any]]:
    """Run (or resume) the probe in ``root``; returns (status, rank 0's state)."""
    root.mkdir(parents=True, exist_ok=True)
    rank, world = _rank()
    sfx = _suffix(shard)
    state_path = root / f"state{sfx}.json"
    state: dict[str, Any] = {"step": 0, "value": 0, "starts": []}
    if state_path.exists():
        state = json.loads(state_path.read_text())
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    print(
        f"probe start: rank {rank}/{world} shard {shard} step {state['step']} restart {restart}", flush=True
    )
    info: dict[str, Any] = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    # Where this task imports cnncam from: the run's code snapshot, unless slurm.snapshot_code=false.
    info.update(
        rank=rank, world_size=world, host=socket.gethostname(), pid=os.getpid(), cnncam=str(source_root())
    )
    if allreduce:
        info["allreduce_sum"] = _allreduce_sum(rank + 1)
    atomic_write_json(root / f"rank{rank}{sfx}.json", info)
    if rank == 0:
        state["starts"].append({"step": state["step"], "restart": restart})
    while state["step"] < steps:
        if stop.requested:  # a step boundary: the state is consistent, save it here
            if rank == 0:
                atomic_write_json(state_path, state)
            print(f"probe stopped at step {state['step']} ({stop.reason})", flush=True)
            return "interrupted", state
        time.sleep(step_s)
        state["value"] = next_value(state["value"], state["step"])
        state["step"] += 1
    if rank == 0:
        atomic_write_json(state_path, state)
        if shard is not None:
            atomic_write_json(root / f"part-{shard}.json", {"shard": shard, "value": state["value"]})
    print(f"probe done: step {state['step']} value {state['value']}", flush=True)
    return "completed", state


def part_states(root: Path, num_shards: int) -> list[str]:
    """Per shard: "complete" (part written), "partial" (started) or "missing"."""
    out = []
    for k in range(num_shards):
        if (root / f"part-{k}.json").exists():
            out.append("complete")
        elif (root / f"state-{k}.json").exists():
            out.append("partial")
        else:
            out.append("missing")
    return out


@dataclass(frozen=True)
class ProbeTask(LaunchTask):
    root: str
    steps: int = 5
    step_s: float = 0.2
    shard: int | None = None
    allreduce: bool = False
    fail: bool = False  # raise at the end: tests how failures are reported and block dependents

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        status, state = run_probe(Path(self.root), self.steps, self.step_s, stop, self.shard, self.allreduce)
        if self.fail and status == "completed":
            raise LaunchError("probe asked to fail (--fail)")
        return status, state


@dataclass(frozen=True)
class ProbeMergeTask(LaunchTask):
    root: str
    num_shards: int

    def run(self, stop: StopFlag) -> tuple[str, Any]:
        root = Path(self.root)
        states = part_states(root, self.num_shards)
        if any(s != "complete" for s in states):
            raise LaunchError(f"cannot merge: shard states {states}")
        values = [json.loads((root / f"part-{k}.json").read_text())["value"] for k in range(self.num_shards)]
        merged = {"num_shards": self.num_shards, "values": values}
        atomic_write_json(root / "merged.json", merged)
        return "completed", merged
