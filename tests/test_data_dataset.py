"""Discovery, splits, saved index, and the deterministic ImageDataset."""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnncam.config import DataConfig, SplitConfig
from cnncam.data import walk
from cnncam.data.dataset import BadImageWarning, ImageDataset, LinkWarning, discover, load_boxes
from cnncam.data.splits import DatasetIndex, load_index, read_hashes, save_index, split_counts, split_state
from cnncam.data.transforms import eval_transform, train_transform
from cnncam.errors import CnncamError, DataError
from cnncam.runs import RunPaths

SIZE = 16


def _img(path: Path, colour: tuple[int, int, int] = (200, 30, 90), size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = colour
    arr[: size[1] // 2, : size[0] // 3] = 255 - np.array(colour)  # asymmetric, so flips/crops show
    Image.fromarray(arr).save(path)


def _folder(root: Path, counts: dict[str, int], prefix: str = "") -> Path:
    for c, n in counts.items():
        for i in range(n):
            # Distinct bytes per class and split: identical files across splits would (rightly) warn.
            _img(
                root / prefix / c / f"{c}_{i:03d}.png",
                colour=(10 * i % 256, 40 + ord(c[0]) % 50, 100 + len(c) + len(prefix)),
            )
    return root


def _cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(root=str(root), image_size=SIZE, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- splits


def test_single_layout_split_is_stratified_and_reproducible(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"cat": 20, "dog": 13, "eel": 7})
    cfg = _cfg(root, layout="single", split=SplitConfig(0.7, 0.2, 0.1))
    a, b, c = discover(cfg, seed=0), discover(cfg, seed=0), discover(cfg, seed=1)
    assert a == b
    assert a.splits != c.splits
    assert a.classes == ["cat", "dog", "eel"]
    for label, n in enumerate((20, 13, 7)):
        counts = split_counts(n, (0.7, 0.2, 0.1))
        assert [a.class_counts(s)[label] for s in ("train", "val", "test")] == list(counts)
        assert [c.class_counts(s)[label] for s in ("train", "val", "test")] == list(counts)
    everything = [s for split in a.splits.values() for s in split]
    assert len(everything) == len(set(everything)) == 40  # disjoint and complete
    assert all(rel.startswith(f"{a.classes[label]}/") for rel, label in everything)


def test_split_counts_round_half_up() -> None:
    assert split_counts(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert split_counts(5, (0.8, 0.1, 0.1)) == (3, 1, 1)  # 0.5 rounds up (not to even)
    assert split_counts(4, (0.8, 0.1, 0.1)) == (4, 0, 0)
    assert split_counts(25, (0.7, 0.1, 0.2)) == (17, 3, 5)  # 2.5 -> 3
    assert split_counts(3, (1.0, 0.0, 0.0)) == (3, 0, 0)
    assert split_counts(2, (0.0, 0.5, 0.5)) == (0, 1, 1)


def test_zero_test_ratio_gives_empty_test_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 5, "b": 5})
    index = discover(_cfg(root, split=SplitConfig(0.8, 0.2, 0.0)), seed=3)
    assert index.splits["test"] == [] and len(index.splits["val"]) == 2


def test_presplit_layout_and_auto_detection(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _folder(root, {"a": 4, "b": 3}, "train")
    _folder(root, {"a": 2, "b": 1}, "val")
    index = discover(_cfg(root), seed=0)  # layout auto: root/train exists
    assert index.classes == ["a", "b"]
    assert index.class_counts("train") == [4, 3] and index.class_counts("val") == [2, 1]
    assert index.splits["test"] == []  # no test/ folder
    assert index.splits["val"][0] == ("val/a/a_000.png", 0)
    assert discover(_cfg(root, layout="presplit"), seed=5) == index  # seed does not matter here
    flat = _folder(tmp_path / "flat", {"a": 10, "b": 10})  # auto without train/: single, split here
    flat_index = discover(_cfg(flat), seed=0)
    assert flat_index.class_counts("train") == [8, 8] and flat_index.class_counts("test") == [1, 1]
    assert all(not p.startswith("train/") for p, _ in flat_index.splits["train"])


def test_missing_val_folder_warns(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2}, "train")
    with pytest.warns(UserWarning, match="no val/ folder"):
        index = discover(_cfg(root), seed=0)
    assert index.splits["val"] == [] and len(index.splits["train"]) == 4


def test_ignored_files_hidden_entries_nested_and_case(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "notes.txt").write_text("not an image, wrong extension: ignored silently")
    _img(root / "a" / ".hidden.png")
    _img(root / "a" / ".cache" / "x.png")
    _img(root / ".trash" / "y.png")
    _img(root / "b" / "deeper" / "UPPER.PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing above is worth a warning
        index = discover(_cfg(root, split=SplitConfig(1.0, 0.0, 0.0)), seed=0)
    assert index.classes == ["a", "b"]
    assert [p for p, _ in index.splits["train"]] == [
        "a/a_000.png",
        "a/a_001.png",
        "b/b_000.png",
        "b/b_001.png",
        "b/deeper/UPPER.PNG",
    ]
    assert index.skipped == []


def test_bad_images_are_skipped_and_listed(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "html.jpg").write_text("<html>nope</html>")
    good = (root / "b" / "b_000.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (64, 64)).save(root / "b" / "huge.png")
    Image.new("CMYK", (8, 8)).save(root / "b" / "cmyk.jpg")  # awkward but fine
    with pytest.warns(BadImageWarning, match="skipped 4 unreadable") as record:
        index = discover(_cfg(root, max_image_pixels=1000, split=SplitConfig(1.0, 0.0, 0.0)), seed=0)
    assert "a/empty.jpg (empty file (0 bytes))" in str(record[0].message)
    assert [s["path"] for s in index.skipped] == ["a/empty.jpg", "a/html.jpg", "b/cut.png", "b/huge.png"]
    assert "decompression bomb" in index.skipped[3]["reason"]
    kept = {p for p, _ in index.splits["train"]}
    assert "b/cmyk.jpg" in kept and not kept & {s["path"] for s in index.skipped} and len(kept) == 7


# ---------------------------------------------------------------------------------------------- errors


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover(_cfg(tmp_path / "nope"), seed=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        discover(_cfg(tmp_path / "file"), seed=0)
    loose = tmp_path / "loose"
    _img(loose / "x.png")
    with pytest.raises(DataError, match=r"no class folders .*1 files lie directly"):
        discover(_cfg(loose), seed=0)
    root = _folder(tmp_path / "emptyclass", {"a": 2, "b": 2})
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty class folder.*zebra"):
        discover(_cfg(root), seed=0)
    with pytest.raises(DataError, match=r"single class \('only'\)"):
        discover(_cfg(_folder(tmp_path / "one", {"only": 3})), seed=0)
    with pytest.raises(DataError, match="layout is 'presplit'"):
        discover(_cfg(_folder(tmp_path / "flat", {"a": 2, "b": 2}), layout="presplit"), seed=0)


def test_presplit_class_sets_must_match(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _folder(root, {"cat": 2, "dog": 2, "eel": 2}, "train")
    _folder(root, {"cat": 1, "dog": 1}, "val")
    _folder(root, {"cat": 1, "dog": 1, "eel": 1, "fox": 1}, "test")
    with pytest.raises(DataError, match="val/ lacks eel; test/ has fox which train/ lacks"):
        discover(_cfg(root), seed=0)


def test_class_without_training_images(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 4, "b": 1})
    with pytest.raises(DataError, match=r"leaves class 'b' \(1 images\) with no training image"):
        discover(_cfg(root, split=SplitConfig(0.5, 0.5, 0.0)), seed=0)
    broken = _folder(tmp_path / "broken", {"a": 2})
    (broken / "b").mkdir()
    (broken / "b" / "x.jpg").write_text("text")
    with pytest.warns(BadImageWarning), pytest.raises(DataError, match=r"class 'b' .* no usable .*1 skipped"):
        discover(_cfg(broken), seed=0)


# ---------------------------------------------------------------------------------------------- index files


def test_save_load_index_round_trip(tmp_path: Path) -> None:
    index = DatasetIndex(
        root=tmp_path / "data",
        classes=["a b", "ç"],
        splits={"train": [("a b/x,1.png", 0), ('ç/"q".jpg', 1)], "val": [("ç/v.png", 1)], "test": []},
        skipped=[{"path": "a b/bad.jpg", "reason": "empty file (0 bytes)"}],
    )
    paths = RunPaths(tmp_path / "run")
    save_index(index, paths)
    assert paths.split_file("test").read_text() == "path,label\n"
    assert paths.split_file("train").read_text().splitlines()[1] == '"a b/x,1.png",0'
    assert load_index(paths, tmp_path / "data") == index
    paths.split_file("val").write_text("path,label\nç/v.png,7\n")
    with pytest.raises(
        DataError, match="split of run .* was changed after training wrote it: .*val.csv differs"
    ):
        load_index(paths, tmp_path / "data")
    paths.split_manifest.unlink()  # a split saved before manifests existed: read as it is
    with pytest.raises(DataError, match="line 2"):
        load_index(paths, tmp_path / "data")
    paths.split_file("val").unlink()
    with pytest.raises(DataError, match="no saved split"):
        load_index(paths, tmp_path / "data")
    with pytest.raises(CnncamError, match="does not exist"):
        load_index(RunPaths(tmp_path / "elsewhere"), tmp_path)


def test_discovered_index_round_trips(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 5, "b": 6})
    index = discover(_cfg(root), seed=2)
    save_index(index, RunPaths(tmp_path / "run"))
    assert load_index(RunPaths(tmp_path / "run"), root) == index


def test_load_boxes(tmp_path: Path) -> None:
    assert load_boxes(tmp_path) is None
    (tmp_path / "boxes.json").write_text('{"a/x.png": [1, 2, 3, 4]}')
    assert load_boxes(tmp_path) == {"a/x.png": (1, 2, 3, 4)}
    (tmp_path / "boxes.json").write_text('{"a/x.png": [1, 2, 3]}')
    with pytest.raises(DataError, match="4 integers"):
        load_boxes(tmp_path)


# ---------------------------------------------------------------------------------------------- dataset


@pytest.fixture
def train_ds(tmp_path: Path) -> ImageDataset:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    cfg = _cfg(root, augment="full", normalize="none", vflip=0.5)
    with pytest.warns(UserWarning, match="val split is empty"):  # 3 images per class: 10 % rounds to 0
        samples = discover(cfg, seed=0).splits["train"]
    return ImageDataset(
        root, samples, train_transform(cfg, [0.0] * 3, [1.0] * 3), cfg.max_image_pixels, seed=7
    )


def test_augmentation_is_a_function_of_seed_epoch_index(train_ds: ImageDataset) -> None:
    x, label, index = train_ds[(2, 5)]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert (label, index) == (train_ds.samples[2][1], 2)
    for i in (3, 0, 1):  # other fetches in between change nothing
        train_ds[(i, 5)]
    assert torch.equal(train_ds[(2, 5)][0], x)
    assert not torch.equal(train_ds[(2, 6)][0], x)  # next epoch: new augmentation
    again = ImageDataset(train_ds.root, train_ds.samples, train_ds.transform, train_ds.max_pixels, seed=7)
    assert torch.equal(again[(2, 5)][0], x)
    other_seed = ImageDataset(
        train_ds.root, train_ds.samples, train_ds.transform, train_ds.max_pixels, seed=8
    )
    assert not torch.equal(other_seed[(2, 5)][0], x)
    assert torch.equal(train_ds[2][0], train_ds[(2, 0)][0])
    assert torch.equal(train_ds[[2, 5]][0], x) and torch.equal(train_ds[(np.int64(2), torch.tensor(5))][0], x)
    assert train_ds[-1][2] == len(train_ds) - 1
    with pytest.raises(IndexError):
        train_ds[len(train_ds)]


def test_main_process_rng_untouched(train_ds: ImageDataset) -> None:
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(4), random.random()
    torch.manual_seed(123)
    random.seed(123)
    train_ds[(0, 1)]
    train_ds[(1, 1)]
    assert torch.equal(torch.rand(4), expected_torch) and random.random() == expected_py


def test_workers_give_the_same_samples(train_ds: ImageDataset) -> None:
    keys = [(i, 3) for i in range(len(train_ds))]
    main = [train_ds[k][0] for k in keys]
    loader = DataLoader(train_ds, batch_size=None, sampler=keys[::-1], num_workers=2)
    fetched = {int(index): x for x, _, index in loader}
    assert all(torch.equal(fetched[i], main[i]) for i in range(len(keys)))


def test_file_broken_after_discovery_falls_back(
    train_ds: ImageDataset, caplog: pytest.LogCaptureFixture
) -> None:
    expected = train_ds[(2, 4)]
    (train_ds.root / train_ds.samples[1][0]).write_text("overwritten by a sync job")
    with caplog.at_level(logging.WARNING, logger="cnncam"):
        x, label, index = train_ds[(1, 4)]
        train_ds[(1, 5)]
    assert index == 2 and label == expected[1] and torch.equal(x, expected[0])
    assert [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()] == [
        f"cannot decode {train_ds.root / train_ds.samples[1][0]} any more (not an image (Pillow cannot "
        "identify the format)); using the next image instead"
    ]
    for rel, _ in train_ds.samples:
        (train_ds.root / rel).write_bytes(b"")
    with pytest.raises(DataError, match="can be decoded"):
        train_ds[0]


def test_eval_dataset_is_plain(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    cfg = _cfg(root, normalize="none")
    ds = ImageDataset(
        root, [("a/a_001.png", 0)], eval_transform(cfg, [0.0] * 3, [1.0] * 3), cfg.max_image_pixels
    )
    x, label, index = ds[0]
    assert (label, index) == (0, 0)
    expected = torch.tensor([10, 40 + ord("a") % 50, 101]) / 255.0
    assert torch.allclose(x[:, -1, -1], expected)  # un-augmented corner colour


# ---------------------------------------------------------------------------------------------- links, hashes


def test_hard_links_and_linked_folders_are_listed_once(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    os.link(root / "a" / "a_000.png", root / "a" / "zz_same_inode.png")
    outside = _folder(tmp_path / "ext", {"x": 2})
    (root / "b" / "ext1").symlink_to(outside / "x")
    (root / "b" / "ext2").symlink_to(outside / "x")  # the same real folder twice
    with pytest.warns(LinkWarning, match="2 path\\(s\\) led to a file or folder already listed"):
        index = discover(_cfg(root, split=SplitConfig(1.0, 0.0, 0.0)), seed=0)
    listed = [p for p, _ in index.splits["train"]]
    assert "a/zz_same_inode.png" not in listed and listed.count("a/a_000.png") == 1
    assert [p for p in listed if "ext" in p] == ["b/ext1/x_000.png", "b/ext1/x_001.png"]


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "c").symlink_to("a")
    with pytest.raises(DataError, match="class folder .*c is a symlink into data.root.*two labels"):
        discover(_cfg(root), seed=0)


def test_content_hashes_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    cfg = _cfg(root, split=SplitConfig(1.0, 0.0, 0.0))
    first = discover(cfg, seed=0)
    assert set(first.hashes) == {p for p, _ in first.splits["train"]}
    paths = RunPaths(tmp_path / "run")
    save_index(first, paths)
    cache = read_hashes(paths)
    assert cache == first.hashes
    opened: list[str] = []
    real = walk.hashlib.blake2b
    monkeypatch.setattr(walk.hashlib, "blake2b", lambda **kw: opened.append("x") or real(**kw))
    _img(root / "a" / "a_000.png", colour=(1, 2, 3))  # one file changes: only it is hashed again
    again = discover(cfg, seed=0, hash_cache=cache)
    assert len(opened) == 1 and again.hashes["a/a_000.png"] != first.hashes["a/a_000.png"]
    assert {k: v for k, v in again.hashes.items() if k != "a/a_000.png"} == {
        k: v for k, v in first.hashes.items() if k != "a/a_000.png"
    }


def test_split_state_tells_complete_partial_changed_and_legacy(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 5, "b": 5})
    paths = RunPaths(tmp_path / "run")
    assert split_state(paths) == ("none", "")
    save_index(discover(_cfg(root), seed=0), paths)
    assert split_state(paths) == ("complete", "")
    paths.split_file("test").write_text("path,label\n")
    state, why = split_state(paths)
    assert state == "changed" and "test.csv differs" in why
    paths.split_manifest.unlink()
    assert split_state(paths)[0] == "partial"  # files but no manifest, nothing trained: write again
    paths.last_ckpt.parent.mkdir(parents=True)
    paths.last_ckpt.write_bytes(b"x")
    assert split_state(paths)[0] == "legacy"  # a run trained before manifests existed


def test_a_split_changed_after_training_began_is_refused(tmp_path: Path) -> None:
    from cnncam.config import load_config
    from cnncam.train.distributed import DistInfo
    from cnncam.train.setup import load_or_discover

    root = _folder(tmp_path / "d", {"a": 5, "b": 5})
    cfg = load_config(
        None, [f"data.root={root}", f"runs_dir={tmp_path}", "name=r", f"data.image_size={SIZE}"]
    )
    paths = RunPaths(cfg.run_dir)
    index = load_or_discover(cfg, paths, DistInfo())
    paths.split_file("train").write_text("path,label\na/a_000.png,0\n")
    assert load_or_discover(cfg, paths, DistInfo()) == index  # nothing trained yet: written again
    paths.last_ckpt.parent.mkdir(parents=True)
    paths.last_ckpt.write_bytes(b"x")
    paths.split_file("train").write_text("path,label\na/a_000.png,0\n")
    with pytest.raises(DataError, match="was changed after training began .*train.csv differs"):
        load_or_discover(cfg, paths, DistInfo())
