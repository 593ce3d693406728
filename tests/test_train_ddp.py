"""DDP on CPU (2 gloo processes, no Slurm): a stop requested on one rank stops every rank at the same
step (the flag rides on the log line's all-reduce), and the resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import assert_same_run_state, checkpoint, epoch_rows, tiny_dataset

TESTS = Path(__file__).resolve().parent
LOG_EVERY = 3

_CHILD = """
import json, os, sys
from pathlib import Path
from train_helpers import BEST_IS_FIRST, StopAfter, tiny_config
from cnncam.stop import StopFlag
from cnncam.train import run_training

tmp, data, name, stop_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# Only rank 1 is asked to stop (as when one node gets the signal first).
stop = StopAfter(stop_at) if stop_at >= 0 and os.environ["RANK"] == "1" else StopFlag()
cfg = tiny_config(tmp, data, "train.epochs=2", "train.log_every=%d", *BEST_IS_FIRST, name=name)
res = run_training(cfg, stop)
print("RESULT " + json.dumps({"status": res.status, "step": res.global_step}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp(tmp: Path, data: Path, name: str, stop_at: int = -1) -> list[dict]:
    """Run the child on 2 ranks; each rank's result."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-c", _CHILD % LOG_EVERY, str(tmp), str(data), name, str(stop_at)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.mark.slow  # three 2-process runs (~25 s on an idle 2-core VM): the only non-Slurm DDP check
def test_stop_on_one_rank_stops_all_at_a_log_step_and_resumes_exactly(tmp_path: Path, data: Path) -> None:
    straight = _ddp(tmp_path, data, "straight")
    assert [r["status"] for r in straight] == ["completed", "completed"]
    stopped = _ddp(tmp_path, data, "split", stop_at=1)  # rank 1 asks after its 2nd step
    assert [r["status"] for r in stopped] == ["interrupted", "interrupted"]
    step = stopped[0]["step"]
    assert stopped[1]["step"] == step == LOG_EVERY  # the first log line after the request
    assert checkpoint(tmp_path / "runs" / "split")["global_step"] == step
    assert [r["status"] for r in _ddp(tmp_path, data, "split")] == ["completed", "completed"]
    run, ref = tmp_path / "runs" / "split", tmp_path / "runs" / "straight"
    assert checkpoint(ref, "best.pt")["epoch"] == 1 and checkpoint(ref)["epoch"] == 2
    assert_same_run_state(ref, run, "last.pt")
    assert_same_run_state(ref, run, "best.pt")
    assert epoch_rows(ref) == epoch_rows(run)
