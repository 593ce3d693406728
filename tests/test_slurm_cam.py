"""CAM export, merge, report and the whole pipeline through the launcher on a real local Slurm."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from slurm_fixtures import (
    cli,
    records,
    scancel,
    slurm_cluster,  # noqa: F401  (the fixture, used by name)
    statuses,
    wait_all_done,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
CPU = ("--executor", "slurm", "--partition", "cpu", "--gpus", "0")


def _data_overrides(data: Path) -> list[str]:
    sets = [
        f"data.root={data}",
        "data.image_size=32",
        "data.resize=32",
        "data.num_workers=0",
        "model.channels=[8,16]",
        "train.epochs=1",
        "cam.batch_size=4",
        "cam.num_workers=0",
    ]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (trained inline: this module tests what comes after training)."""
    base = tmp_path_factory.mktemp("cam")
    data = base / "shapes"
    assert cli("synth", "--out", str(data), "--classes", "3", "--per-class", "20", "--size", "32")[0] == 0
    rc, out = cli(
        "train",
        "--executor",
        "inline",
        "--set",
        "name=base",
        "--set",
        f"runs_dir={base / 'runs'}",
        *_data_overrides(data),
    )
    assert rc == 0, out
    return base / "runs" / "base"


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    # A separate run directory per test: its own jobs.json, cams/ and report/.
    dest = tmp_path / "runs" / name
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("jobs.json", "slurm", "cams", "report"))
    return dest


def _arrays(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def _assert_same_cams(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys() and any(k.startswith("cams/") for k in x)
    for k in x:
        assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k


@pytest.fixture(scope="module")
def reference(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-shard export of `trained`, also through Slurm (same environment as the others)."""
    run = _copy(trained, tmp_path_factory.mktemp("ref"), "ref")
    assert cli("cam", "--run", str(run), "--shards", "1", *CPU)[0] == 0
    assert [r.state for r in wait_all_done(run, 180)] == ["COMPLETED", "COMPLETED"]
    return run / "cams" / "cams.h5"


def test_three_shards_merged_equal_one_shard(trained: Path, reference: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path, "three")
    rc, out = cli("cam", "--run", str(run), "--shards", "3", *CPU)
    assert rc == 0 and "submitted cam: array" in out and "submitted merge: job" in out
    rows = wait_all_done(run, 240)
    assert [(r.kind, r.shard, r.state) for r in rows] == [
        ("cam", 0, "COMPLETED"),
        ("cam", 1, "COMPLETED"),
        ("cam", 2, "COMPLETED"),
        ("merge", None, "COMPLETED"),
    ]
    assert sorted(p.name for p in (run / "cams").glob("part-*")) == [
        f"part-0000{k}-of-00003.h5" for k in range(3)
    ]
    _assert_same_cams(run / "cams" / "cams.h5", reference)


def test_retry_failed_resubmits_only_the_killed_shard(trained: Path, reference: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path, "retry")
    # One shard at a time, so shard 1 is still pending when it is cancelled.
    assert cli("cam", "--run", str(run), "--shards", "3", "--array-parallelism", "1", *CPU)[0] == 0
    array = records(run)[0]
    scancel(array.tasks[1])
    wait_until(
        lambda: [r.state for r in statuses(run)] == ["COMPLETED", "CANCELLED", "COMPLETED", "PENDING"],
        240,
        "shards 0 and 2 done, shard 1 cancelled, merge stuck",
    )
    assert not (run / "cams" / "cams.h5").exists()
    rc, out = cli("cam", "--run", str(run), "--retry-failed", *CPU)
    assert rc == 0 and "retrying shards [1] of 3" in out
    retry, merge = records(run)[2:]
    assert (retry.kind, retry.shards, len(retry.tasks)) == ("cam", [1], 1)
    assert merge.kind == "merge" and merge.after == [retry.job_id]
    rows = wait_all_done(run, 240)
    assert [r.state for r in rows] == [
        "COMPLETED",
        "CANCELLED",
        "COMPLETED",
        "CANCELLED",
        "COMPLETED",
        "COMPLETED",
    ]
    _assert_same_cams(run / "cams" / "cams.h5", reference)
    rc, out = cli("cam", "--run", str(run), "--retry-failed", *CPU)
    assert rc == 0 and "nothing to retry" in out


def test_pipeline_chains_train_cam_merge_report(tmp_path: Path, trained: Path) -> None:
    data = Path(str(trained.parent.parent / "shapes"))
    config = tmp_path / "pipe.yaml"
    config.write_text(f"name: pipe\nruns_dir: {tmp_path / 'runs'}\n")
    rc, out = cli("pipeline", "--config", str(config), "--shards", "2", *CPU, *_data_overrides(data))
    assert rc == 0, out
    run = tmp_path / "runs" / "pipe"
    kinds = [(r.kind, r.after) for r in records(run)]
    ids = [r.job_id for r in records(run)]
    assert kinds == [("train", []), ("cam", [ids[0]]), ("merge", [ids[1]]), ("report", [ids[2]])]
    rows = wait_all_done(run, 420)
    assert [(r.kind, r.state) for r in rows] == [
        ("train", "COMPLETED"),
        ("cam", "COMPLETED"),
        ("cam", "COMPLETED"),
        ("merge", "COMPLETED"),
        ("report", "COMPLETED"),
    ]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "cams" / "cams.h5").is_file()
    html = (run / "report" / "index.html").read_text()
    assert "<html" in html.lower()
