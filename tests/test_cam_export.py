"""CAM export on a tiny trained run: sharding, stored values, no-op reruns, refusals, optional data."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cam_export_common import (
    assert_same_arrays,
    assert_same_part,
    datasets,
    direct_model,
    root_attrs,
    split_images,
    train_tiny_run,
    with_cam,
)
from train_helpers import StopAfter

from cnncam.cam import compute_cams, pointing_game, upsample
from cnncam.cam.export import export, export_shard, merge
from cnncam.config import RunConfig, load_config
from cnncam.errors import CamError, CheckpointError, ConfigError, SchemaError
from cnncam.storage import open_cams, part_filename
from cnncam.storage import schema as S


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return train_tiny_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def one_and_three(run: RunConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The test split exported as 1 shard and as 3 shards + merge (gradcam and gradcam_pp)."""
    out = tmp_path_factory.mktemp("one_and_three")
    kw = {"methods": ("gradcam", "gradcam_pp")}
    return export(with_cam(run, out / "one", **kw)), export(with_cam(run, out / "three", **kw), num_shards=3)


def _split(cfg: RunConfig, split: str = "test") -> list[tuple[str, int]]:
    with open(cfg.run_dir / "splits" / f"{split}.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(p, int(label)) for p, label in rows]


def test_one_shard_and_three_shards_give_identical_datasets(
    run: RunConfig, one_and_three: tuple[Path, Path]
) -> None:
    one, three = one_and_three
    a, b = datasets(one), datasets(three)
    per_item = sorted(k for k in a if S.is_per_item(k))
    assert per_item == sorted(k for k in b if S.is_per_item(k))
    assert_same_arrays(a, b, per_item)
    split = _split(run)
    n = len(split)
    assert root_attrs(one)["n_items"] == root_attrs(three)["n_items"] == n
    np.testing.assert_array_equal(a["samples/index"], np.arange(n))  # every item once, in order
    assert [p.decode() for p in a["samples/path"]] == [p for p, _ in split]
    np.testing.assert_array_equal(a["samples/label"], [label for _, label in split])
    assert a["cams/gradcam/features"].shape == (n, 1, 8, 8)
    assert np.isfinite(a["cams/gradcam/features"]).all() and (a["cams/gradcam/features"] >= 0).all()
    assert root_attrs(one)["fingerprint"] == root_attrs(three)["fingerprint"]
    assert root_attrs(three)["parts"] == [part_filename(i, 3) for i in range(3)]


def test_stored_values_equal_direct_forward_and_compute_cams(
    run: RunConfig, one_and_three: tuple[Path, Path]
) -> None:
    model, meta = direct_model(run)
    with open_cams(one_and_three[1]) as cams:
        paths = cams.read("samples/path")
        logits, pred = cams.read("samples/logits"), cams.read("samples/pred")
        targets = cams.read("samples/targets")
        stored = cams.read(cams.cam_name("gradcam", "features")).astype(np.float32)
        assert cams.attrs["checkpoint_path"] == "checkpoints/best.pt"
        assert cams.attrs["input_size"] == [32, 32] and cams.attrs["layers"] == ["features"]
    images = split_images(run, list(paths), meta)
    with torch.no_grad():
        direct = model(images)
    np.testing.assert_allclose(logits, direct.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pred, direct.argmax(1).numpy())
    np.testing.assert_array_equal(targets[:, 0], pred)  # targets=pred
    ref = compute_cams(model, images, ("gradcam",), ("auto",), "pred").maps[("gradcam", "features")].numpy()
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(stored, ref, rtol=2e-3, atol=2e-3 * scale)  # stored as float16


def test_checkpoint_hash_and_choice(run: RunConfig, tmp_path: Path) -> None:
    best = export_shard(with_cam(run, tmp_path / "best"))
    last = export_shard(with_cam(run, tmp_path / "last", checkpoint="last"))
    by_path = export_shard(
        with_cam(run, tmp_path / "path", checkpoint=str(run.run_dir / "checkpoints" / "last.pt"))
    )
    digest = hashlib.sha256((run.run_dir / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    assert root_attrs(last)["checkpoint_sha256"] == root_attrs(by_path)["checkpoint_sha256"] == digest
    assert root_attrs(best)["checkpoint_sha256"] != digest  # best.pt holds no optimizer state
    with pytest.raises(CheckpointError, match="Valid choices: best, last"):
        export_shard(with_cam(run, tmp_path / "bad", checkpoint=str(tmp_path / "nope.pt")))
    torn = tmp_path / "torn.pt"
    torn.write_bytes((run.run_dir / "checkpoints" / "best.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        export_shard(with_cam(run, tmp_path / "bad", checkpoint=str(torn)))
    assert not (tmp_path / "bad").exists()


def test_rerun_of_a_complete_shard_is_a_no_op(run: RunConfig, tmp_path: Path) -> None:
    cfg = with_cam(run, tmp_path)
    path = export_shard(cfg, 1, 2)
    assert path.name == part_filename(1, 2) and path.exists()
    before = (path.stat().st_mtime_ns, path.read_bytes())
    assert export_shard(cfg, 1, 2) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_part_from_another_config_is_refused(run: RunConfig, tmp_path: Path) -> None:
    export_shard(with_cam(run, tmp_path), 0, 2)
    final = tmp_path / part_filename(0, 2)
    before = final.read_bytes()
    with pytest.raises(SchemaError, match="belongs to another run/config"):
        export_shard(with_cam(run, tmp_path, methods=("gradcam", "layercam")), 0, 2)
    assert final.read_bytes() == before  # left untouched


def test_merge_names_every_missing_or_partial_part(run: RunConfig, tmp_path: Path) -> None:
    cfg = with_cam(run, tmp_path)
    export_shard(cfg, 0, 4)
    export_shard(cfg, 2, 4)

    assert export_shard(cfg, 3, 4, StopAfter(0)).name == part_filename(3, 4) + ".partial"
    with pytest.raises(SchemaError) as info:
        merge(cfg, 4)
    msg = str(info.value)
    assert "2 of 4 parts are not complete" in msg
    assert f"{part_filename(1, 4)} (missing)" in msg and f"{part_filename(3, 4)} (partial" in msg
    assert not (tmp_path / "cams.h5").exists()


def test_stop_flag_leaves_a_resumable_partial(run: RunConfig, tmp_path: Path) -> None:
    """Stopped before the first batch (abort may drop the queued activations) and after two
    batches: each rerun recomputes what was lost and equals an uninterrupted export."""
    kw = {"activations": ("features.block1",), "activation_images": 5, "activation_channels": 3}

    for polls in (0, 2):
        cfg = with_cam(run, tmp_path / f"stopped{polls}", **kw)
        partial = export_shard(cfg, stop=StopAfter(polls))
        assert partial.name.endswith(".partial") and partial.exists()
        final = export_shard(cfg)
        assert final.name == part_filename(0, 1) and not partial.exists()
    reference = export_shard(with_cam(run, tmp_path / "ref", **kw))
    for polls in (0, 2):
        assert_same_part(tmp_path / f"stopped{polls}" / part_filename(0, 1), reference)


def test_metrics_activations_upsampled_only_when_asked(run: RunConfig, tmp_path: Path) -> None:
    plain = datasets(export_shard(with_cam(run, tmp_path / "plain"), 0, 2))
    assert not [k for k in plain if k.split("/")[0] in ("metrics", "activations", "filters", "upsampled")]
    assert plain["samples/boxes"].shape == (len(plain["samples/index"]), 4)  # boxes.json exists
    assert np.isfinite(plain["samples/boxes"]).all()
    cfg = with_cam(
        run,
        tmp_path / "rich",
        metrics=True,
        metric_steps=4,
        upsampled=True,
        activations=("features.block1.conv1", "features"),
        activation_images=2,
        activation_channels=5,
    )
    path = export(cfg, num_shards=2)
    rich = datasets(path)
    n = len(rich["samples/index"])
    for name in ("deletion_auc", "insertion_auc", "energy_in_box"):
        values = rich[f"metrics/gradcam/features/{name}"]
        assert (
            values.shape == (n,) and np.isfinite(values).all() and (0 <= values).all() and (values <= 1).all()
        )
    hits = rich["metrics/gradcam/features/pointing_hit"]
    assert hits.dtype == np.int8 and set(np.unique(hits)) <= {0, 1}  # every test image has a box
    up = rich["upsampled/gradcam/features"]
    assert up.shape == (n, 1, 32, 32) and up.dtype == np.uint8 and (up.reshape(n, -1).max(1) == 255).all()
    starts = [S.shard_range(n, i, 2)[0] for i in range(2)]
    np.testing.assert_array_equal(rich["activations/index"], [s + j for s in starts for j in range(2)])
    assert rich["activations/features.block1.conv1"].shape == (4, 5, 32, 32)
    assert rich["activations/features"].shape == (4, 5, 8, 8)
    assert rich["filters/first_conv"].shape == (8, 3, 3, 3)
    model, _ = direct_model(run)
    weight = dict(model.named_parameters())["features.block1.conv1.weight"]
    np.testing.assert_array_equal(rich["filters/first_conv"], weight.detach().numpy())
    # Pointing game recomputed from the stored boxes and upsampled raw maps.
    maps = torch.from_numpy(rich["cams/gradcam/features"].astype(np.float32))
    hit = pointing_game(upsample(maps[:, 0], 32), torch.from_numpy(rich["samples/boxes"]))
    np.testing.assert_array_equal(hit.numpy().astype(np.int8), hits)


def test_no_boxes_file_gives_nan_boxes_and_no_box_metrics(run: RunConfig, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(run.data.root, data)
    (data / "boxes.json").unlink()
    cfg = with_cam(run, tmp_path / "cams", metrics=True, metric_steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data)))
    got = datasets(export_shard(cfg))
    assert np.isnan(got["samples/boxes"]).all()
    assert "metrics/gradcam/features/deletion_auc" in got
    assert (
        "metrics/gradcam/features/pointing_hit" not in got
        and "metrics/gradcam/features/energy_in_box" not in got
    )


def test_unknown_layer_method_targets_name_the_choices(run: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(CamError, match=r"unknown layer 'featurez'; did you mean 'features'\?"):
        export_shard(with_cam(run, tmp_path, layers=("featurez",)))
    with pytest.raises(CamError, match="Valid choices"):
        export_shard(with_cam(run, tmp_path, activations=("nope",)))
    with pytest.raises(ConfigError, match="did you mean 'gradcam_pp'"):
        load_config(run.run_dir / "config.yaml", ["cam.methods=[gradcam_pp2]"])
    with pytest.raises(ConfigError, match="Valid choices: pred, label, all"):
        load_config(run.run_dir / "config.yaml", ["cam.targets=best"])
    assert not list(tmp_path.glob("*.h5*"))  # refused before any file was created


def test_targets_all_stores_one_map_per_class(run: RunConfig, tmp_path: Path) -> None:
    got = datasets(export_shard(with_cam(run, tmp_path, targets="all", split="val")))
    n = len(_split(run, "val"))
    assert got["cams/gradcam/features"].shape == (n, 3, 8, 8)
    np.testing.assert_array_equal(got["samples/targets"], np.tile(np.arange(3), (n, 1)))


def test_h5ls_reads_the_merged_file(one_and_three: tuple[Path, Path]) -> None:
    h5ls = shutil.which("h5ls")
    if h5ls is None:
        if os.environ.get("CI") == "true":
            pytest.fail("h5ls (Debian hdf5-tools) must be installed on CI")
        pytest.skip("h5ls not installed (apt-get install hdf5-tools)")
    merged = one_and_three[1]
    out = subprocess.run(
        [h5ls, "-r", merged.name], cwd=merged.parent, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    n = root_attrs(merged)["n_items"]
    lines = {" ".join(line.split()) for line in out.splitlines()}
    assert f"/cams/gradcam/features Dataset {{{n}, 1, 8, 8}}" in lines
    assert f"/cams/gradcam_pp/features Dataset {{{n}, 1, 8, 8}}" in lines
    assert f"/samples/path Dataset {{{n}}}" in lines
    h5dump = shutil.which("h5dump")
    if h5dump is not None:  # reads through the virtual dataset into the three parts
        dump = subprocess.run(
            [h5dump, "-d", "/samples/index", "-w", "0", merged.name],
            cwd=merged.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "(0): " + ", ".join(str(i) for i in range(n)) in dump


def test_loader_workers_give_the_same_part(run: RunConfig, tmp_path: Path) -> None:
    """DataLoader workers each hold a copy of the dataset (the size recorder behind the boxes too)."""
    kw = {"metrics": True, "metric_steps": 2}
    serial = export_shard(with_cam(run, tmp_path / "serial", num_workers=0, **kw))
    parallel = export_shard(with_cam(run, tmp_path / "parallel", num_workers=2, **kw))
    assert_same_part(serial, parallel)  # cam.num_workers is not part of the fingerprint
    assert np.isfinite(datasets(parallel)["samples/boxes"]).all()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_the_export_runs_on_the_configured_device(
    run: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """train.device is the run's one device key: `cpu` keeps the export on the CPU even where a GPU
    is visible (the CUDA-vs-CPU comparison of tests/test_gpu.py relies on it)."""
    import cnncam.cam.export as E

    asked: list[str] = []
    real = E.select_device
    monkeypatch.setattr(
        E, "select_device", lambda requested, dist: asked.append(requested) or real("cpu", dist)
    )
    cfg = dataclasses.replace(run, train=dataclasses.replace(run.train, device=device))
    export_shard(with_cam(cfg, tmp_path / "cams"))
    assert asked == [device]
