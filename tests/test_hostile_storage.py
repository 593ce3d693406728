"""Hostile and damaged CAM files, merges and exports (issue 9, storage side).

Each case is crafted the way it was found (``notes/hostile-inputs.md`` rows 42, 54-56, 60-64, 68)
and asserts the exact outcome: the error names the file and the dataset, the secret never reaches
``index.html`` / ``summary.json``, nothing outside the run and ``data.root`` is opened, and nothing
that was good is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from test_cam_export_common import child_env, save_config, train_tiny_run, with_cam
from test_report_common import make_run
from test_storage_common import make_batch, write_parts
from test_storage_common import make_run as storage_run

from cnncam.cam.export import export_shard, merge
from cnncam.config import RunConfig
from cnncam.errors import CamError, SchemaError
from cnncam.report import build_report
from cnncam.storage import MERGED_FILENAME, PartSpec, PartWriter, merge_parts, open_cams, part_filename
from cnncam.storage import merge as merge_module
from cnncam.storage import schema as S
from cnncam.storage.recover import commit_path, read_commit

SECRET = "TOPSECRET-LINE-1 api_key=abc123"
SECRET_H5 = "SECRET-FROM-FOREIGN-H5"


# ----------------------------------------------------------------------------------------------
# Crafting helpers: a run whose CAM file (or one of its parts) has one dataset swapped


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """``tmp/secret``: a text file, an HDF5 file and a PNG that no report may read."""
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "pw.txt").write_text((SECRET + "\n") * 40)
    with h5py.File(folder / "secret.h5", "w") as f:
        f["leak"] = np.array([f"{SECRET_H5}-{i}".encode() for i in range(30)], dtype="S512")
        f["samples/path"] = f["leak"][...]
    Image.fromarray(np.full((28, 32, 3), 7, dtype=np.uint8)).save(folder / "SECRET_IMAGE.png")
    return folder


def _replace(path: Path, name: str, make: Callable[[h5py.File, str], object]) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        make(f, name)


def _external_storage(secret: Path) -> Callable[[h5py.File, str], object]:
    def make(f: h5py.File, name: str) -> object:
        return f.create_dataset(
            name, shape=(30,), dtype="S512", external=[(str(secret / "pw.txt"), 0, 15360)]
        )

    return make


def _external_link(secret: Path) -> Callable[[h5py.File, str], object]:
    def make(f: h5py.File, name: str) -> object:
        f[name] = h5py.ExternalLink(str(secret / "secret.h5"), "/leak")
        return None

    return make


def _soft_to_external(secret: Path) -> Callable[[h5py.File, str], object]:
    def make(f: h5py.File, name: str) -> object:
        f["zz_hidden"] = h5py.ExternalLink(str(secret / "secret.h5"), "/leak")
        f[name] = h5py.SoftLink("/zz_hidden")
        return None

    return make


def _virtual(source: str, dset: str = "samples/path") -> Callable[[h5py.File, str], object]:
    def make(f: h5py.File, name: str) -> object:
        layout = h5py.VirtualLayout((30,), dtype="S512")
        layout[:] = h5py.VirtualSource(source, dset, shape=(30,))
        return f.create_virtual_dataset(name, layout)

    return make


def _report_files(run: Path) -> str:
    out = run / "report"
    return "".join(p.read_text(errors="replace") for p in out.glob("*.json")) + "".join(
        p.read_text(errors="replace") for p in out.glob("*.html")
    )


# ----------------------------------------------------------------------------------------------
# B2: the report reads nothing outside the run (single-file cams.h5)


@pytest.mark.parametrize(
    ("case", "shards", "expected"),
    [
        ("external_storage", 1, "samples/path uses external raw storage"),
        ("external_link", 1, "samples/path is an external link"),
        ("soft_link_to_external", 1, "samples/path is a soft link"),
        ("vds_in_a_part", 1, "samples/path is a virtual dataset, but a part file holds its own data"),
        ("vds_absolute_source", 2, "samples/path reads virtual source '/.*secret.h5', which is outside"),
        ("vds_relative_escape", 2, r"samples/path reads virtual source '\.\./.*secret.h5', which is outside"),
    ],
)
def test_report_refuses_data_from_outside_the_run(
    tmp_path: Path, secrets: Path, case: str, shards: int, expected: str
) -> None:
    run = make_run(tmp_path / "work", shards=shards)
    cams = run / "cams" / MERGED_FILENAME
    make = {
        "external_storage": _external_storage(secrets),
        "external_link": _external_link(secrets),
        "soft_link_to_external": _soft_to_external(secrets),
        "vds_in_a_part": _virtual(str(secrets / "secret.h5")),
        "vds_absolute_source": _virtual(str(secrets / "secret.h5")),
        "vds_relative_escape": _virtual(os.path.relpath(secrets / "secret.h5", cams.parent)),
    }[case]
    _replace(cams, "samples/path", make)
    with pytest.raises(SchemaError, match=expected) as err:
        build_report(run)
    assert str(cams) in str(err.value)
    assert SECRET not in _report_files(run) and SECRET_H5 not in _report_files(run)


def test_merged_file_whose_datasets_use_other_sources_than_parts_says(tmp_path: Path, secrets: Path) -> None:
    """The ``parts`` attribute lists the real parts, but samples/path reads a foreign file."""
    run = make_run(tmp_path / "work", shards=2)
    cams = run / "cams" / MERGED_FILENAME
    _replace(cams, "samples/path", _virtual(str(secrets / "secret.h5")))
    with h5py.File(cams, "r") as f:  # the lie: parts still names the two real parts
        assert json.loads(f.attrs["parts"]) == [part_filename(0, 2), part_filename(1, 2)]
    with pytest.raises(
        SchemaError, match="samples/path reads virtual source '/.*secret.h5', which is outside"
    ):
        build_report(run)
    assert SECRET_H5 not in _report_files(run)


def test_part_behind_a_merged_file_is_checked_too(tmp_path: Path, secrets: Path) -> None:
    run = make_run(tmp_path / "work", shards=2)
    part = run / "cams" / part_filename(1, 2)
    _replace(part, "samples/path", _external_storage(secrets))
    with pytest.raises(SchemaError, match=f"{part}: dataset samples/path uses external raw storage"):
        build_report(run)
    assert SECRET not in _report_files(run)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_image_paths_outside_data_root_are_never_opened(
    tmp_path: Path, secrets: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    run = make_run(tmp_path / "work")
    cams = run / "cams" / MERGED_FILENAME
    data_root = tmp_path / "work" / "data"  # make_run's data.root
    bad = str(secrets / "SECRET_IMAGE.png") if where == "absolute" else "../../secret/SECRET_IMAGE.png"
    assert (data_root / bad).resolve() == (secrets / "SECRET_IMAGE.png").resolve()

    def make(f: h5py.File, name: str) -> object:
        kw = S.dataset_kwargs(S.PATH, (), 30, 8)
        return f.create_dataset(name, **kw)

    _replace(cams, "samples/path", make)
    with h5py.File(cams, "r+") as f:
        f[S.PATH][...] = np.array([bad.encode()] * 30, dtype=S.dtype_for(S.PATH))
    opened: list[str] = []
    real_open = Image.open

    def spy(fp: object, *args: object, **kwargs: object) -> Image.Image:
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    index = build_report(run)
    assert not [p for p in opened if "SECRET" in p], opened
    summary = json.loads((index.parent / "summary.json").read_text())
    items = [i for g in summary["cams"]["galleries"].values() for i in (g if isinstance(g, list) else [])]
    assert items and all(not i["image_found"] for i in items)
    assert all("outside data.root" in i["note"] for i in items), items[0]["note"]
    assert any("outside data.root" in n for n in summary["notes"])


# ----------------------------------------------------------------------------------------------
# Damaged attributes and data: one clear line naming the file


def _set_attr(path: Path, key: str, value: object) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value


def _set_row(path: Path, name: str, row: int, value: int) -> None:
    with h5py.File(path, "r+") as f:
        f[name][row] = value


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: _set_attr(p, "schema_version", "one"), "schema_version 'one'.*not an integer"),
        (lambda p: _set_attr(p, "class_names", "[not json"), "attribute class_names is not valid JSON"),
        (lambda p: _set_attr(p, "class_names", '{"a": 1}'), "class_names must be a non-empty list"),
        (lambda p: _set_attr(p, "input_size", np.array([0, 5])), "input_size must be two positive"),
        (lambda p: _set_attr(p, "methods", '["gradcam", "nosuch"]'), "unknown CAM method 'nosuch'"),
        (lambda p: _set_attr(p, "n_items", "many"), "n_items 'many'.*not an integer"),
        (lambda p: _set_row(p, "samples/label", 5, 99), "samples/label.*row 5.*99.*classes 0..2"),
        (lambda p: _set_row(p, "samples/pred", 7, -3), "samples/pred.*row 7.*-3.*classes 0..2"),
        (lambda p: _set_row(p, "samples/targets", 2, 42), "samples/targets.*row 2.*42.*classes 0..2"),
    ],
    ids=[
        "schema_version_text",
        "class_names_not_json",
        "class_names_dict",
        "input_size_zero",
        "unknown_method",
        "n_items_text",
        "label_99",
        "pred_negative",
        "target_42",
    ],
)
def test_damaged_cam_file_gives_one_clear_error(
    tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    run = make_run(tmp_path / "work")
    cams = run / "cams" / MERGED_FILENAME
    damage(cams)
    with pytest.raises(SchemaError, match=expected) as err:
        build_report(run)
    assert str(cams) in str(err.value) and "\n" not in str(err.value)


def test_cams_of_another_run_with_other_classes_are_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "work")
    (run / "classes.json").write_text(json.dumps(["ant", "bee", "cow"]))
    with pytest.raises(SchemaError, match=r"classes .*circle.* differ from .*classes.json.*\['ant', 'bee'"):
        build_report(run)


def test_cams_of_another_run_with_the_same_classes_are_flagged(tmp_path: Path) -> None:
    run = make_run(tmp_path / "work")
    other = make_run(tmp_path / "other", name="other")
    index = build_report(run, cams=other / "cams" / MERGED_FILENAME)
    summary = json.loads((index.parent / "summary.json").read_text())
    notes = " ".join(summary["notes"])
    assert "belongs to run 'other', not 'rep'" in notes
    assert "belongs to run 'other', not 'rep'" in html.unescape(index.read_text())


# ----------------------------------------------------------------------------------------------
# B6: merge checks every part's data, and a part damaged later is named by the reader


def _flip_chunk_bytes(path: Path, name: str) -> None:
    """Bit flips in the middle of the first chunk of ``name`` (the file still opens)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(4)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(x ^ 0xFF for x in b))


def test_merge_refuses_a_part_with_corrupt_chunks_and_names_it(tmp_path: Path) -> None:
    run = storage_run()
    parts = write_parts(tmp_path, run, 40, 3)
    _flip_chunk_bytes(parts[1], "cams/gradcam/features")
    with pytest.raises(SchemaError, match=f"{parts[1]}.*cams/gradcam/features.*checksum"):
        merge_parts(parts, tmp_path / MERGED_FILENAME)
    assert not (tmp_path / MERGED_FILENAME).exists()


def test_part_corrupted_after_the_merge_is_named_by_the_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "work", shards=2)
    part = run / "cams" / part_filename(1, 2)
    _flip_chunk_bytes(part, "samples/logits")
    with pytest.raises(SchemaError, match=f"{part}.*samples/logits.*checksum"):
        build_report(run)


@pytest.mark.parametrize("locks", [True, False], ids=["with_locks", "file_system_without_locks"])
def test_two_merges_at_once_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: bool
) -> None:
    run = storage_run()
    if not locks:  # no flock support: the merges overlap, and unique temporary names keep them apart

        @contextlib.contextmanager
        def no_lock(path: Path) -> Iterator[bool]:
            yield False

        monkeypatch.setattr(merge_module, "merge_lock", no_lock)
    parts = write_parts(tmp_path, run, 24, 3)
    out = tmp_path / MERGED_FILENAME
    inside, release = threading.Event(), threading.Event()
    real = merge_module._write_merged
    errors: list[BaseException] = []

    def slow(*args: object, **kwargs: object) -> None:
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(30)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_module, "_write_merged", slow)

    def first() -> None:
        try:
            merge_parts(parts, out)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=first, name="first")
    t.start()
    assert inside.wait(30)
    threading.Timer(0.5, release.set).start()  # with a lock the second merge waits for the first
    merge_parts(parts, out)
    release.set()
    t.join(30)
    assert not errors, errors
    with open_cams(out) as cams:
        np.testing.assert_array_equal(cams.read("samples/index"), np.arange(24))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(MERGED_FILENAME))
    assert left == [MERGED_FILENAME, *[MERGED_FILENAME + ".lock"] * locks]  # no temporary file left


# ----------------------------------------------------------------------------------------------
# Partials that must not block a corrected re-run, and partials that must be kept


def test_empty_partial_of_another_config_never_blocks_a_rerun(tmp_path: Path) -> None:
    bad, good = storage_run(targets="topk:3"), storage_run()
    spec_bad = PartSpec.for_shard(bad, 16, 0, 1)
    PartWriter.open_or_resume(tmp_path, spec_bad, batch_size=8).abort()  # 0 rows committed
    assert (tmp_path / (part_filename(0, 1) + ".partial")).exists()
    spec = PartSpec.for_shard(good, 16, 0, 1)
    with PartWriter.open_or_resume(tmp_path, spec, batch_size=8) as w:
        assert w.state.status == "restarted"
        for a in (0, 8):
            w.put(make_batch(good, a, a + 8))
    with open_cams(tmp_path / part_filename(0, 1)) as cams:
        assert cams.fingerprint == good.fingerprint()


def test_partial_with_committed_rows_of_another_config_is_kept(tmp_path: Path) -> None:
    bad, good = storage_run(targets="topk:3"), storage_run()
    w = PartWriter.open_or_resume(tmp_path, PartSpec.for_shard(bad, 16, 0, 1), batch_size=8)
    w.put(make_batch(bad, 0, 8))
    w.abort()
    partial = tmp_path / (part_filename(0, 1) + ".partial")
    before = partial.read_bytes()
    with pytest.raises(SchemaError, match="belongs to another run"):
        PartWriter.open_or_resume(tmp_path, PartSpec.for_shard(good, 16, 0, 1), batch_size=8)
    assert partial.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# The CAM export and its merge on a tiny trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return train_tiny_run(tmp_path_factory.mktemp("hostile_export"))


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("class:999", r"class 999 is out of range; the model has 3 classes.*class:0..2, topk:1..3"),
        ("topk:10", r"asks for 10 classes but the model has 3.*class:0..2, topk:1..3"),
    ],
)
def test_bad_targets_are_refused_before_any_file(
    trained: RunConfig, tmp_path: Path, targets: str, expected: str
) -> None:
    out = tmp_path / "cams"
    with pytest.raises(CamError, match=expected):
        export_shard(with_cam(trained, out, targets=targets))
    assert not out.exists() or not list(out.iterdir())
    part = export_shard(with_cam(trained, out, targets="pred"))  # the corrected command just runs
    assert part.name == part_filename(0, 1)


def test_too_long_image_path_is_refused_before_any_file(trained: RunConfig, tmp_path: Path) -> None:
    copy = dataclasses.replace(trained, name="longpath")
    shutil.copytree(trained.run_dir, copy.run_dir)
    split = copy.run_dir / "splits" / "test.csv"
    lines = split.read_text().splitlines()
    lines[1] = "x" * 540 + "/img.png," + lines[1].rsplit(",", 1)[1]
    split.write_text("\n".join(lines) + "\n")
    # A crafted run: its manifest records the crafted split (else the split check refuses it first).
    manifest = copy.run_dir / "splits" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["sha256"]["splits/test.csv"] = hashlib.sha256(split.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(recorded))
    out = tmp_path / "cams"
    with pytest.raises(SchemaError, match=r"is 548 bytes; the schema stores at most 511"):
        export_shard(with_cam(copy, out))
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("other", [{"methods": ("layercam",)}, {"layers": ("features.block1",)}])
def test_merge_refuses_a_part_of_another_config_and_names_it(
    trained: RunConfig, tmp_path: Path, other: dict[str, object]
) -> None:
    """Part 0 comes from another config (other methods, or another layer: other model-derived
    fields); only it is named, part 1 is this run's."""
    out = tmp_path / "cams"
    foreign = export_shard(with_cam(trained, tmp_path / "other", **other), 0, 2)
    export_shard(with_cam(trained, out), 1, 2)
    shutil.copy(foreign, out / part_filename(0, 2))  # same name, another fingerprint
    with pytest.raises(
        SchemaError, match=f"1 of 2 parts are not complete: {out / part_filename(0, 2)} \\(foreign"
    ):
        merge(with_cam(trained, out), 2)
    assert not (out / MERGED_FILENAME).exists()


def test_merge_refuses_parts_of_an_older_checkpoint(trained: RunConfig, tmp_path: Path) -> None:
    """Exported, then the run's best.pt changed (retrained): the parts are stale and named."""
    copy = dataclasses.replace(trained, name="retrained")
    shutil.copytree(trained.run_dir, copy.run_dir)
    out = tmp_path / "cams"
    export_shard(with_cam(copy, out), 0, 1)
    best = copy.run_dir / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes() + b"\0")  # other bytes: another checkpoint hash
    with pytest.raises(SchemaError, match=f"{out / part_filename(0, 1)} \\(foreign: fingerprint"):
        merge(with_cam(copy, out), 1)


def test_merge_command_imports_no_torch(trained: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "cams"
    for shard in range(2):
        export_shard(with_cam(trained, out), shard, 2)
    code = (
        "import sys\n"
        "from cnncam.cli import main\n"
        "rc = main(['merge', '--run', sys.argv[1], '--shards', '2', '--executor', 'inline',\n"
        "           '--set', sys.argv[2]])\n"
        "print('RESULT', rc, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(trained.run_dir), f"cam.out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "RESULT 0 False" in done.stdout, done.stdout + done.stderr[-2000:]
    with open_cams(out / MERGED_FILENAME) as cams:
        np.testing.assert_array_equal(cams.read("samples/index"), np.arange(cams.n_items))


def test_merge_consolidates_when_the_config_says_so(trained: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "cams"
    for shard in range(2):
        export_shard(with_cam(trained, out), shard, 2)
    virtual = merge(with_cam(trained, out, consolidate="never"), 2)
    with open_cams(virtual) as cams:
        want = cams.read_many(cams.datasets())
    single = merge(with_cam(trained, out, consolidate="always"), 2)
    assert single == virtual  # published under the same name, atomically
    with h5py.File(single, "r") as f:
        assert f.attrs["consolidated"] == 1
        assert not [k for k, d in S.list_datasets(f).items() if d.is_virtual]
    with open_cams(single) as cams:
        got = cams.read_many(cams.datasets())
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


CHILD = r"""
import sys, time
import h5py
from cnncam.cam.export import export_shard
from cnncam.config import load_config

_setitem = h5py.Dataset.__setitem__

def slow_setitem(self, key, value):  # a long export, so that the kill lands mid-way
    _setitem(self, key, value)
    time.sleep(0.02)

h5py.Dataset.__setitem__ = slow_setitem
export_shard(load_config(sys.argv[1]))
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the loader workers")
def test_rerun_right_after_sigkill_is_not_blocked_by_loader_workers(
    trained: RunConfig, tmp_path: Path
) -> None:
    """Forked DataLoader workers outlive a SIGKILLed exporter by up to 5 s; they must not hold its lock."""
    out = tmp_path / "cams"
    cfg = with_cam(trained, out, split="train", batch_size=3, num_workers=2)
    config = save_config(cfg, tmp_path / "config.yaml")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    final = out / part_filename(0, 1)
    proc = subprocess.Popen([sys.executable, str(script), str(config)], env=child_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        record = read_commit(commit_path(final))
        if record is not None and record["n_committed"] >= 6:
            break
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "the child must be exporting with its loader workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(_alive(w) for w in workers), "the workers must still be alive for this test to mean anything"
    part = export_shard(cfg)  # right away, while the orphaned workers may still run
    assert part == final
    with open_cams(final) as cams:
        np.testing.assert_array_equal(cams.read("samples/index"), np.arange(cams.n_items))


def test_damaged_cam_file_through_the_report_command_is_one_line(tmp_path: Path) -> None:
    run = make_run(tmp_path / "work")
    cams = run / "cams" / MERGED_FILENAME
    _set_attr(cams, "class_names", "[not json")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "jobs/launch.py", "report", "--run", str(run), "--executor", "inline"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {cams}: root attribute class_names is not valid JSON (Expecting value: line 1 column 2 "
        "(char 1)); the file is damaged"
    ]
    assert "Traceback" not in done.stdout + done.stderr


def test_merge_names_ten_bad_parts_then_counts_the_rest(trained: RunConfig, tmp_path: Path) -> None:
    """A 1000-task array whose parts are all foreign must not print 1000 paths: ten, then a count."""
    out = tmp_path / "cams"
    out.mkdir()
    with pytest.raises(SchemaError) as err:
        merge(with_cam(trained, out), 12)
    msg = str(err.value)
    assert msg.startswith("cannot merge: 12 of 12 parts are not complete: ")
    assert msg.count("(missing") == 10 and "(and 2 more). Run the missing shards again" in msg
    assert str(out / part_filename(9, 12)) in msg and str(out / part_filename(10, 12)) not in msg
