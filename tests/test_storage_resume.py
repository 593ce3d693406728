"""SIGKILL at arbitrary moments (mid-batch, right after a commit, during the resume copy), then
resume: the final part must equal an uninterrupted run's file."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_storage_common import assert_same_content, make_run, write_part

import cnncam
from cnncam.errors import SchemaError
from cnncam.storage import PartSpec, PartWriter
from cnncam.storage.recover import commit_path, partial_path, read_commit

START, STOP, BATCH = 40, 88, 8  # shard 1 of 3, six batches

CHILD = r"""
import sys, time
import h5py
from test_storage_common import make_batch, make_run
from cnncam.storage import PartSpec, PartWriter

out, delay = sys.argv[1], float(sys.argv[2])
_setitem = h5py.Dataset.__setitem__

def slow_setitem(self, key, value):  # widen every batch so kills land mid-batch
    _setitem(self, key, value)
    time.sleep(delay)

_file_init = h5py.File.__init__

def file_init(self, *args, **kwargs):  # no chunk cache: chunks hit the file mid-batch, before the flush
    kwargs.setdefault("rdcc_nbytes", 0)
    _file_init(self, *args, **kwargs)

h5py.Dataset.__setitem__ = slow_setitem
h5py.File.__init__ = file_init
run = make_run()
spec = PartSpec(run, 1, 3, {start}, {stop})
w = PartWriter.open_or_resume(out, spec, batch_size={batch}, queue_size=2)
print("opened", w.state.status, w.state.next_index, flush=True)
for a in range(w.state.next_index, spec.index_stop, {batch}):
    w.put(make_batch(run, a, min(a + {batch}, spec.index_stop)))
w.close()
print("done", flush=True)
"""


def _env() -> dict[str, str]:
    root = str(Path(cnncam.__file__).resolve().parent.parent)
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, root, os.environ.get("PYTHONPATH", "")])}


def _start(script: Path, out: Path, delay: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )


def _wait(proc: subprocess.Popen[str], cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not cond():
        time.sleep(0.001)


def _opened(proc: subprocess.Popen[str]) -> Callable[[], bool]:
    out = proc.stdout
    assert out is not None

    def cond() -> bool:
        ready, _, _ = select.select([out], [], [], 0)
        return bool(ready) and out.readline().startswith("opened")

    return cond


def _committed(final: Path, n: int) -> Callable[[], bool]:
    def cond() -> bool:
        record = read_commit(commit_path(final))
        return record is not None and record["n_committed"] >= n

    return cond


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_at_many_points_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(start=START, stop=STOP, batch=BATCH))
    out = tmp_path / "cams"
    final = out / "part-00001-of-00003.h5"
    rebuild = partial_path(final).with_name(partial_path(final).name + ".new")
    # (what to wait for, extra delay before SIGKILL); each run resumes what the last one left
    kill_points: list[tuple[str, int, float]] = [
        ("commit", 0, 0.0),  # right after the first (empty) commit record
        ("commit", BATCH, 0.006),  # in the middle of writing batch 2
        ("rebuild", 0, 0.0),  # while the committed prefix is being copied on resume
        ("commit", 3 * BATCH, 0.0),  # just after a commit, before the next batch
        ("commit", 4 * BATCH, 0.013),  # mid-batch / mid-flush of batch 5
    ]
    statuses = []
    for what, n, extra in kill_points:
        proc = _start(script, out, 0.002)
        if what == "rebuild":
            _wait(proc, rebuild.exists)
        else:
            _wait(proc, _opened(proc))
            _wait(proc, _committed(final, n))
        time.sleep(extra)
        assert proc.poll() is None, f"child finished before the kill point {what}/{n}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not final.exists(), "a part was given its final name before completion"
        statuses.append((what, n, (read_commit(commit_path(final)) or {}).get("n_committed")))
    proc = _start(script, out, 0.0)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "done" in stdout, stdout
    assert stdout.startswith("opened resumed"), (stdout, statuses)
    assert final.exists() and not partial_path(final).exists() and not commit_path(final).exists()
    reference = write_part(tmp_path / "ref", make_run(), START, STOP, shard=1, num_shards=3, batch_size=BATCH)
    assert_same_content(final, reference)


def test_live_writer_in_another_process_is_left_alone(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(start=START, stop=STOP, batch=BATCH))
    out = tmp_path / "cams"
    final = out / "part-00001-of-00003.h5"
    proc = _start(script, out, 0.05)  # slow: still writing while we try to open the same part
    try:
        _wait(proc, _opened(proc))
        _wait(proc, _committed(final, BATCH))
        assert proc.poll() is None
        before = read_commit(commit_path(final))
        with pytest.raises(SchemaError, match="being written by another process"):
            PartWriter.open_or_resume(out, PartSpec(make_run(), 1, 3, START, STOP), batch_size=BATCH)
        after = read_commit(commit_path(final))
        assert before is not None and after is not None and after["n_committed"] >= before["n_committed"]
    finally:
        proc.kill()
        proc.wait()


def test_same_part_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    spec = PartSpec(make_run(), 0, 1, 0, 16)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    with pytest.raises(SchemaError, match="already open in a writer of this process"):
        PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    w.abort()
    PartWriter.open_or_resume(tmp_path, spec, batch_size=8).abort()  # free again after abort
