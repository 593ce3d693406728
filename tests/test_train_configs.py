"""Every shipped config loads, its simple_cnn sees whole images, its augmentation fits its data, and
every layer it names exists in the model it builds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cnncam.config import load_config
from cnncam.models import create_model, get_module
from cnncam.models.simple import receptive_field
from cnncam.runs import RunPaths

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
# Data whose classes change when mirrored (characters) or whose anatomy has a side (chest X-rays).
NO_HFLIP = {"glyphs", "tb_xray_mobilenet"}


def test_the_configs_are_found() -> None:
    assert {p.stem for p in CONFIGS} >= {
        "demo",
        "glyphs",
        "cats_dogs",
        "fish",
        "cifar10",
        "tb_xray_mobilenet",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem and RunPaths(cfg.run_dir).root.name == path.stem
    model_cfg = cfg.model
    if model_cfg.name == "simple_cnn" and model_cfg.head == "gap":
        rf = receptive_field(len(model_cfg.channels), model_cfg.convs_per_block, model_cfg.last_pool)
        assert rf >= cfg.data.image_size
    if path.stem in NO_HFLIP:
        assert cfg.data.hflip == 0.0 and cfg.data.vflip == 0.0
    model = create_model(dataclasses.replace(model_cfg, pretrained=None, freeze_backbone=False), 3).eval()
    for name in cfg.cam.activations + tuple(layer for layer in cfg.cam.layers if layer != "auto"):
        get_module(model, name)  # ModelError if the config names a layer the model does not have
    with torch.no_grad():
        size = cfg.data.image_size
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 3)
