"""``merge_parts(consolidate=...)``: one physical file, equal to the virtual one; the open-file limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_storage_common import datasets, make_run, write_parts

from cnncam.errors import SchemaError
from cnncam.storage import MERGED_FILENAME, merge_parts, open_cams
from cnncam.storage import consolidate as C
from cnncam.storage import merge as M
from cnncam.storage import schema as S

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """5 parts of 37 items with every optional dataset (activations, filters, metrics, upsampled)."""
    return write_parts(tmp_path_factory.mktemp("parts"), make_run(), 37, 5, batch_size=4)


def _virtual(f: h5py.File) -> list[str]:
    return [k for k, d in S.list_datasets(f).items() if d.is_virtual]


def test_consolidated_file_equals_the_virtual_one_and_stands_alone(parts: list[Path], tmp_path: Path) -> None:
    virtual = merge_parts(parts, parts[0].parent / MERGED_FILENAME, consolidate=False)
    single = merge_parts(parts, tmp_path / MERGED_FILENAME, consolidate=True)
    with h5py.File(virtual, "r") as fv, h5py.File(single, "r") as fs:
        assert _virtual(fv) and not _virtual(fs)
        a, b = datasets(fv), datasets(fs)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        for name, d in S.list_datasets(fs).items():
            if S.is_per_item(name):  # same filters as a part: fletcher32 checks every chunk
                assert d.fletcher32 and d.compression == "gzip" and d.maxshape[0] is None, name
        av, ass = S.decode_attrs(fv.attrs), S.decode_attrs(fs.attrs)
    assert ass["consolidated"] is True and ass["parts"] == []
    assert [Path(p["path"]).name for p in ass["part_provenance"]] == [p.name for p in parts]
    skip = ("parts", "part_provenance", "created_utc", "consolidated")
    assert {k: v for k, v in av.items() if k not in skip} == {k: v for k, v in ass.items() if k not in skip}
    with open_cams(single) as cams:  # no part next to it: the file is self-contained
        assert cams.kind == "merged" and cams.n_items == 37
        np.testing.assert_array_equal(cams.read("samples/index"), np.arange(37))


def test_consolidation_is_automatic_above_the_documented_part_count(
    parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(M, "CONSOLIDATE_ABOVE", 5)
    with h5py.File(merge_parts(parts, tmp_path / "five.h5"), "r") as f:
        assert _virtual(f)  # 5 parts: not above the limit
    monkeypatch.setattr(M, "CONSOLIDATE_ABOVE", 4)
    with h5py.File(merge_parts(parts, tmp_path / "more.h5"), "r") as f:
        assert not _virtual(f) and f.attrs["consolidated"] == 1


def test_a_failed_consolidation_keeps_the_old_file(
    parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = merge_parts(parts, tmp_path / MERGED_FILENAME, consolidate=False)
    before = out.read_bytes()
    calls = []

    def fail_on_third(self: C._Out) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(self)

    real = C._Out.flush
    monkeypatch.setattr(C._Out, "flush", fail_on_third)
    with pytest.raises(OSError, match="No space left"):
        merge_parts(parts, out, consolidate=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MERGED_FILENAME, MERGED_FILENAME + ".lock"]


def test_consolidation_names_a_part_with_a_corrupt_chunk(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, make_run(), 24, 3)
    with h5py.File(paths[2], "r") as f:
        info = f["samples/logits"].id.get_chunk_info(0)
    with open(paths[2], "r+b") as fh:
        fh.seek(info.byte_offset + 2)
        fh.write(b"\xde\xad\xbe\xef")
    with pytest.raises(
        SchemaError, match=f"part {paths[2]}: dataset samples/logits cannot be read.*checksum"
    ):
        merge_parts(paths, tmp_path / MERGED_FILENAME, consolidate=True)
    assert not (tmp_path / MERGED_FILENAME).exists()


CHILD = r"""
import json, resource, sys
import h5py, numpy as np
from cnncam.storage import open_cams

merged, limit = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
out = {}
with h5py.File(merged, "r") as f:  # plain h5py through the virtual dataset: the known hazard
    out["h5py_fill_rows"] = int((f["samples/index"][...] == -1).sum())
try:
    with open_cams(merged) as cams:
        names = cams.datasets()
        rows = {n: [] for n in names}
        for chunk in cams.iter_rows(names, chunk=7):
            for n in names:
                rows[n].append(chunk[n])
    rows.pop("samples/path")
    out["cnncam"] = {n: np.concatenate(v).tolist() for n, v in rows.items()}
except Exception as e:  # a loud failure is acceptable; silent fill values are not
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_open_file_limit_below_the_part_count_never_gives_fill_values(tmp_path: Path) -> None:
    n_parts = 60
    paths = write_parts(tmp_path, make_run(), 120, n_parts, batch_size=2, extras=False)
    merged = merge_parts(paths, tmp_path / MERGED_FILENAME, consolidate=False)
    with h5py.File(merged, "r") as f:
        want = {n: d[...] for n, d in S.list_datasets(f).items() if S.is_per_item(n)}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {"PYTHONPATH": f"{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script), str(merged), "40"], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["h5py_fill_rows"] > 0, "with 40 open files libhdf5 should have failed to open some sources"
    assert "error" not in got, got.get("error")
    for name, values in got["cnncam"].items():
        if name != "samples/path":
            np.testing.assert_array_equal(
                np.asarray(values, dtype=want[name].dtype), want[name], err_msg=name
            )


def test_a_copy_that_does_not_read_back_right_is_not_published(
    parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consolidated file is read back before os.replace: a wrong copy never gets the name."""
    real = C._Out.flush

    def wrong(self: C._Out) -> None:
        real(self)
        if self.d.name == "/samples/index" and self.at > 3:
            self.d[3] = -5  # a row copied wrong (say, a driver bug), chunk checksums still fine

    monkeypatch.setattr(C._Out, "flush", wrong)
    with pytest.raises(SchemaError, match="samples/index does not read 0..36 after copying; not published"):
        merge_parts(parts, tmp_path / MERGED_FILENAME, consolidate=True)
    assert not (tmp_path / MERGED_FILENAME).exists()


def test_merge_flag_consolidate_is_the_config_key() -> None:
    from cnncam.cli import build_parser, overrides_from

    args = build_parser().parse_args(["merge", "--run", "runs/x", "--consolidate"])
    assert "cam.consolidate=always" in overrides_from(args)
    assert "cam.consolidate=always" not in overrides_from(build_parser().parse_args(["merge", "--run", "x"]))
