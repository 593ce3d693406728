"""Synthetic runs and batches shared by the storage tests (no tests here).

Every value is a pure function of the global item index, so any split into batches, shards
or interrupted runs must produce byte-identical datasets.  Imported by the other
``test_storage_*.py`` files and by the SIGKILL child process (tests/ is on ``sys.path``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cnncam.storage import PartBatch, PartSpec, PartWriter, RunInfo
from cnncam.storage import schema as S
from cnncam.storage.recover import read_commit

K, h, w, H, W = 2, 4, 4, 16, 16
METHODS = ("gradcam", "gradcam_pp")
LAYERS = ("layer4.1.conv2", "features")


def make_run(**overrides: Any) -> RunInfo:
    fields: dict[str, Any] = dict(
        run_name="demo",
        split="test",
        model="simple_cnn",
        class_names=("cat", "dog", "fish"),
        methods=METHODS,
        layers=LAYERS,
        targets="topk:2",
        input_size=(32, 32),
        checkpoint_sha256="ab" * 32,
        checkpoint_path="runs/demo/checkpoints/best.pt",
        normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        config={"name": "demo", "cam": {"batch_size": 8, "num_workers": 2}, "slurm": {"time_min": 60}},
        split_sha256="cd" * 32,
        git_commit="deadbeef",
        git_dirty=False,
        versions={"numpy": np.__version__},
    )
    fields.update(overrides)
    return RunInfo(**fields)


def make_batch(run: RunInfo, start: int, stop: int, *, extras: bool = True) -> PartBatch:
    """Items [start, stop): smooth maps in [0, 1], like real CAMs."""
    idx = np.arange(start, stop, dtype=np.int64)
    c = len(run.class_names)
    grid = np.arange(h * w, dtype=np.float32).reshape(h, w)
    cams: dict[tuple[str, str], np.ndarray] = {}
    up: dict[tuple[str, str], np.ndarray] = {}
    metrics: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for mi, m in enumerate(run.methods):
        for li, layer in enumerate(run.layers):
            phase = idx[:, None, None, None] * 0.1 + np.arange(K)[None, :, None, None] * 0.5 + mi + 2 * li
            cams[(m, layer)] = ((np.cos(phase + grid * 0.3) + 1) / 2).astype(np.float32)
            hi = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
            up[(m, layer)] = (((np.sin(phase + hi * 3) + 1) / 2) * 255).astype(np.uint8)
            metrics[(m, layer)] = {
                "deletion_auc": ((idx % 10) / 10 + mi).astype(np.float32),
                "insertion_auc": ((idx % 7) / 7 + li).astype(np.float32),
                "energy_in_box": np.where(idx % 4 == 0, np.nan, (idx % 5) / 5).astype(np.float32),
                "pointing_hit": np.where(idx % 4 == 0, -1, idx % 2).astype(np.int8),
            }
    boxes = np.stack([idx % 3, idx % 5, 10 + idx % 3, 12 + idx % 4], 1).astype(np.float32)
    boxes[idx % 4 == 0] = np.nan
    return PartBatch(
        index=idx,
        path=[f"class_{i % c}/Bild_{i:05d}_é.png" for i in idx],
        label=idx % c,
        pred=(idx * 7) % c,
        logits=np.sin(idx[:, None] * 0.37 + np.arange(c)).astype(np.float32),
        targets=np.stack([(idx + k) % c for k in range(K)], 1),
        cams=cams,
        upsampled=up if extras else {},
        boxes=boxes if extras else None,
        metrics=metrics if extras else {},
    )


def write_part(
    out_dir: Path,
    run: RunInfo,
    start: int,
    stop: int,
    shard: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
    **kw: Any,
) -> Path:
    """One complete part, written in batches of ``batch_size``."""
    spec = PartSpec(run, shard, num_shards, start, stop)
    with PartWriter.open_or_resume(out_dir, spec, batch_size=batch_size) as wr:
        for a in range(wr.state.next_index, stop, batch_size):
            wr.put(make_batch(run, a, min(a + batch_size, stop), **kw))
    return wr.path


def write_parts(out_dir: Path, run: RunInfo, n_total: int, num_shards: int, **kw: Any) -> list[Path]:
    paths = []
    for i in range(num_shards):
        a, b = S.shard_range(n_total, i, num_shards)
        paths.append(write_part(out_dir, run, a, b, i, num_shards, **kw))
    return paths


def datasets(f: h5py.File) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_content(a: Path, b: Path, attrs: bool = True) -> None:
    """Every dataset equal (NaN == NaN) and, optionally, every non-volatile root attribute."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        da, db = datasets(fa), datasets(fb)
        assert sorted(da) == sorted(db)
        for name in da:
            assert da[name].dtype == db[name].dtype, name
            np.testing.assert_array_equal(da[name], db[name], err_msg=name)
        if attrs:
            ka = {k: v for k, v in S.decode_attrs(fa.attrs).items() if k not in S.VOLATILE_ATTRS}
            kb = {k: v for k, v in S.decode_attrs(fb.attrs).items() if k not in S.VOLATILE_ATTRS}
            assert ka == kb


def wait_committed(writer: PartWriter, n: int, timeout: float = 20.0) -> None:
    """Block until the writer thread has committed ``n`` items (abort() drops queued batches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_commit(writer.commit)
        if record is not None and record["n_committed"] >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"{writer.partial}: {n} items not committed within {timeout} s")
