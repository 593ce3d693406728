"""Data: robust image loading, discovery and reproducible splits, transforms, synthetic shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnncam.data.images import BadImageError as BadImageError
from cnncam.data.images import load_rgb as load_rgb
from cnncam.data.splits import SPLITS as SPLITS
from cnncam.data.splits import DatasetIndex as DatasetIndex
from cnncam.data.splits import Sample as Sample
from cnncam.data.splits import load_index as load_index
from cnncam.data.splits import save_index as save_index
from cnncam.data.splits import split_counts as split_counts

if TYPE_CHECKING:  # type checkers see the real signatures
    from cnncam.data.dataset import BadImageWarning as BadImageWarning
    from cnncam.data.dataset import ImageDataset as ImageDataset
    from cnncam.data.dataset import discover as discover
    from cnncam.data.dataset import load_boxes as load_boxes
    from cnncam.data.dataset import sample_seed as sample_seed
    from cnncam.data.synthetic import SHAPES as SHAPES
    from cnncam.data.synthetic import generate_shapes as generate_shapes
    from cnncam.data.synthetic import render_sample as render_sample
    from cnncam.data.transforms import IMAGENET_MEAN as IMAGENET_MEAN
    from cnncam.data.transforms import IMAGENET_STD as IMAGENET_STD
    from cnncam.data.transforms import box_to_input as box_to_input
    from cnncam.data.transforms import dataset_stats as dataset_stats
    from cnncam.data.transforms import eval_transform as eval_transform
    from cnncam.data.transforms import normalization as normalization
    from cnncam.data.transforms import train_transform as train_transform

# Imported lazily (PEP 562): `dataset` and `transforms` import torch, which the report (reading
# images with `load_rgb`) must not pay for; importing `synthetic` here would make
# `python -m cnncam.data.synthetic` warn that the module was imported twice.
_LAZY = {
    "dataset": ("BadImageWarning", "ImageDataset", "discover", "load_boxes", "sample_seed"),
    "synthetic": ("SHAPES", "generate_shapes", "render_sample"),
    "transforms": (
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "box_to_input",
        "dataset_stats",
        "eval_transform",
        "normalization",
        "train_transform",
    ),
}


def __getattr__(name: str) -> object:
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"cnncam.data.{module}"), name)
    raise AttributeError(f"module 'cnncam.data' has no attribute {name!r}")
