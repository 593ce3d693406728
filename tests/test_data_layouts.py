"""CSV manifests and WebDataset tar shards: the same images as a class folder give the same split,
the same trained weights, predictions and maps; bad images are skipped the same way."""

from __future__ import annotations

import csv
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import tiny_config, tiny_dataset

from cnncam.cam.export import export
from cnncam.config import RunConfig
from cnncam.data import BadImageWarning, discover, load_rgb
from cnncam.data.webdataset import shard_index, split_key, tar_aligned_range
from cnncam.errors import DataError
from cnncam.storage import open_cams
from cnncam.train import run_training


def _images(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def write_manifest(
    folder: Path, path: Path, labels: str = "names", split: dict[str, str] | None = None
) -> None:
    """A manifest of ``folder``'s images at ``path`` (paths relative to the CSV's folder)."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", *(["split"] if split else [])])
        for rel in _images(folder):
            cls = rel.split("/")[0]
            label = cls if labels == "names" else str(classes.index(cls))
            image = Path(os.path.relpath(folder / rel, path.parent)).as_posix()
            w.writerow([image, label, *([split[rel]] if split else [])])


def write_shards(folder: Path, out: Path, per_shard: int = 12) -> None:
    """WebDataset shards of ``folder``'s images in sorted order: key = path without extension."""
    out.mkdir(parents=True, exist_ok=True)
    files = _images(folder)
    for s in range(0, len(files), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for rel in files[s : s + per_shard]:
                key = rel.rsplit(".", 1)[0]
                _add(tar, f"{key}.png", (folder / rel).read_bytes())
                _add(tar, f"{key}.cls", rel.split("/")[0].encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _identity(sample: str) -> str:
    """A sample path in any layout -> the image's path in the class folder."""
    return sample.split(".tar/", 1)[1] + ".png" if ".tar/" in sample else sample


def _layout_cfg(tmp: Path, data: Path, name: str, *extra: str) -> RunConfig:
    return tiny_config(tmp, data, "train.epochs=1", "data.augment=basic", *extra, name=name)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunConfig]:
    tmp = tmp_path_factory.mktemp("layouts")
    folder = tiny_dataset(tmp / "shapes", per_class=10)
    write_manifest(folder, folder / "manifest.csv")
    write_shards(folder, tmp / "shards", per_shard=5)  # 6 shards, each of one class
    return {
        "folder": _layout_cfg(tmp, folder, "folder"),
        "csv": _layout_cfg(tmp, folder, "csv", "data.format=csv", "data.manifest=manifest.csv"),
        "webdataset": _layout_cfg(tmp, tmp / "shards", "wds", "data.format=webdataset"),
    }


def test_same_split_in_every_layout(layouts: dict[str, RunConfig]) -> None:
    found = {k: discover(cfg.data, seed=3) for k, cfg in layouts.items()}
    ref = found["folder"]
    assert sum(len(v) for v in ref.splits.values()) == 30 and all(ref.splits.values())
    for kind, index in found.items():
        assert index.classes == ref.classes == ["circle", "square", "triangle"], kind
        for split, samples in index.splits.items():
            assert [(_identity(p), y) for p, y in samples] == ref.splits[split], (kind, split)
    assert found["webdataset"].splits["test"][0][0].startswith("shard-00")


def test_tar_members_load_like_files(layouts: dict[str, RunConfig]) -> None:
    root = Path(layouts["webdataset"].data.root)
    folder = Path(layouts["folder"].data.root)
    a = np.asarray(load_rgb(root / "shard-002.tar/square/square_00003", 10**8))
    b = np.asarray(load_rgb(folder / "square/square_00003.png", 10**8))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert split_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert len(shard_index(root / "shard-000.tar").samples) == 5


def _decoded(paths: np.ndarray) -> list[str]:
    return [p.decode() if isinstance(p, bytes) else str(p) for p in paths]


def test_same_training_predictions_and_maps(layouts: dict[str, RunConfig]) -> None:
    states, exported = {}, {}
    for kind, cfg in layouts.items():
        run_training(cfg)
        states[kind] = torch.load(cfg.run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
        with open_cams(export(cfg, num_shards=2)) as cams:
            paths = [_identity(p) for p in _decoded(cams.read("samples/path"))]
            maps = cams.read(f"cams/gradcam/{cams.layers[0]}")
            exported[kind] = {p: (int(y), m) for p, y, m in zip(paths, cams.read("samples/pred"), maps)}
    for kind in ("csv", "webdataset"):
        assert states[kind].keys() == states["folder"].keys()
        assert all(torch.equal(states[kind][k], states["folder"][k]) for k in states[kind]), kind
        assert exported[kind].keys() == exported["folder"].keys()
        for path, (pred, cam) in exported[kind].items():
            assert pred == exported["folder"][path][0] and np.array_equal(cam, exported["folder"][path][1])
    assert max(float(m.max()) for _, m in exported["folder"].values()) > 0
    # WebDataset: each of the 2 array tasks read whole tar files
    parts = sorted((layouts["webdataset"].run_dir / "cams").glob("part-*.h5"))
    tars = []
    for part in parts:
        with open_cams(part) as cams:
            tars.append({p.split(".tar/")[0] for p in _decoded(cams.read("samples/path"))})
    assert len(parts) == 2 and not tars[0] & tars[1] and all(tars)


def test_tar_aligned_ranges() -> None:
    paths = (
        [f"a.tar/{i}" for i in range(5)] + [f"b.tar/{i}" for i in range(2)] + [f"c.tar/{i}" for i in range(5)]
    )
    assert [tar_aligned_range(paths, k, 2) for k in range(2)] == [(0, 5), (5, 12)]  # a tie: the lower cut
    assert [tar_aligned_range(paths, k, 3) for k in range(3)] == [(0, 5), (5, 7), (7, 12)]
    assert [tar_aligned_range(paths, k, 5) for k in range(5)] == [(0, 0), (0, 5), (5, 7), (7, 7), (7, 12)]
    assert tar_aligned_range(["x/1.png", "a.tar/1"], 0, 2) is None  # not all WebDataset samples
    assert tar_aligned_range(["a.tar/1", "b.tar/1", "a.tar/2"], 0, 2) is None  # a tar in two places


# ----------------------------------------------------------------------------------------------
# Manifest details and bad input


def test_manifest_ids_split_column_and_relative_paths(tmp_path: Path) -> None:
    folder = tiny_dataset(tmp_path / "data" / "shapes", per_class=4)
    split = {rel: ("test" if rel.endswith("1.png") else "train") for rel in _images(folder)}
    (tmp_path / "lists").mkdir()
    write_manifest(folder, tmp_path / "lists" / "labels.csv", labels="ids", split=split)
    cfg = _layout_cfg(
        tmp_path, tmp_path / "data", "m", "data.format=csv", "data.manifest=../lists/labels.csv"
    )
    index = discover(cfg.data, seed=0)
    assert index.classes == ["0", "1", "2"]  # ids without names
    tests = [f"shapes/{c}/{c}_00001.png" for c in ("circle", "square", "triangle")]
    assert [p for p, _ in index.splits["test"]] == tests
    assert not index.splits["val"] and len(index.splits["train"]) == 9


def test_bad_images_are_skipped_in_every_layout(tmp_path: Path) -> None:
    folder = tiny_dataset(tmp_path / "shapes", per_class=4)
    (folder / "circle" / "broken.png").write_bytes(b"not a png")
    write_manifest(folder, folder / "manifest.csv")
    with (folder / "manifest.csv").open("a") as f:
        f.write("circle/missing.png,circle\n")
    write_shards(folder, tmp_path / "shards", per_shard=20)
    with tarfile.open(tmp_path / "shards" / "shard-001.tar", "w") as tar:
        _add(tar, "extra/nolabel.png", (folder / "square/square_00001.png").read_bytes())
    csv_cfg = _layout_cfg(tmp_path, folder, "c", "data.format=csv")
    with pytest.warns(BadImageWarning, match="circle/broken.png"):
        skipped = discover(csv_cfg.data, 0).skipped
    assert {s["path"]: s["reason"][:14] for s in skipped} == {
        "circle/broken.png": "not an image (",
        "circle/missing.png": "cannot read fi",
    }
    wds_cfg = _layout_cfg(tmp_path, tmp_path / "shards", "w", "data.format=webdataset")
    with pytest.warns(BadImageWarning):
        skipped = discover(wds_cfg.data, 0).skipped
    assert [s["path"] for s in skipped] == ["shard-000.tar/circle/broken", "shard-001.tar/extra/nolabel"]
    assert "not an image" in skipped[0]["reason"] and ".cls label" in skipped[1]["reason"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,class\na.png,x\n", "must have a header with the columns path,label"),
        ("path,label,split\ncircle/circle_00001.png,circle,holdout\n", "split 'holdout' is not one of"),
        ("path,label\ncircle/circle_00001.png,circle\ncircle/circle_00001.png,circle\n", "listed twice"),
        ("path,label\ncircle/circle_00001.png,\n", "must not be empty"),
    ],
)
def test_bad_manifests_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    folder = tiny_dataset(tmp_path / "shapes", per_class=2)
    (folder / "manifest.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        discover(_layout_cfg(tmp_path, folder, "b", "data.format=csv").data, 0)


def test_not_a_tar_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="not a readable uncompressed tar"):
        discover(_layout_cfg(tmp_path, tmp_path / "shards", "t", "data.format=webdataset").data, 0)


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_export_only_detects_the_layout_and_gives_tasks_whole_tars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from cnncam.cli import main
    from cnncam.config import ModelConfig, load_config
    from cnncam.models import create_model
    from cnncam.runs import RunPaths

    folder = tiny_dataset(tmp_path / "shapes", per_class=10)
    write_manifest(folder, tmp_path / "labels.csv")
    write_shards(folder, tmp_path / "shards", per_shard=5)  # 6 tars of 5 images
    torch.save(create_model(ModelConfig(channels=(4, 8)), 3).state_dict(), tmp_path / "w.pt")
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    monkeypatch.chdir(tmp_path)
    data = "labels.csv" if kind == "csv" else "shards"
    argv = ["cam", "--model", "simple_cnn", "--weights", "w.pt", "--data", data, "--classes", "classes.txt"]
    argv += ["--name", kind, "--shards", "4", "--executor", "inline", "--set", "runs_dir=runs"]
    argv += ["--set", "model.channels=[4,8]", "--set", "data.image_size=32", "--set", "cam.num_workers=0"]
    assert main(argv) == 0
    cfg = load_config(RunPaths(tmp_path / "runs" / kind).config)
    assert cfg.data.format == kind and cfg.data.root == ("." if kind == "csv" else "shards")
    with open_cams(tmp_path / "runs" / kind / "cams" / "cams.h5") as cams:
        assert cams.n_items == 30
    if kind == "webdataset":
        tars = []
        for part in sorted((tmp_path / "runs" / kind / "cams").glob("part-*.h5")):
            with open_cams(part) as cams:
                tars.append([p.split(".tar/")[0] for p in _decoded(cams.read("samples/path"))])
        # 30 items in 4 tasks: cuts 7, 15, 22 move to the tar boundaries 5, 15, 20
        assert [len(t) for t in tars] == [5, 10, 5, 10]
        assert all(not set(a) & set(b) for i, a in enumerate(tars) for b in tars[i + 1 :])
