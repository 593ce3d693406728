"""Transforms: shapes, normalisation values, dataset statistics cache, box mapping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cnncam.config import DataConfig
from cnncam.data import transforms as T
from cnncam.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    box_to_input,
    dataset_stats,
    eval_transform,
    normalization,
    train_transform,
)
from cnncam.errors import ConfigError, DataError
from cnncam.runs import RunPaths


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_eval_transform_shape_and_normalisation() -> None:
    cfg = DataConfig(image_size=24)
    x = eval_transform(cfg, IMAGENET_MEAN, IMAGENET_STD)(_solid((255, 0, 128)))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(x[:, 5, 7], expected, atol=1e-5)
    raw = eval_transform(DataConfig(image_size=24, normalize="none"), [0.5] * 3, [0.1] * 3)(
        _solid((255, 0, 128))
    )
    assert torch.allclose(raw[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))  # Normalize skipped


@pytest.mark.parametrize("augment", ["none", "basic", "full"])
def test_train_transform_shapes(augment: str) -> None:
    cfg = DataConfig(image_size=20, augment=augment, vflip=0.5)  # type: ignore[arg-type]
    pipeline = train_transform(cfg, IMAGENET_MEAN, IMAGENET_STD)
    kinds = [type(t) for t in pipeline.transforms]
    assert (v2.RandomResizedCrop in kinds) == (augment != "none")
    assert (v2.RandomVerticalFlip in kinds) == (augment != "none")
    assert (v2.ColorJitter in kinds) == (v2.RandomAffine in kinds) == (augment == "full")
    assert kinds[-1] is v2.Normalize
    torch.manual_seed(0)
    x = pipeline(Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)))
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32


def test_train_transform_options_are_used() -> None:
    cfg = DataConfig(
        image_size=20,
        augment="full",
        hflip=0.0,
        rotation=30.0,
        translate=0.2,
        zoom=0.25,
        color_jitter=0.3,
        crop_scale=(0.5, 0.9),
        normalize="none",
    )
    steps = {type(t): t for t in train_transform(cfg, [0.0] * 3, [1.0] * 3).transforms}
    assert v2.RandomHorizontalFlip not in steps and v2.Normalize not in steps
    assert steps[v2.RandomResizedCrop].scale == (0.5, 0.9)
    affine = steps[v2.RandomAffine]
    assert (
        list(affine.degrees) == [-30.0, 30.0]
        and affine.translate == (0.2, 0.2)
        and affine.scale == (0.75, 1.25)
    )
    assert steps[v2.ColorJitter].brightness == (0.7, 1.3) and steps[v2.ColorJitter].hue is None
    with pytest.raises(ConfigError, match=r"data.translate must be within \[0, 1\], got 1.5"):
        DataConfig(augment="full", translate=1.5)  # refused by the config schema, before any transform


def test_fixed_normalisations() -> None:
    assert normalization(DataConfig(), [], Path("."), None) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert normalization(DataConfig(normalize="none"), [], Path("."), None) == ([0.0] * 3, [1.0] * 3)


def _two_colour_split(root: Path, n: int = 6) -> list[tuple[str, int]]:
    samples = []
    for i in range(n):
        colour = (200, 100, 0) if i % 2 else (100, 50, 250)
        _solid(colour, (30 + i, 20)).save(root / f"{i}.png")
        samples.append((f"{i}.png", 0))
    return samples


def test_dataset_statistics_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _two_colour_split(tmp_path)
    cfg = DataConfig(image_size=16, normalize="dataset")
    paths = RunPaths(tmp_path / "run")
    mean, std = normalization(cfg, samples, tmp_path, paths)
    # Half the pixels are one colour, half the other: mean = midpoint, std = half the gap.
    np.testing.assert_allclose(mean, np.array([150, 75, 125]) / 255, atol=1e-6)
    np.testing.assert_allclose(std, np.array([50, 25, 125]) / 255, atol=1e-6)
    cached = json.loads(paths.norm_stats.read_text())
    assert cached["num_images"] == 6 and cached["image_size"] == 16 and cached["resize"] == cfg.eval_resize

    def must_not_run(*args: object, **kw: object) -> None:
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(T, "dataset_stats", must_not_run)
    assert normalization(cfg, samples, tmp_path, paths) == (mean, std)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="recomputing for 20px"):
        normalization(DataConfig(image_size=20, normalize="dataset"), samples, tmp_path, paths)
    assert json.loads(paths.norm_stats.read_text())["image_size"] == 20


def test_dataset_statistics_subset_and_errors(tmp_path: Path) -> None:
    samples = _two_colour_split(tmp_path, n=7)
    cfg = DataConfig(image_size=16)
    mean, _, used = dataset_stats(cfg, samples, tmp_path, limit=3)  # picks 0, 3, 6: two blue, one orange
    assert used == 3
    np.testing.assert_allclose(mean, (2 * np.array([100, 50, 250]) + [200, 100, 0]) / 3 / 255, atol=1e-6)
    (tmp_path / "0.png").write_bytes(b"")
    assert dataset_stats(cfg, samples, tmp_path)[2] == 6
    with pytest.raises(DataError, match="train split is empty"):
        dataset_stats(cfg, [], tmp_path)


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((100, 60), (30, 10, 70, 40)),
        ((60, 100), (5, 20, 50, 90)),
        ((45, 45), (0, 0, 45, 12)),
        ((120, 50), (2, 3, 20, 47)),
    ],
)
def test_box_to_input_matches_the_transformed_image(
    size: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    cfg = DataConfig(image_size=32, resize=40, normalize="none")
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 255, 255), box)
    x = eval_transform(cfg, [0.0] * 3, [1.0] * 3)(img)
    ys, xs = np.nonzero(x[0].numpy() > 0.5)
    mapped = box_to_input(box, size, cfg)
    if len(xs) == 0:  # object entirely cropped away
        assert mapped[0] == mapped[2] or mapped[1] == mapped[3]
        return
    seen = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.allclose(mapped, seen, atol=1.0), (mapped, seen)
    assert all(0.0 <= v <= 32.0 for v in mapped)


def test_box_to_input_identity_and_clipping() -> None:
    cfg = DataConfig(image_size=64, resize=64)
    assert box_to_input((3, 4, 50, 60), (64, 64), cfg) == (3.0, 4.0, 50.0, 60.0)
    # 128x64 -> 128x64 (short side 64), crop columns 32..96: the box is clipped to the input.
    assert box_to_input((0, 10, 40, 20), (128, 64), cfg) == (0.0, 10.0, 8.0, 20.0)
    assert box_to_input((100, 10, 120, 20), (128, 64), cfg) == (64.0, 10.0, 64.0, 20.0)
