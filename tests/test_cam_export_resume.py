"""SIGKILL an exporting shard at several points; the resumed part must equal an uninterrupted one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cam_export_common import (
    assert_same_part,
    child_env,
    datasets,
    save_config,
    train_tiny_run,
    with_cam,
)

from cnncam.cam.export import export_shard
from cnncam.config import RunConfig
from cnncam.storage import part_filename
from cnncam.storage.recover import commit_path, partial_path, read_commit

BATCH = 5  # train split: 96 items; shard 1 of 2 = items [48, 96) = 9 full batches + 1 padded

CHILD = r"""
import sys, time
import h5py
from cnncam.cam.export import export_shard
from cnncam.config import load_config

config, delay = sys.argv[1], float(sys.argv[2])
_setitem = h5py.Dataset.__setitem__

def slow_setitem(self, key, value):  # widen every batch so that kills land mid-batch
    _setitem(self, key, value)
    time.sleep(delay)

_file_init = h5py.File.__init__

def file_init(self, *args, **kwargs):  # no chunk cache: chunks reach the file mid-batch
    kwargs.setdefault("rdcc_nbytes", 0)
    _file_init(self, *args, **kwargs)

h5py.Dataset.__setitem__ = slow_setitem
h5py.File.__init__ = file_init
print("exported", export_shard(load_config(config), 1, 2), flush=True)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return train_tiny_run(tmp_path_factory.mktemp("resume"))


def _cfg(run: RunConfig, out: Path) -> RunConfig:
    # Every optional dataset, so each kind must survive the kill and the prefix copy.
    return with_cam(
        run,
        out,
        split="train",
        batch_size=BATCH,
        methods=("gradcam", "layercam"),
        metrics=True,
        metric_steps=2,
        upsampled=True,
        activations=("features.block1",),
        activation_images=3,
        activation_channels=4,
    )


def _committed(final: Path, n: int) -> Callable[[], bool]:
    def cond() -> bool:
        record = read_commit(commit_path(final))
        return record is not None and record["n_committed"] >= n

    return cond


def _resumed_at(log: str) -> int:
    """The item a child's writer resumed at (its log line "...partial: resumed at item N of ...")."""
    found = re.search(r"resumed at item (\d+) of", log)
    assert found is not None, log
    return int(found.group(1))


def _wait(proc: subprocess.Popen[str], cond: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not cond():
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_then_resume_equals_uninterrupted_export(run: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "cams"
    config = save_config(_cfg(run, out), tmp_path / "config.yaml")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    final = out / part_filename(1, 2)

    def start(delay: float) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), str(config), str(delay)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
        )

    # (items committed to wait for, extra delay before SIGKILL): right after the first batch's
    # commit, then in the middle of batch 5 of the resumed run.  (A stop before any commit, which
    # loses the queued activations, is covered in-process by test_cam_export.py.)
    kill_points = [(BATCH, 0.0), (4 * BATCH, 0.05)]
    logs = []
    for n, extra in kill_points:
        proc = start(0.01)
        _wait(proc, _committed(final, n))
        time.sleep(extra)
        assert proc.poll() is None, f"child ended before the kill point {n}: {proc.communicate()[0]}"
        proc.send_signal(signal.SIGKILL)
        logs.append(proc.communicate()[0])
        assert not final.exists(), "a part was given its final name before completion"
        assert partial_path(final).exists()
    proc = start(0.0)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"exported {final}" in stdout, stdout
    # Each restart kept what the killed run had committed: at least 1 batch, then at least 4.
    assert _resumed_at(logs[1]) >= 48 + BATCH and _resumed_at(stdout) >= 48 + 4 * BATCH, (logs, stdout)
    assert not partial_path(final).exists() and not commit_path(final).exists()
    reference = export_shard(_cfg(run, tmp_path / "reference"), 1, 2)
    assert_same_part(final, reference)
    got = datasets(final)
    assert got["samples/index"][0] == 48 and len(got["samples/index"]) == 48
    assert got["activations/index"].tolist() == [48, 49, 50]  # extras present after the kills
    assert "metrics/layercam/features/pointing_hit" in got and "upsampled/gradcam/features" in got
