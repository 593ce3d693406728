"""Shared helpers for the CAM export tests (no tests here): a tiny trained run, reading and
comparing CAM files.  Imported by ``test_cam_export*.py`` and by the SIGKILL child process."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from train_helpers import tiny_config, tiny_dataset

import cnncam
from cnncam.config import RunConfig, dump_yaml, load_config
from cnncam.data import eval_transform, load_rgb
from cnncam.models import create_model
from cnncam.storage import schema as S
from cnncam.train import run_training
from cnncam.train.checkpoint import load_checkpoint

# 40 images per class -> a 12-image test split.  batch_size 3 -> shards of 4 = a full batch and
# a padded one, so 1-shard and 3-shard exports see different batch boundaries.
PER_CLASS = 40
CAM_BATCH = 3


def train_tiny_run(root: Path) -> RunConfig:
    """A 1-epoch simple_cnn on 3 synthetic classes at 32 px (about 3 s on 2 cores)."""
    data = tiny_dataset(root / "data", per_class=PER_CLASS)
    cfg = tiny_config(root, data, "train.epochs=1", f"cam.batch_size={CAM_BATCH}", "cam.num_workers=0")
    run_training(cfg)
    return cfg


def with_cam(cfg: RunConfig, out: Path, **cam: Any) -> RunConfig:
    """``cfg`` exporting into ``out`` with some ``cam.*`` fields replaced (cam.out is not in the
    fingerprint, so exports into different folders are comparable)."""
    return dataclasses.replace(cfg, cam=dataclasses.replace(cfg.cam, out=str(out), **cam))


def save_config(cfg: RunConfig, path: Path) -> Path:
    """Write ``cfg`` as YAML (for a child process: ``load_config(path)`` gives it back)."""
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    return path


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a CAM file (virtual ones resolved) by HDF5 path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


def root_attrs(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r", locking=False) as f:
        return S.decode_attrs(f.attrs)


def assert_same_arrays(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str] | None = None
) -> None:
    """Bit-identical values (NaN == NaN) and dtypes for ``names`` (default: all, same set in both)."""
    if names is None:
        assert sorted(a) == sorted(b)
        names = sorted(a)
    for name in names:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def assert_same_part(a: Path, b: Path) -> None:
    """Two part files hold the same datasets and the same non-volatile root attributes (the config
    compared without the keys that change no value, e.g. ``cam.out``)."""
    assert_same_arrays(datasets(a), datasets(b))
    ka, kb = ({k: v for k, v in root_attrs(p).items() if k not in S.VOLATILE_ATTRS} for p in (a, b))
    assert S.strip_volatile(ka.pop("config_json")) == S.strip_volatile(kb.pop("config_json"))
    assert ka == kb


def direct_model(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """best.pt loaded by hand (not through the exporter): eval-mode model and checkpoint meta."""
    state = load_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")
    model = create_model(cfg.model, len(state["meta"]["classes"]))
    model.load_state_dict(state["model"])
    return model.eval(), state["meta"]


def split_images(cfg: RunConfig, paths: list[str], meta: dict[str, Any]) -> torch.Tensor:
    """(N, 3, S, S) eval-transformed images, decoded independently of the export's dataset."""
    tf = eval_transform(cfg.data, meta["mean"], meta["std"])
    root = Path(cfg.data.root)
    return torch.stack([tf(load_rgb(root / p, cfg.data.max_image_pixels)) for p in paths])


def child_env() -> dict[str, str]:
    """Environment for a child python that imports cnncam and these helpers."""
    root = str(Path(cnncam.__file__).resolve().parent.parent)
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, root, os.environ.get("PYTHONPATH", "")])}
