"""Hostile and careless inputs (issue 9): run folders, data folders, configs and options that a
colleague hands over or a user gets wrong.  Each case asserts the exact outcome: a clear one-line
error (no traceback), nothing read or run (marker files stay absent), nothing lost.

The cases and their numbers come from the 90-case probe of issue 9 (rows of its table).  Storage
and report readers (external HDF5 storage, foreign parts, damaged attributes) are in
``test_hostile_storage.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cnncam import cli
from cnncam.config import DataConfig, load_config
from cnncam.data import dataset as D
from cnncam.data import generate_shapes
from cnncam.data.dataset import discover
from cnncam.launch.jobs import load_records
from cnncam.runs import RunPaths

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "jobs" / "launch.py"
TINY = [
    "--set=train.epochs=1",
    "--set=data.image_size=16",
    "--set=data.resize=16",
    "--set=model.channels=[4,8]",
    "--set=data.num_workers=0",
    "--set=cam.num_workers=0",
    "--set=data.batch_size=8",
    "--set=cam.batch_size=8",
    "--set=data.augment=none",
    "--set=cam.methods=[gradcam]",
    "--executor=inline",
]


def run(*argv: str) -> tuple[int, str, str]:
    """``launch.py`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def python(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """This Python in a fresh process, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [*prefix, sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def run_proc(*argv: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``launch.py`` in a fresh process (for real permissions, kills and concurrency)."""
    return python(str(LAUNCH), *argv, prefix=prefix)


def one_line_error(rc: int, err: str, *needles: str) -> None:
    """The outcome every foreseeable problem must have: exit 2, one ``error:`` line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert "Traceback" not in err and "During handling" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def train_args(runs: Path, data: Path, name: str, *extra: str) -> list[str]:
    return ["train", *TINY, f"--set=runs_dir={runs}", f"--set=name={name}", f"--set=data.root={data}", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(
        tmp_path_factory.mktemp("hostile") / "shapes", num_classes=3, per_class=8, image_size=16, seed=0
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A trained run with a merged CAM file: ``runs/base``."""
    runs = tmp_path_factory.mktemp("baseruns") / "runs"
    rc, _, err = run(*train_args(runs, data, "base"))
    assert rc == 0, err
    rc, _, err = run("cam", "--run", str(runs / "base"), *TINY)
    assert rc == 0, err
    assert (runs / "base" / "cams" / "cams.h5").is_file()
    return runs / "base"


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


# ----------------------------------------------------------------------------------------------
# B1 (row 82): nothing from a run folder is ever unpickled.


class _Evil:
    """Unpickling this creates ``marker``: proof that code from the run folder ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _crafted_run(tmp_path: Path, marker: Path) -> Path:
    """A run whose jobs.json names a finished local job with a code-executing result pickle,
    both in the run's own submitit folder and in a folder outside it that jobs.json points at."""
    run_dir = tmp_path / "runs" / "j01"
    outside = tmp_path / "elsewhere"
    for folder in (run_dir / "slurm" / "999999", outside / "999999"):
        folder.mkdir(parents=True)
        (folder / "999999_0_result.pkl").write_bytes(pickle.dumps(("success", _Evil(marker))))
    record = {
        "kind": "train",
        "executor": "local",
        "job_id": "999999",  # no such process: status falls back to what the job left behind
        "tasks": ["999999"],
        "folder": str(outside / "%j"),
        "name": "x",
    }
    (run_dir / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [record]}))
    return run_dir


@pytest.mark.parametrize("command", ["status", "cancel", "logs --follow", "train"])
def test_b1_a_crafted_result_pickle_is_never_unpickled(tmp_path: Path, data: Path, command: str) -> None:
    marker = tmp_path / "PWNED"
    run_dir = _crafted_run(tmp_path, marker)
    if command == "train":
        rc, out, err = run(*train_args(run_dir.parent, data, "j01"))
        assert rc == 0, err  # the recorded job is over: training may start
        assert (run_dir / "checkpoints" / "last.pt").is_file()
    else:
        rc, out, err = run(*command.split(), "--run", str(run_dir))
        assert rc == 0, err
    assert not marker.exists(), f"{command} unpickled a file from the run folder"
    if command == "status":
        # No state file from the job and no process: it failed (it never said it completed).
        assert out.splitlines()[1].split()[:5] == ["999999", "train", "-", "-", "FAILED"]


# ----------------------------------------------------------------------------------------------
# B3 (row 20): symlinks in the data folder.


def test_b3_a_symlink_loop_lists_each_file_once(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "messy"
    for cls in ("circle", "square"):
        shutil.copytree(data / cls, root / cls)
    (root / "square" / "loop").symlink_to(".")
    real = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png") if "loop" not in p.parts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = discover(DataConfig(root=str(root), image_size=16), seed=0)
    listed = sorted(p for split in index.splits.values() for p, _ in split)
    assert listed == real  # 16 files, not 16 + 41 copies of each square
    train = {p for p, _ in index.splits["train"]}
    assert not train & {p for p, _ in index.splits["test"]}
    assert any("not followed: square/loop" in str(w.message) for w in caught)


def test_b3_a_symlink_to_a_sibling_class_is_not_followed(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "alias"
    for cls in ("circle", "square"):
        shutil.copytree(data / cls, root / cls)
    (root / "circle" / "more").symlink_to("../square")  # squares would be labelled "circle"
    (root / "square" / "more").symlink_to("../circle")
    (root / "circle" / "twice.png").symlink_to(sorted((root / "circle").glob("*.png"))[0].name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = discover(DataConfig(root=str(root), image_size=16, layout="single"), seed=0)
    labelled = {p: label for split in index.splits.values() for p, label in split}
    assert len(labelled) == 16 and not any("more" in p or "twice" in p for p in labelled)
    assert {label for p, label in labelled.items() if p.startswith("square/")} == {
        index.classes.index("square")
    }


def test_b3_a_class_folder_symlinked_from_outside_is_still_read(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "linked"
    root.mkdir()
    for cls in ("circle", "square"):
        (root / cls).symlink_to(data / cls)  # datasets are often symlinked into place
    index = discover(DataConfig(root=str(root), image_size=16), seed=0)
    assert sum(len(s) for s in index.splits.values()) == 16


def test_b3_byte_identical_files_in_two_splits_are_listed_in_a_warning(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "pre"
    for split in ("train", "test"):
        for cls in ("circle", "square"):
            shutil.copytree(data / cls, root / split / cls)
    for i, src in enumerate(sorted((root / "test" / "circle").glob("*.png"))[:2]):
        shutil.copy(src, root / "train" / "circle" / f"copy{i}.png")  # other names, same bytes
    (root / "val" / "circle").mkdir(parents=True)
    (root / "val" / "square").mkdir(parents=True)
    first_square = sorted((root / "train" / "square").glob("*.png"))[0]
    shutil.copy(first_square, root / "val" / "square" / "v.png")
    shutil.copy(sorted((root / "test" / "square").glob("*.png"))[-1], root / "val" / "circle" / "u.png")
    with pytest.warns(D.DuplicateImageWarning) as caught:  # type: ignore[attr-defined]
        discover(DataConfig(root=str(root), image_size=16, layout="presplit"), seed=0)
    [text] = [str(w.message) for w in caught if w.category is D.DuplicateImageWarning]  # type: ignore[attr-defined]
    assert "in more than one split" in text
    assert f"train/square/{first_square.name}" in text and "val/square/v.png" in text
    assert "train/circle/copy0.png" in text


# ----------------------------------------------------------------------------------------------
# B4 (rows 36-37): a kill at any rename of a training start leaves a run the next start completes.


class _Killed(BaseException):
    """Stands in for SIGKILL (a BaseException, so no ``except Exception`` handles it)."""


@contextlib.contextmanager
def _renames(kill_at: int | None = None) -> Iterator[list[str]]:
    """Count ``os.replace`` calls; raise :class:`_Killed` instead of the ``kill_at``-th one."""
    real = os.replace
    seen: list[str] = []

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        seen.append(Path(dst).name)
        if len(seen) == kill_at:
            raise _Killed(f"killed at rename {kill_at} ({Path(dst).name})")
        real(src, dst, *a, **kw)

    os.replace = replace  # type: ignore[assignment]
    try:
        yield seen
    finally:
        os.replace = real


def _run_files(run_dir: Path) -> dict[str, bytes]:
    names = ["classes.json", "skipped.json", "splits/train.csv", "splits/val.csv", "splits/test.csv"]
    return {n: (run_dir / n).read_bytes() for n in names}


@pytest.mark.slow
def test_b4_a_kill_at_each_rename_of_a_training_start_then_a_restart_completes(
    tmp_path: Path, data: Path
) -> None:
    import torch

    extra = ("--set=data.normalize=dataset",)  # norm_stats.json is part of the start too
    with _renames() as seen:
        rc, _, err = run(*train_args(tmp_path / "ref", data, "r", *extra))
    assert rc == 0, err
    reference = _run_files(tmp_path / "ref" / "r")
    ref_weights = torch.load(tmp_path / "ref" / "r" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # Every rename up to the first checkpoint: the start; beyond it resume is tested elsewhere.
    start = seen.index("best.pt") + 2
    assert {"config.yaml", "classes.json", "train.csv", "test.csv", "norm_stats.json"} <= set(seen[:start])
    for k in range(1, start + 1):
        runs = tmp_path / f"k{k}"
        with _renames(kill_at=k), pytest.raises(_Killed):
            run(*train_args(runs, data, "r", *extra))
        rc, _, err = run(*train_args(runs, data, "r", *extra))
        assert rc == 0, f"restart after a kill at rename {k} ({seen[k - 1]}) failed: {err}"
        assert _run_files(runs / "r") == reference, f"kill at rename {k} ({seen[k - 1]})"
        weights = torch.load(runs / "r" / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[n], ref_weights[n]) for n in ref_weights), f"kill at rename {k}"


def test_b4_a_real_kill_while_the_split_is_written_does_not_block_the_restart(
    tmp_path: Path, data: Path
) -> None:
    """Row 36 as found: the process dies (no cleanup at all) right after ``train.csv``."""
    runs = tmp_path / "runs"
    args = train_args(runs, data, "k")
    killer = (
        "import os, sys, runpy; real = os.replace\n"
        "def replace(src, dst, *a, **k):\n"
        "    real(src, dst, *a, **k)\n"
        "    if str(dst).endswith('train.csv'): os._exit(137)\n"
        f"os.replace = replace; sys.argv = [{str(LAUNCH)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(LAUNCH)!r}, run_name='__main__')\n"
    )
    proc = python("-c", killer, *args)
    assert proc.returncode == 137, proc.stderr
    assert (runs / "k" / "splits" / "train.csv").is_file() and not (
        runs / "k" / "splits" / "test.csv"
    ).exists()
    rc, _, err = run(*args)
    assert rc == 0, err
    assert (runs / "k" / "splits" / "test.csv").is_file() and (runs / "k" / "predictions.csv").is_file()


# ----------------------------------------------------------------------------------------------
# B5 (row 67): commands act on the run folder they are given.


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report" / "summary.json").read_text())  # type: ignore[no-any-return]


def test_b5_report_of_a_copied_run_reads_the_copy(tmp_path: Path, base: Path) -> None:
    copy = copy_run(base, tmp_path / "runs" / "copy1")
    rc, _, err = run("report", "--run", str(copy), "--executor=inline")
    assert rc == 0, err
    summary = _summary(copy)
    assert summary["run"] == "copy1"
    assert Path(summary["cams"]["path"]).resolve() == (copy / "cams" / "cams.h5").resolve()


def test_b5_report_of_a_moved_run_finds_its_cams(tmp_path: Path, base: Path) -> None:
    moved = copy_run(base, tmp_path / "elsewhere" / "deeper" / "moved")
    # Where it was trained is gone: its config.yaml names a runs_dir that no longer exists.
    config = moved / "config.yaml"
    config.write_text(
        config.read_text().replace(f"runs_dir: {base.parent}", f"runs_dir: {tmp_path / 'gone'}")
    )
    assert f"runs_dir: {tmp_path / 'gone'}" in config.read_text()
    rc, _, err = run("report", "--run", str(moved), "--executor=inline")
    assert rc == 0, err
    summary = _summary(moved)
    assert "cams" in summary and summary["cams"]["n_items"] > 0, summary["notes"]
    assert Path(summary["cams"]["path"]).resolve() == (moved / "cams" / "cams.h5").resolve()
    assert not any("no CAM file" in n for n in summary["notes"])


def test_b5_report_honours_set_cam_out_and_data_root(tmp_path: Path, base: Path, data: Path) -> None:
    copy = copy_run(base, tmp_path / "runs" / "over")
    camout = tmp_path / "camout"
    shutil.move(str(copy / "cams"), camout)
    moved_data = shutil.copytree(data, tmp_path / "moved-data")
    rc, _, err = run(
        "report",
        "--run",
        str(copy),
        "--executor=inline",
        f"--set=cam.out={camout}",
        f"--set=data.root={moved_data}",
    )
    assert rc == 0, err
    summary = _summary(copy)
    assert Path(summary["cams"]["path"]).resolve() == (camout / "cams.h5").resolve()
    galleries = summary["cams"]["galleries"]
    per_class = galleries.pop("per_class")
    shown = [it for items in [*galleries.values(), *per_class.values()] for it in items]
    assert shown and all(it["image_found"] for it in shown)


def test_b5_logs_of_a_copied_run_read_the_copy(tmp_path: Path) -> None:
    original = tmp_path / "runs" / "orig"
    folder = original / "slurm" / "4242"
    folder.mkdir(parents=True)
    (folder / "4242_0_log.out").write_text("ORIGINAL\n")
    record = {"kind": "probe", "executor": "slurm", "job_id": "4242", "tasks": ["4242"], "name": "x"}
    record["folder"] = str((original / "slurm" / "%j").absolute())
    (original / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [record]}))
    copy = copy_run(original, tmp_path / "runs" / "copy")
    (copy / "slurm" / "4242" / "4242_0_log.out").write_text("COPY\n")
    rc, out, err = run("logs", "--run", str(copy))
    assert rc == 0, err
    assert "COPY" in out and "ORIGINAL" not in out


def test_job_ids_in_jobs_json_cannot_lead_outside_the_run(tmp_path: Path) -> None:
    from submitit.core.utils import JobPaths

    run_dir = tmp_path / "runs" / "ids"
    task = "../../../leak/x"
    leaked = JobPaths(run_dir.absolute() / "slurm" / task, job_id=task, task_id=0).stdout
    leaked.parent.mkdir(parents=True, exist_ok=True)
    leaked.write_text("SECRET\n")
    record = {"kind": "train", "executor": "slurm", "job_id": "1", "tasks": [task], "name": "x"}
    record["folder"] = str(run_dir / "slurm" / "%j")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [record]}))
    rc, out, err = run("logs", "--run", str(run_dir))
    one_line_error(rc, err, "is not a cnncam jobs file", "job ids must look like")
    assert "SECRET" not in out


# ----------------------------------------------------------------------------------------------
# B8 (row 77): --sbatch-extra may not set a launcher-managed option, abbreviated or short.


@pytest.mark.parametrize(
    ("extra", "managed"),
    [
        ("--arr=0-99", "--array"),
        ("--dep=afterany:1", "--dependency"),
        ("--outp=/tmp/x", "--output"),
        ("--gre=gpu:8", "--gres"),
        ("--sig=USR1@60", "--signal"),
        ("--parti=cpu", "--partition"),
        ("--job-n=x", "--job-name"),
        ("--ntasks-per=4", "--ntasks-per-node"),
        ("-a", "--array"),
        ("-a0-99", "--array"),
        ("-o/tmp/x", "--output"),
        ("-d=afterok:1", "--dependency"),
        ("-pcpu", "--partition"),
        ("-J", "--job-name"),
    ],
)
def test_b8_sbatch_extra_refuses_abbreviations_of_managed_options(
    tmp_path: Path, extra: str, managed: str
) -> None:
    rc, out, err = run(
        "train", f"--set=runs_dir={tmp_path}", "--executor=slurm", "--dry-run", f"--sbatch-extra={extra}"
    )
    one_line_error(rc, err, "may not set", managed)
    assert "#SBATCH" not in out


@pytest.mark.parametrize(
    "extra", ["--exclusive", "--reservation=foo", "--gres-flags=enforce-binding", "--time-min=10"]
)
def test_b8_other_sbatch_options_still_pass(tmp_path: Path, extra: str) -> None:
    rc, out, err = run(
        "train", f"--set=runs_dir={tmp_path}", "--executor=slurm", "--dry-run", f"--sbatch-extra={extra}"
    )
    assert rc == 0, err
    assert f"#SBATCH {extra}" in out


# ----------------------------------------------------------------------------------------------
# Row 38: two trainings of one run at once -> the second gets the lock's error naming the holder.


def test_two_trainings_of_one_run_at_once_the_second_is_refused(tmp_path: Path, data: Path) -> None:
    runs = tmp_path / "runs"
    first = subprocess.Popen(
        [sys.executable, str(LAUNCH), *train_args(runs, data, "twice", "--set=train.epochs=1000")],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = runs / "twice" / "metrics.jsonl"
        for _ in range(1200):  # until the first one trains (its lock is taken before config.yaml)
            if metrics.is_file() or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        rc, _, err = run(*train_args(runs, data, "twice"))
        one_line_error(rc, err, "is in use", f"pid {first.pid}", "train")
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------------------------
# Unclear cases: each ends in one clear line, before any file is created.


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_that_is_a_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "cfgdir").mkdir()
    rc, _, err = run("train", "--config", str(tmp_path / "cfgdir"), "--dry-run")
    one_line_error(rc, err, "is a folder, not a YAML file")


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "train:\n  epochs: 3\ndata:\n  root: x\ntrain:\n  lr: 0.1\n")
    rc, _, err = run("train", "--config", str(path), "--dry-run")
    one_line_error(rc, err, "duplicate key 'train'", "line 5", "line 1")
    nested = _config_file(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n")
    one_line_error(*run("train", "--config", str(nested), "--dry-run")[::2], "duplicate key 'epochs'")


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "train:\n  <<: {epochs: 3, lr: 0.5}\n  lr: 0.1\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.1)


def test_an_alias_bomb_gives_a_short_error(tmp_path: Path) -> None:
    # Six levels of ten aliases each: a 400-byte file whose first bad value expands to 10^5 items.
    levels = ["&a [" + ", ".join(["x"] * 10) + "]"]
    for prev, name in zip("abcde", "bcdef"):
        levels.append(f"&{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    path = _config_file(tmp_path, "slurm:\n  setup: [[" + ", ".join(levels) + "]]\n")
    assert len(path.read_bytes()) < 500
    rc, _, err = run("train", "--config", str(path), "--dry-run")
    one_line_error(rc, err, "slurm.setup[0] must be a string")
    assert len(err) < 2000, f"{len(err)} bytes of error"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.min_lr=-.inf", "train.min_lr must be a finite number, got -inf"),
        ("data.image_size=1", "data.image_size 1 is too small for simple_cnn"),
        ("data.image_size=20000", "data.image_size 20000 is larger than 4096"),
    ],
)
def test_bad_numbers_are_refused_before_any_file_is_created(
    tmp_path: Path, override: str, needle: str
) -> None:
    rc, _, err = run("train", f"--set=runs_dir={tmp_path / 'runs'}", f"--set={override}", "--executor=inline")
    one_line_error(rc, err, needle)
    assert not (tmp_path / "runs").exists()


def test_image_size_lower_bound_follows_the_model(tmp_path: Path) -> None:
    rc, _, err = run("train", "--set=data.image_size=4", "--set=model.channels=[4,8,16]", "--dry-run")
    one_line_error(rc, err, "3 blocks", "at least 8")
    rc, _, err = run("train", "--set=data.image_size=16", "--set=model.name=resnet18", "--dry-run")
    one_line_error(rc, err, "resnet18", "at least 32")
    assert run("train", "--set=data.image_size=8", "--set=model.channels=[4,8,16]", "--dry-run")[0] == 0


def test_an_image_path_too_long_for_the_cam_file_is_skipped_at_training(tmp_path: Path, data: Path) -> None:
    root = shutil.copytree(data, tmp_path / "d")
    deep = root / "circle" / ("x" * 200) / ("y" * 200)
    deep.mkdir(parents=True)
    shutil.copy(sorted((root / "circle").glob("*.png"))[0], deep / ("z" * 120 + ".png"))
    rel = deep.relative_to(root).as_posix() + "/" + "z" * 120 + ".png"
    assert len(rel.encode()) > 511
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = run(*train_args(tmp_path / "runs", root, "long"))
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "long"
    skipped = json.loads((run_dir / "skipped.json").read_text())
    assert [s["path"] for s in skipped] == [rel] and "511" in skipped[0]["reason"]
    assert all(rel not in (run_dir / "splits" / f"{s}.csv").read_text() for s in ("train", "val", "test"))
    rc, _, err = run("cam", "--run", str(run_dir), *TINY)
    assert rc == 0, err


def _no_dac() -> tuple[str, ...]:
    """Run as root without the capabilities that bypass file permissions (rows 28, 83-85)."""
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")


def test_a_runs_dir_that_is_not_writable_gives_one_line(tmp_path: Path, data: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        proc = run_proc(*train_args(runs, data, "ro"), prefix=_no_dac())
    finally:
        runs.chmod(0o755)
    one_line_error(proc.returncode, proc.stderr, "permission denied", str(runs / "ro"))
    assert not (runs / "ro").exists()


def test_a_read_only_run_gives_one_line_on_cam_and_report(tmp_path: Path, base: Path) -> None:
    run_dir = copy_run(base, tmp_path / "runs" / "ro")
    shutil.rmtree(run_dir / "cams")
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    before = (run_dir / "jobs.json").read_bytes()
    for p in [run_dir, *run_dir.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        cam = run_proc("cam", "--run", str(run_dir), *TINY, prefix=_no_dac())
        report = run_proc("report", "--run", str(run_dir), "--executor=inline", prefix=_no_dac())
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    one_line_error(cam.returncode, cam.stderr, "permission denied")
    one_line_error(report.returncode, report.stderr, "permission denied")
    assert (run_dir / "jobs.json").read_bytes() == before  # nothing lost or half-written


def test_a_full_disk_gives_one_line_and_the_failed_record_is_complete(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnncam.data import splits

    def full(*a: Any, **kw: Any) -> None:
        raise OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "runs" / "full" / "classes.json")
        )

    monkeypatch.setattr(splits, "atomic_write_json", full)
    rc, _, err = run(*train_args(tmp_path / "runs", data, "full"))
    one_line_error(rc, err, "no space left on device", "classes.json", "free")
    [rec] = load_records(RunPaths(tmp_path / "runs" / "full"))
    assert rec.state == "FAILED" and rec.command.startswith("python jobs/launch.py train") and rec.submitted


def test_recording_a_failed_inline_job_that_fails_too_does_not_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnncam.launch import executors, tasks

    def denied(*a: Any, **kw: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs" / "p" / "x"))

    monkeypatch.setattr(tasks.ReportTask, "run", denied)
    monkeypatch.setattr(executors, "append_records", denied)
    run_dir = tmp_path / "runs" / "p"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: p\n")
    rc, _, err = run("report", "--run", str(run_dir), "--executor=inline")
    one_line_error(rc, err, "permission denied")
    assert "could not record" in err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_honour_the_umask(tmp_path: Path, data: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        rc, _, err = run(*train_args(tmp_path / "runs", data, "m"))
    finally:
        os.umask(old)
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "m"
    for name in ("config.yaml", "classes.json", "jobs.json", "checkpoints/last.pt", "splits/train.csv"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_status_of_a_missing_folder_says_it_is_missing(tmp_path: Path) -> None:
    for command in ("status", "logs", "cancel"):
        rc, _, err = run(command, "--run", str(tmp_path / "nope"))
        one_line_error(rc, err, f"run folder {tmp_path / 'nope'} does not exist")


def test_run_dot_means_this_folder(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_run(base, tmp_path / "runs" / "here")
    monkeypatch.chdir(copy)
    rc, _, err = run("report", "--run", ".", "--executor=inline")
    assert rc == 0, err
    assert _summary(copy)["run"] == "here"


def test_logs_of_an_inline_job_say_there_are_none(tmp_path: Path, base: Path) -> None:
    copy = copy_run(base, tmp_path / "runs" / "inl")
    for follow in ((), ("--follow",)):
        rc, out, err = run("logs", "--run", str(copy), *follow)
        one_line_error(rc, err, "ran inline", "terminal")


def test_zero_shards_are_refused(tmp_path: Path, base: Path) -> None:
    copy = copy_run(base, tmp_path / "runs" / "z")
    for command in ("cam", "merge"):
        rc, _, err = run(command, "--run", str(copy), "--shards", "0", "--executor=inline")
        one_line_error(rc, err, "--shards must be >= 1, got 0")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_empty_val_split_warns_and_the_log_does_not_call_train_metrics_val(
    tmp_path: Path, data: Path
) -> None:
    root = tmp_path / "two"
    for cls in ("circle", "square"):
        (root / cls).mkdir(parents=True)
        for p in sorted((data / cls).glob("*.png"))[:3]:
            shutil.copy(p, root / cls / p.name)
    lines = _Lines()
    logging.getLogger("cnncam.train").addHandler(lines)  # cnncam's own logger does not propagate
    try:
        with pytest.warns(UserWarning, match="val split is empty"):
            rc, _, err = run(*train_args(tmp_path / "runs", root, "noval", "--set=data.layout=single"))
    finally:
        logging.getLogger("cnncam.train").removeHandler(lines)
    assert rc == 0, err
    epoch_lines = [ln for ln in lines.lines if ln.startswith("epoch 1/1")]
    assert epoch_lines and all("val loss" not in ln and "no val split" in ln for ln in epoch_lines), (
        lines.lines
    )
