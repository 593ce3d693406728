"""Atomic checkpoints that hold only tensors and plain types.

``save_checkpoint`` writes to a temp file in the same folder, fsyncs, then
``os.replace``s it over the target (``cnncam.runs.atomic_write``, timm's pattern): a job
killed mid-write leaves the previous checkpoint intact.  ``load_checkpoint`` uses ``weights_only=True``, so a
checkpoint can never execute code when loaded; that is why the config is stored as a
plain dict and numpy RNG state is converted to tensors.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnncam.errors import CheckpointError
from cnncam.runs import atomic_write, file_sha256
from cnncam.typed_config import to_dict

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return load_checkpoint_and_sha256(path, map_location, digest=False)[0]


def load_checkpoint_and_sha256(
    path: Path, map_location: str | torch.device = "cpu", digest: bool = True
) -> tuple[dict[str, Any], str]:
    """``weights_only`` load of a cnncam checkpoint, and the SHA-256 of exactly those bytes.

    Hash and load read one open file: training replaces ``best.pt`` with ``os.replace`` (a new
    inode), so a CAM export started while training goes on records the hash of the weights it used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            sha = file_sha256(f) if digest else ""
            f.seek(0)
            state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for torn/foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format_version {version!r}; this cnncam reads {FORMAT_VERSION}"
        )
    return state, sha


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain types."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _python_state_to_plain(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Config keys that may change between a run's starts.  Everything else changes the maths of a step
# (model, data, optimiser, precision, seed...) and is refused with the key named.  Honestly sorted:
RESUME_FREE = (  # no effect on any number the run computes
    "name",
    "runs_dir",
    "data.root",  # the same files, moved: the split lists paths relative to it
    "data.num_workers",  # per-sample seeding: tested to give bit-identical weights for 0 and 2
    "data.pin_memory",
    "data.persistent_workers",
    "train.log_every",  # which iteration lines are written (and, under DDP, how soon a stop lands)
)
RESUME_RULED = (  # change what the run does from here on, by documented rules (see runstate.py)
    "train.epochs",  # length; cosine LR re-defined over the new total from the current step on
    "train.patience",  # when early stopping ends the run
)
RESUME_NUMERICS = (  # same maths, other kernels: results may differ in the last bits from here on
    "train.device",
    "train.compile",
    "train.deterministic",
    "data.eval_batch_size",  # validation sums in another order: val metrics may differ in the last bit
)
RESUME_MUTABLE = RESUME_FREE + RESUME_RULED + RESUME_NUMERICS
RESUME_MUTABLE_SECTIONS = ("cam", "report", "slurm")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _mutable(key: str) -> bool:
    return key in RESUME_MUTABLE or key.split(".")[0] in RESUME_MUTABLE_SECTIONS


def _flat_pair(now: dict[str, Any], saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both configs flattened; keys the saved one lacks take the schema default.

    A key added to the schema after a run started defaults to the old behaviour (the rule for
    every new key), so checkpoints of older versions resume; a key the schema dropped still
    counts as a difference.
    """
    from cnncam.config import RunConfig

    defaults = _flatten(to_dict(RunConfig()))
    a, b = _flatten(now), _flatten(saved)
    return a, {**{k: v for k, v in defaults.items() if k in a}, **b}


def config_changes(now: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Training keys (not cam/report/slurm) whose value differs: key -> (saved, now), sorted."""
    a, b = _flat_pair(now, saved)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {k: (b.get(k), a.get(k)) for k in keys if k.split(".")[0] not in RESUME_MUTABLE_SECTIONS}


def check_resume_config(now: dict[str, Any], saved: dict[str, Any], path: Any, shown: int = 8) -> None:
    """A run directory belongs to one experiment: refuse to resume it with different maths.

    The error names every changed key (the first ``shown``, then how many more) with both values.
    """
    a, b = _flat_pair(now, saved)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not _mutable(k)]
    if diff:
        details = ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in diff[:shown])
        if len(diff) > shown:
            details += f" and {len(diff) - shown} more"
        raise CheckpointError(
            f"{path} was written with a different config ({details}). Use a new run name "
            f"(--set name=...) or delete the run directory to start over."
        )
