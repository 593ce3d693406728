"""merge_parts / part_status: equality with a single part, every refusal, relative VDS sources,
command-line HDF5 tools from another working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_storage_common import (
    assert_same_content,
    make_batch,
    make_run,
    wait_committed,
    write_part,
    write_parts,
)

from cnncam.errors import SchemaError
from cnncam.storage import PartSpec, PartWriter, merge_parts, open_cams, part_status

N = 50
HAVE_TOOLS = shutil.which("h5ls") is not None and shutil.which("h5dump") is not None
needs_tools = pytest.mark.skipif(
    not HAVE_TOOLS and os.environ.get("CI") != "true",
    reason="h5ls/h5dump not installed (apt-get install hdf5-tools); required in CI",
)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(merged file over 3 parts in cams/parts/, single-part file of the same items)."""
    root = tmp_path_factory.mktemp("merge")
    run = make_run()
    parts = write_parts(root / "cams" / "parts", run, N, 3)
    single = write_part(root / "single", run, 0, N)
    return merge_parts(parts, root / "cams" / "cams.h5"), single


def test_merge_of_three_parts_equals_single_part(merged: tuple[Path, Path]) -> None:
    out, single = merged
    assert_same_content(out, single, attrs=False)
    with open_cams(out) as f, open_cams(single) as g:
        assert f.kind == "merged" and f.n_items == N and f.attrs["num_shards"] == 3
        assert f.attrs["parts"] == [f"parts/part-0000{i}-of-00003.h5" for i in range(3)]
        assert f.fingerprint == g.fingerprint and f.config == g.config and f.methods == g.methods
        assert len(f.attrs["part_provenance"]) == 3 and "created_utc" in f.attrs["part_provenance"][0]
        for name in f.datasets():
            np.testing.assert_array_equal(f.read(name), g.read(name), err_msg=name)
        assert f.dataset("cams/gradcam/features").is_virtual


def test_merged_file_moves_with_its_parts(
    merged: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, single = merged
    moved = tmp_path / "elsewhere" / "cams"
    shutil.copytree(out.parent, moved)
    monkeypatch.chdir(tmp_path)  # neither the old nor the new folder
    with open_cams(moved / "cams.h5") as f, open_cams(single) as g:
        np.testing.assert_array_equal(f.read("cams/gradcam_pp/features"), g.read("cams/gradcam_pp/features"))
    (moved / "parts" / "part-00001-of-00003.h5").unlink()
    with h5py.File(moved / "cams.h5", "r") as raw:  # what plain VDS does: silent fill values
        assert (raw["samples/index"][16:33] == -1).all() and np.isnan(raw["cams/gradcam/features"][20]).all()
    with pytest.raises(SchemaError, match="part-00001-of-00003.h5, which is missing"):
        open_cams(moved / "cams.h5")


def _dump(args: list[str], cwd: Path) -> str:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True, timeout=60).stdout


def _values(text: str) -> list[float]:
    body = text.split("DATA {", 1)[1]
    return [
        float(tok.rstrip(","))
        for line in body.splitlines()
        if ":" in line
        for tok in line.split(":", 1)[1].split()
    ]


@needs_tools
def test_h5ls_lists_merged_file_from_another_cwd(merged: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = merged
    listing = _dump(["h5ls", "-r", str(out)], cwd=tmp_path)
    assert re.search(rf"^/cams/gradcam/layer4\.1\.conv2\s+Dataset \{{{N}, 2, 4, 4\}}$", listing, re.M)
    assert re.search(rf"^/samples/path\s+Dataset \{{{N}\}}$", listing, re.M)
    assert re.search(r"^/upsampled/gradcam_pp/features\s+Dataset \{50, 2, 16, 16\}$", listing, re.M)


@needs_tools
def test_h5dump_reads_virtual_data_from_another_cwd(merged: tuple[Path, Path], tmp_path: Path) -> None:
    out, single = merged
    with open_cams(single) as g:
        logits, cam = g.read("samples/logits"), g.read("cams/gradcam/features")
    index = _values(_dump(["h5dump", "-d", "/samples/index", "-w", "0", str(out)], cwd=tmp_path))
    assert index == list(range(N))
    got = _values(
        _dump(["h5dump", "-d", "/samples/logits", "-s", "30,0", "-c", "5,3", str(out)], cwd=tmp_path)
    )
    np.testing.assert_allclose(got, logits[30:35].ravel(), rtol=1e-5)
    got = _values(
        _dump(
            ["h5dump", "-d", "/cams/gradcam/features", "-s", "40,1,0,0", "-c", "1,1,4,4", str(out)],
            cwd=tmp_path,
        )
    )
    np.testing.assert_allclose(got, cam[40, 1].astype(np.float32).ravel(), rtol=1e-3)
    text = _dump(["h5dump", "-d", "/samples/path", "-s", "20", "-c", "1", str(out)], cwd=tmp_path)
    assert '"class_2/Bild_00020_' in text


def _three_parts(
    root: Path, ranges: list[tuple[int, int]], run_for: dict[int, object] | None = None
) -> list[Path]:
    paths = []
    for i, (a, b) in enumerate(ranges):
        run = (run_for or {}).get(i, make_run())
        paths.append(write_part(root, run, a, b, shard=i, num_shards=len(ranges)))  # type: ignore[arg-type]
    return paths


def test_merge_refuses_missing_part(tmp_path: Path) -> None:
    parts = write_parts(tmp_path, make_run(), N, 3)
    parts[1].unlink()
    with pytest.raises(SchemaError, match=f"part {parts[1]} is missing"):
        merge_parts(parts, tmp_path / "cams.h5")
    with pytest.raises(SchemaError, match="1 of 3 parts are missing from the merge: part-00001-of-00003.h5"):
        merge_parts([parts[0], parts[2]], tmp_path / "cams.h5")
    assert not (tmp_path / "cams.h5").exists()


def test_merge_refuses_incomplete_part(tmp_path: Path) -> None:
    run = make_run()
    parts = write_parts(tmp_path, run, N, 3)
    parts[2].unlink()
    w = PartWriter.open_or_resume(tmp_path, PartSpec.for_shard(run, N, 2, 3), batch_size=8)
    w.put(make_batch(run, 33, 41))
    wait_committed(w, 8)
    w.abort()
    with pytest.raises(SchemaError, match=r"part-00002-of-00003.h5 is missing \(a .partial file exists"):
        merge_parts(parts, tmp_path / "cams.h5")
    with pytest.raises(SchemaError, match="is not a complete part"):
        merge_parts([*parts[:2], w.partial], tmp_path / "cams.h5")
    states = [(s.state, s.n_committed, s.n_items) for s in part_status(tmp_path, 3, run.fingerprint())]
    assert states == [("complete", 16, 16), ("complete", 17, 17), ("partial", 8, 17)]


def test_merge_refuses_overlap_and_gap(tmp_path: Path) -> None:
    over = _three_parts(tmp_path / "over", [(0, 20), (16, 30), (30, 40)])
    with pytest.raises(
        SchemaError, match=r"part .*part-00001-of-00003.h5 \[16, 30\) overlaps part .*part-00000"
    ):
        merge_parts(over, tmp_path / "over.h5")
    gap = _three_parts(tmp_path / "gap", [(0, 16), (18, 30), (30, 40)])
    with pytest.raises(SchemaError, match=r"items \[16, 18\) are in no part: gap before part .*part-00001"):
        merge_parts(gap, tmp_path / "gap.h5")
    late = _three_parts(tmp_path / "late", [(2, 16), (16, 30), (30, 40)])
    with pytest.raises(SchemaError, match=r"items \[0, 2\) are in no part"):
        merge_parts(late, tmp_path / "late.h5")


def test_merge_refuses_mismatched_fingerprint_and_shapes(tmp_path: Path) -> None:
    other = make_run(checkpoint_sha256="99" * 32)
    mixed = _three_parts(tmp_path / "fp", [(0, 16), (16, 32), (32, 48)], {1: other})
    with pytest.raises(
        SchemaError,
        match=f"part {mixed[1]} has fingerprint {other.fingerprint()} but .* has {make_run().fingerprint()}",
    ):
        merge_parts(mixed, tmp_path / "fp.h5")
    root = tmp_path / "shape"
    parts = [
        write_part(root, make_run(), 0, 16, 0, 2),
        write_part(root, make_run(), 16, 32, 1, 2, extras=False),
    ]
    with pytest.raises(
        SchemaError, match=f"part {parts[1]} lacks datasets .*samples/boxes.* compared with {parts[0]}"
    ):
        merge_parts(parts, tmp_path / "shape.h5")
    parts[1] = write_part(root / "b", make_run(), 16, 32, 1, 2)
    with h5py.File(parts[1], "r+") as f:  # same names, one dataset wider
        del f["samples/logits"]
        f.create_dataset("samples/logits", data=np.zeros((16, 4), np.float32))
    with pytest.raises(
        SchemaError, match=r"per-item shapes/dtypes differ .*samples/logits: \(4,\) float32 vs \(3,\)"
    ):
        merge_parts(parts, tmp_path / "shape.h5")


def test_part_status_reports_every_state(tmp_path: Path) -> None:
    run = make_run()
    write_part(tmp_path, run, 0, 13, 0, 4)
    write_part(tmp_path, make_run(run_name="other"), 13, 25, 1, 4)
    w = PartWriter.open_or_resume(tmp_path, PartSpec.for_shard(run, N, 2, 4), batch_size=8)
    w.put(make_batch(run, 25, 33))
    wait_committed(w, 8)
    w.abort()
    (tmp_path / "part-00003-of-00004.h5").write_bytes(b"garbage")
    got = [(s.shard_index, s.state, s.n_committed) for s in part_status(tmp_path, 4, run.fingerprint())]
    assert got == [(0, "complete", 13), (1, "foreign", 0), (2, "partial", 8), (3, "corrupt", 0)]
    (tmp_path / "part-00003-of-00004.h5").unlink()
    assert [s.state for s in part_status(tmp_path, 4)] == ["complete", "complete", "partial", "missing"]


def test_merge_copies_filters_and_concatenates_activations(tmp_path: Path) -> None:
    run = make_run()
    filters = np.arange(6 * 3 * 9, dtype=np.float32).reshape(6, 3, 3, 3)
    paths = []
    for i, (a, b) in enumerate([(0, 8), (8, 16)]):
        w = PartWriter.open_or_resume(tmp_path, PartSpec(run, i, 2, a, b), batch_size=8)
        acts = np.full((2, 4, 2, 2), i + 1, np.float32)
        w.put_extras(
            activations={"features": acts}, activation_index=np.array([a, a + 1]), first_conv=filters
        )
        w.put(make_batch(run, a, b))
        paths.append(w.close())
    with open_cams(merge_parts(paths, tmp_path / "cams.h5")) as f:
        acts, idx = f.activations("features")
        assert idx.tolist() == [0, 1, 8, 9] and acts[:, 0, 0, 0].tolist() == [1, 1, 2, 2]
        np.testing.assert_array_equal(f.filters(), filters)
