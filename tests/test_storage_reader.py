"""open_cams: refusals, chunked iteration and selections with bounded memory."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from test_storage_common import make_run, write_part

from cnncam.errors import SchemaError
from cnncam.storage import PartBatch, PartSpec, PartWriter, open_cams


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = write_part(tmp_path, make_run(), 0, 8)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = np.int64(99)
    with pytest.raises(
        SchemaError, match=rf"{path} has schema_version 99; this cnncam reads schema version\(s\) 1"
    ):
        open_cams(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["schema_version"]
    with pytest.raises(SchemaError, match="not a cnncam CAM file"):
        open_cams(path)


def test_other_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        open_cams(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(SchemaError, match="not a readable HDF5 file"):
        open_cams(tmp_path / "junk.h5")
    path = write_part(tmp_path, make_run(), 0, 8)
    with h5py.File(path, "r+") as f:
        del f.attrs["fingerprint"]
    with pytest.raises(SchemaError, match="lacks required root attributes: fingerprint"):
        open_cams(path)


def test_helpful_errors_for_unknown_names(tmp_path: Path) -> None:
    with open_cams(write_part(tmp_path, make_run(), 0, 8)) as f:
        with pytest.raises(SchemaError, match="did you mean 'gradcam_pp'"):
            f.cam_name("gradcam_p", "features")
        with pytest.raises(SchemaError, match="did you mean 'features'"):
            f.cam_name("gradcam", "feature")
        with pytest.raises(
            SchemaError, match="unknown dataset 'samples/labels'; did you mean 'samples/label'"
        ):
            f.read("samples/labels")
        with pytest.raises(IndexError):
            f.read("samples/label", [0, 8])


def _big_file(tmp_path: Path, n: int, batch: int) -> Path:
    """n rows of one small method/layer, values a function of the index."""
    run = make_run(methods=("gradcam",), layers=("layer4",), targets="pred")
    spec = PartSpec(run, 0, 1, 0, n)
    grid = np.arange(49, dtype=np.float32).reshape(1, 1, 7, 7) / 49
    with PartWriter.open_or_resume(tmp_path, spec, batch_size=batch, queue_size=8) as w:
        for a in range(0, n, batch):
            idx = np.arange(a, min(a + batch, n))
            w.put(
                PartBatch(
                    index=idx,
                    path=[f"img/{i}.png" for i in idx],
                    label=idx % 3,
                    pred=(idx // 3) % 3,
                    logits=np.stack([idx % 5, idx % 7, idx % 11], 1).astype(np.float32),
                    targets=(idx % 3)[:, None],
                    cams={("gradcam", "layer4"): grid * (idx % 13)[:, None, None, None] / 13},
                )
            )
    return w.path


def test_chunked_iteration_equals_full_read(tmp_path: Path) -> None:
    n = 20_000
    path = _big_file(tmp_path, n, batch=1000)
    names = ["samples/index", "samples/path", "samples/logits", "cams/gradcam/layer4"]
    with open_cams(path) as f:
        full = {name: f.read(name) for name in names}
        chunks = list(f.iter_rows(names, chunk=3000))
        assert [len(c["samples/index"]) for c in chunks] == [3000] * 6 + [2000]
        for name in names:
            np.testing.assert_array_equal(np.concatenate([c[name] for c in chunks]), full[name])
        assert full["samples/path"][12345] == "img/12345.png"
        np.testing.assert_array_equal(full["samples/index"], np.arange(n))
        part = list(f.iter_rows(["samples/label"], chunk=700, start=1000, stop=2500))
        np.testing.assert_array_equal(
            np.concatenate([c["samples/label"] for c in part]), np.arange(1000, 2500) % 3
        )


def test_read_selection_any_order(tmp_path: Path) -> None:
    path = _big_file(tmp_path, 5000, batch=500)
    sel = np.random.default_rng(0).choice(5000, size=300, replace=False)
    sel = np.concatenate([sel, sel[:5]])  # duplicates too
    with open_cams(path) as f:
        full = f.read("cams/gradcam/layer4")
        np.testing.assert_array_equal(f.read("cams/gradcam/layer4", sel, chunk=256), full[sel])
        np.testing.assert_array_equal(f.read("samples/path", sel), np.array([f"img/{i}.png" for i in sel]))
        np.testing.assert_array_equal(f.read("samples/index", slice(4990, None, 3)), np.arange(4990, 5000, 3))
        assert f.read("samples/index", []).shape == (0,)


def test_big_config_round_trips_through_meta_config(tmp_path: Path) -> None:
    config = {"name": "demo", "notes": "x" * 70_000}
    path = write_part(tmp_path, make_run(config=config), 0, 8)
    with h5py.File(path, "r") as h:
        assert "config_json" not in h.attrs and "meta/config" in h
    with open_cams(path) as f:
        assert f.config == config
