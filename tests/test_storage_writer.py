"""PartWriter: round trip, layout on disk, atomic completion, thread errors, resume and refusal."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_storage_common import (
    LAYERS,
    METHODS,
    assert_same_content,
    make_batch,
    make_run,
    wait_committed,
    write_part,
)

from cnncam.errors import SchemaError
from cnncam.storage import PartSpec, PartWriter, open_cams
from cnncam.storage import schema as S
from cnncam.storage.recover import commit_path, partial_path, read_commit


def test_round_trip_every_field(tmp_path: Path) -> None:
    run = make_run()
    path = write_part(tmp_path, run, 10, 31, shard=1, num_shards=3)
    whole = make_batch(run, 10, 31)
    with open_cams(path) as f:
        assert (f.kind, f.n_items, f.methods, f.layers) == ("part", 21, list(METHODS), list(LAYERS))
        assert f.class_names == ["cat", "dog", "fish"] and f.fingerprint == run.fingerprint()
        a = f.attrs
        assert (a["shard_index"], a["num_shards"], a["index_start"], a["index_stop"]) == (1, 3, 10, 31)
        assert a["complete"] is True and a["git_dirty"] is False and a["input_size"] == [32, 32]
        assert a["normalization"] == run.normalization and a["targets"] == "topk:2" and a["split"] == "test"
        assert f.config == run.config and a["versions"]["numpy"] == np.__version__
        assert f.read("samples/path").tolist() == list(whole.path)
        for name in ("index", "label", "pred", "logits", "targets", "boxes"):
            np.testing.assert_array_equal(f.read(f"samples/{name}"), getattr(whole, name), err_msg=name)
        for (m, layer), cam in whole.cams.items():
            got = f.read(f.cam_name(m, layer))
            assert got.dtype == np.float16
            np.testing.assert_allclose(got, cam, atol=5e-4)  # float16 of values in [0, 1]
            np.testing.assert_array_equal(f.read(S.upsampled_path(m, layer)), whole.upsampled[(m, layer)])
            for name, values in whole.metrics[(m, layer)].items():
                np.testing.assert_array_equal(f.read(S.metric_path(m, layer, name)), values)


def test_layout_dtypes_compression_and_chunks(tmp_path: Path) -> None:
    path = write_part(tmp_path, make_run(), 0, 20, batch_size=8)
    with h5py.File(path, "r") as f:
        for name, d in [
            (n, f[n])
            for n in (
                "samples/index",
                "samples/path",
                "cams/gradcam/features",
                "upsampled/gradcam/features",
                "metrics/gradcam/features/pointing_hit",
            )
        ]:
            assert d.dtype == S.dtype_for(name), name
            assert (d.compression, d.compression_opts, d.shuffle, d.fletcher32) == ("gzip", 4, True, True), (
                name
            )
            assert d.chunks[0] == 8 and d.maxshape[0] is None and d.shape[0] == 20, name
        assert f["samples/path"].id.get_type().get_strpad() == h5py.h5t.STR_NULLTERM
        assert np.isnan(f["cams/gradcam/features"].fillvalue)
        assert f.attrs["n_committed"] == 20 and f.attrs["commit_rows"] == 8


def test_final_name_appears_only_when_complete(tmp_path: Path) -> None:
    run = make_run()
    spec = PartSpec(run, 0, 1, 0, 24)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    for a in (0, 8, 16):
        assert (
            not w.path.exists() and w.partial.exists() and w.partial.name == "part-00000-of-00001.h5.partial"
        )
        w.put(make_batch(run, a, a + 8))
    assert w.close() == w.path == tmp_path / "part-00000-of-00001.h5"
    assert w.path.exists() and not w.partial.exists() and not w.commit.exists()


def test_writer_thread_error_surfaces_in_producer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run()
    calls = []

    def broken(self: PartWriter, kind: str, rows: dict[str, np.ndarray]) -> None:
        calls.append(threading.current_thread().name)
        raise OSError("disk quota exceeded")

    w = PartWriter.open_or_resume(tmp_path, PartSpec(run, 0, 1, 0, 400), batch_size=8, queue_size=1)
    monkeypatch.setattr(PartWriter, "_write", broken)
    with pytest.raises(OSError, match="disk quota exceeded"):
        for a in range(0, 400, 8):  # never hangs on the full queue: the error comes back instead
            w.put(make_batch(run, a, a + 8, extras=False))
    assert calls and calls[0].startswith("cnncam-h5-")
    with pytest.raises(OSError, match="disk quota exceeded"):
        w.close()  # still not swallowed
    assert w.partial.exists() and not w.path.exists()
    assert (read_commit(w.commit) or {}).get("n_committed") == 0


def test_producer_exception_keeps_partial_for_resume(tmp_path: Path) -> None:
    run = make_run()
    spec = PartSpec(run, 2, 3, 30, 50)
    with pytest.raises(RuntimeError, match="GPU fell over"):
        with PartWriter.open_or_resume(tmp_path, spec, batch_size=8) as w:
            w.put(make_batch(run, 30, 38))
            w.put(make_batch(run, 38, 46))
            wait_committed(w, 16)
            raise RuntimeError("GPU fell over")
    assert w.partial.exists() and not w.path.exists()
    assert (read_commit(w.commit) or {}).get("n_committed") == 16
    w2 = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    assert (w2.state.status, w2.state.next_index, w2.state.n_committed) == ("resumed", 46, 16)
    w2.put(make_batch(run, 46, 50))
    w2.close()
    assert_same_content(w2.path, write_part(tmp_path / "ref", run, 30, 50, 2, 3))


def test_close_before_all_items_keeps_partial(tmp_path: Path) -> None:
    run = make_run()
    w = PartWriter.open_or_resume(tmp_path, PartSpec(run, 0, 1, 0, 20), batch_size=8)
    w.put(make_batch(run, 0, 8))
    with pytest.raises(SchemaError, match=r"only items \[0, 8\) of \[0, 20\)"):
        w.close()
    assert w.partial.exists() and not w.path.exists()
    with pytest.raises(SchemaError, match="incomplete part"):
        open_cams(w.partial)


def test_batches_must_match_and_continue(tmp_path: Path) -> None:
    run = make_run()
    w = PartWriter.open_or_resume(tmp_path, PartSpec(run, 0, 1, 0, 40), batch_size=8)
    w.put(make_batch(run, 0, 8))
    with pytest.raises(SchemaError, match="must continue at 8"):
        w.put(make_batch(run, 16, 24))
    with pytest.raises(
        SchemaError, match=r"this batch lacks datasets \[.*'samples/boxes'.* compared with the first batch of"
    ):
        w.put(make_batch(run, 8, 16, extras=False))
    with pytest.raises(SchemaError, match="batch_size=8"):
        w.put(make_batch(run, 8, 12))
    other = make_batch(run, 8, 16)
    other.logits = np.zeros((8, 5), np.float32)
    with pytest.raises(SchemaError, match=r"samples/logits: \(5,\) float32 vs \(3,\) float32"):
        w.put(other)
    bad_layer = make_batch(make_run(layers=("layer3",)), 8, 16)
    with pytest.raises(SchemaError, match="unknown layer for this run 'layer3'"):
        w.put(bad_layer)
    w.abort()


def test_foreign_fingerprint_is_refused(tmp_path: Path) -> None:
    run, other = make_run(), make_run(checkpoint_sha256="ef" * 32)
    spec = PartSpec(run, 0, 1, 0, 16)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    w.put(make_batch(run, 0, 8))
    wait_committed(w, 8)
    w.abort()
    before = w.partial.read_bytes()
    with pytest.raises(SchemaError) as err:
        PartWriter.open_or_resume(tmp_path, PartSpec(other, 0, 1, 0, 16), batch_size=8)
    msg = str(err.value)
    assert str(w.partial) in msg and run.fingerprint() in msg and other.fingerprint() in msg
    assert w.partial.read_bytes() == before
    final = write_part(tmp_path / "done", run, 0, 16)
    with pytest.raises(SchemaError, match=f"{final}.*{run.fingerprint()}.*{other.fingerprint()}"):
        PartWriter.open_or_resume(tmp_path / "done", PartSpec(other, 0, 1, 0, 16), batch_size=8)


def test_completed_part_is_a_no_op(tmp_path: Path) -> None:
    run = make_run()
    final = write_part(tmp_path, run, 0, 16)
    before, mtime = final.read_bytes(), final.stat().st_mtime_ns
    w = PartWriter.open_or_resume(tmp_path, PartSpec(run, 0, 1, 0, 16), batch_size=8)
    assert w.state.done and w.state.next_index == 16 and w.close() == final
    with pytest.raises(SchemaError, match="already complete"):
        w.put(make_batch(run, 0, 8))
    assert final.read_bytes() == before and final.stat().st_mtime_ns == mtime
    assert not partial_path(final).exists()


@pytest.mark.parametrize("damage", ["header", "committed_chunk", "commit_record"])
def test_corrupt_partial_restarts_from_zero(tmp_path: Path, damage: str) -> None:
    run = make_run()
    spec = PartSpec(run, 0, 1, 0, 24)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    w.put(make_batch(run, 0, 8))
    w.put(make_batch(run, 8, 16))
    wait_committed(w, 16)
    w.abort()
    if damage == "header":
        with open(w.partial, "r+b") as fh:
            fh.write(b"\xff" * 512)
    elif damage == "committed_chunk":  # fletcher32 must catch a flipped byte in committed data
        with h5py.File(w.partial, "r") as f:
            info = f["cams/gradcam/features"].id.get_chunk_info(0)
        with open(w.partial, "r+b") as fh:
            fh.seek(info.byte_offset + info.size // 2)
            fh.write(b"\x5a\xa5\x5a\xa5")
    else:
        commit_path(w.path).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="starting this part over"):
        w2 = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    assert (w2.state.status, w2.state.next_index) == ("restarted", 0)
    for a in (0, 8, 16):
        w2.put(make_batch(run, a, a + 8))
    w2.close()
    assert_same_content(w2.path, write_part(tmp_path / "ref", run, 0, 24))


def test_extras_round_trip_and_survive_resume(tmp_path: Path) -> None:
    run = make_run()
    spec = PartSpec(run, 0, 1, 100, 116)
    acts = np.random.default_rng(0).random((3, 5, 4, 4)).astype(np.float32)
    filters = np.random.default_rng(1).random((6, 3, 3, 3)).astype(np.float32)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    w.put_extras(
        activations={"layer4.1.conv2": acts}, activation_index=np.arange(100, 103), first_conv=filters
    )
    with pytest.raises(SchemaError, match="already written"):
        w.put_extras(first_conv=filters)
    w.put(make_batch(run, 100, 108))
    wait_committed(w, 8)
    w.abort()
    w2 = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    assert set(w2.state.extras) == {"activations/index", "activations/layer4.1.conv2", "filters/first_conv"}
    with pytest.raises(SchemaError, match="range"):
        w2.put_extras(activations={"features": acts}, activation_index=np.arange(3))
    w2.put(make_batch(run, 108, 116))
    with open_cams(w2.close()) as f:
        got, idx = f.activations("layer4.1.conv2")
        assert got.dtype == np.float16 and idx.tolist() == [100, 101, 102]
        np.testing.assert_allclose(got, acts, atol=1e-3)
        np.testing.assert_array_equal(f.filters(), filters)
        assert f.activation_layers() == ["layer4.1.conv2"]


def test_empty_part_completes(tmp_path: Path) -> None:
    w = PartWriter.open_or_resume(tmp_path, PartSpec(make_run(), 3, 4, 7, 7), batch_size=8)
    with open_cams(w.close()) as f:
        assert f.n_items == 0 and f.datasets() == [] and list(f.iter_rows(["samples/index"])) == []


def test_killed_after_last_commit_only_needs_close(tmp_path: Path) -> None:
    run = make_run()
    spec = PartSpec(run, 0, 1, 0, 20)
    w = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    for a in (0, 8, 16):
        w.put(make_batch(run, a, min(a + 8, 20)))
    wait_committed(w, 20)
    w.abort()  # every row committed, never renamed
    w2 = PartWriter.open_or_resume(tmp_path, spec, batch_size=8)
    assert (w2.state.status, w2.state.next_index) == ("resumed", 20)
    assert_same_content(w2.close(), write_part(tmp_path / "ref", run, 0, 20))
    commit_path(w2.path).write_text("{}")  # stale record left by a kill right after the rename
    assert PartWriter.open_or_resume(tmp_path, spec, batch_size=8).state.done
    assert not commit_path(w2.path).exists()
