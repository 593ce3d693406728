"""The schema module: names, dtypes, chunking, fingerprint, batch conversion."""

from __future__ import annotations

import numpy as np
import pytest
from test_storage_common import make_batch, make_run

from cnncam.errors import SchemaError
from cnncam.storage import batch as B
from cnncam.storage import schema as S


def test_paths_and_name_validation() -> None:
    assert S.cam_path("gradcam_pp", "layer4.1.conv2") == "cams/gradcam_pp/layer4.1.conv2"
    assert S.upsampled_path("gradcam", "features.28") == "upsampled/gradcam/features.28"
    assert S.metric_path("gradcam", "l", "pointing_hit") == "metrics/gradcam/l/pointing_hit"
    assert S.activation_path("layer4") == "activations/layer4"
    assert S.sample_path("logits") == "samples/logits"
    with pytest.raises(SchemaError, match="must not contain '/'"):
        S.cam_path("gradcam", "layer4/conv")
    with pytest.raises(SchemaError, match="did you mean 'gradcam_pp'.*Valid choices"):
        S.cam_path("gradcam_p", "layer4")
    with pytest.raises(SchemaError, match="unknown metric"):
        S.metric_path("gradcam", "l", "auc")
    with pytest.raises(SchemaError, match="collides"):
        S.activation_path("index")
    with pytest.raises(SchemaError, match="non-empty"):
        S.validate_name("layer", "")
    with pytest.raises(SchemaError, match="must not contain"):
        make_run(layers=("a/b",))


@pytest.mark.parametrize("n_total", [0, 1, 7, 100])
@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_shard_ranges_tile_the_split(n_total: int, num_shards: int) -> None:
    ranges = [S.shard_range(n_total, i, num_shards) for i in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(SchemaError):
        S.shard_range(n_total, num_shards, num_shards)


def test_chunk_rows_divide_the_commit_size() -> None:
    assert S.chunk_rows(64, 2 * 7 * 7) == 64  # small maps: one chunk per batch
    rows = S.chunk_rows(64, 224 * 224)  # upsampled uint8 maps: ~1 MiB chunks
    assert 64 % rows == 0 and rows * 224 * 224 <= S.CHUNK_TARGET_BYTES < 2 * rows * 224 * 224
    assert S.chunk_rows(6, 10 << 20) == 1
    kw = S.dataset_kwargs("cams/gradcam/l", (1, 7, 7), 0, 64)
    assert kw["maxshape"] == (None, 1, 7, 7) and kw["chunks"] == (64, 1, 7, 7)
    assert kw["compression"] == "gzip" and kw["shuffle"] and kw["fletcher32"]


def test_dtypes_and_fill_values() -> None:
    assert S.dtype_for("cams/gradcam/l") == np.float16
    assert S.dtype_for("upsampled/gradcam/l") == np.uint8
    assert S.dtype_for("samples/index") == np.int64
    assert S.dtype_for("samples/logits") == np.float32
    assert S.dtype_for("metrics/gradcam/l/pointing_hit") == np.int8
    assert np.isnan(S.fill_for("cams/gradcam/l")) and S.fill_for("samples/label") == -1
    assert S.fill_for("metrics/gradcam/l/pointing_hit") == -128  # -1 means "no box"
    with pytest.raises(SchemaError, match="not a dataset"):
        S.dtype_for("extra/thing")


def test_fingerprint_tracks_content_not_scheduling() -> None:
    base = make_run()
    fp = base.fingerprint()
    assert fp == make_run().fingerprint() and len(fp) == 32
    same = {
        "config": {**base.config, "slurm": {"time_min": 600}, "cam": {"batch_size": 8, "num_workers": 9}},
        "slurm": {"slurm_job_id": "77"},
        "git_dirty": True,
        "versions": {"numpy": "0"},
    }
    for key, value in same.items():
        assert make_run(**{key: value}).fingerprint() == fp, key
    different = {
        "checkpoint_sha256": "ff" * 32,
        "split": "val",
        "split_sha256": "00",
        "run_name": "other",
        "config": {**base.config, "cam": {"batch_size": 16, "num_workers": 2}},
        "targets": "pred",
        "class_names": ("dog", "cat", "fish"),
    }
    for key, value in different.items():
        assert make_run(**{key: value}).fingerprint() != fp, key


def test_run_attrs_move_big_config_to_a_dataset() -> None:
    attrs, big = S.run_attrs(make_run())
    assert big is None and S.decode_attrs(attrs)["config_json"]["name"] == "demo"
    attrs, big = S.run_attrs(make_run(config={"notes": "x" * 70_000}))
    assert "config_json" not in attrs and big is not None and len(big) > 70_000


def test_batch_rows_convert_to_schema_dtypes() -> None:
    run = make_run()
    batch = make_batch(run, 5, 9)
    rows = batch.rows()
    cam = rows["cams/gradcam/features"]
    assert cam.dtype == np.float16 and cam.shape == (4, 2, 4, 4)
    np.testing.assert_allclose(cam, batch.cams[("gradcam", "features")], atol=1e-3)
    assert rows["samples/path"][0].decode() == "class_2/Bild_00005_é.png"
    assert rows["metrics/gradcam/features/pointing_hit"].dtype == np.int8
    assert rows["samples/boxes"].shape == (4, 4) and rows["samples/index"].tolist() == [5, 6, 7, 8]
    # a copy: the producer may reuse its buffers after put()
    batch.cams[("gradcam", "features")][:] = 0
    assert cam.max() > 0


def test_conversion_refuses_lossy_or_misshaped_input() -> None:
    with pytest.raises(SchemaError, match="integers"):
        B.convert("samples/label", np.array([0.5, 1.0]))
    with pytest.raises(SchemaError, match="uint8"):
        B.convert("upsampled/gradcam/l", np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(SchemaError, match="4 dimensions"):
        B.convert("cams/gradcam/l", np.zeros((2, 7, 7), np.float32))
    with pytest.raises(SchemaError, match=r"\(B, 4\)"):
        B.convert("samples/boxes", np.zeros((2, 3), np.float32))
    with pytest.raises(SchemaError, match="outside the range"):
        B.convert("metrics/gradcam/l/pointing_hit", np.array([300]))
    with pytest.raises(SchemaError, match="at most 511"):
        B.convert("samples/path", ["x" * 600])
    with pytest.raises(SchemaError, match="not a per-item dataset path"):
        B.convert_rows({"cams/gradcam": np.zeros((1, 1, 2, 2))})
    with pytest.warns(RuntimeWarning, match="beyond float16's range"):
        out = B.convert("cams/gradcam/l", np.full((1, 1, 1, 1), 1e6, np.float32))
    assert np.isinf(out).all()
