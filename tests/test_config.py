"""The config schema: loading, overrides, and errors that name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnncam.config import RunConfig, dump_yaml, load_config, to_dict, valid_keys
from cnncam.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    out = tmp_path / "config.yaml"
    out.write_text(dump_yaml(cfg))
    assert load_config(out) == cfg


def test_seed_workflow_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"demo", "cats_dogs", "fish", "tb_xray_mobilenet", "cifar10"} <= names
    tb = load_config(Path(__file__).parent.parent / "configs" / "tb_xray_mobilenet.yaml")
    assert tb.model.name == "mobilenet_v2" and tb.model.freeze_backbone and tb.model.pretrained
    fish = load_config(Path(__file__).parent.parent / "configs" / "fish.yaml")
    assert fish.data.image_size == 128 and fish.data.layout == "single" and fish.data.split.train == 0.8


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=5",
            "data.root=/scratch/fish",
            "train.lr=3e-4",
            "train.grad_clip=null",
            "cam.methods=[gradcam, gradcam_pp]",
            "data.crop_scale=[0.5, 1]",
            "name=no",
            "data.root=007",
            "train.channels_last=true",
            "model.pretrained=null",
        ],
    )
    assert cfg.train.epochs == 5 and cfg.train.lr == 3e-4 and cfg.train.grad_clip is None
    assert cfg.cam.methods == ("gradcam", "gradcam_pp") and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.name == "no" and cfg.data.root == "007"  # str fields keep the raw text
    assert cfg.train.channels_last is True and cfg.model.pretrained is None


def test_yaml_file_plus_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "train": {"epochs": 3, "lr": "1e-3"},
                "data": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}},
            }
        )
    )
    cfg = load_config(f, ["train.epochs=4"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr, cfg.data.split.val) == ("x", 4, 1e-3, 0.2)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.epoch=3",
            r"unknown config key 'train.epoch'; did you mean 'train.epochs'\? Valid keys in train: epochs, ",
        ),
        ("trian.epochs=3", r"unknown config key 'trian'; did you mean 'train'\?"),
        (
            "train.precision=fp8",
            r"train.precision: unknown value 'fp8'; did you mean 'fp32'\? Valid choices: fp32, bf16, fp16",
        ),
        ("model.name=resnet81", r"did you mean 'resnet18'\? Valid choices: simple_cnn, resnet18"),
        ("cam.methods=[gradcam++]", r"cam.methods\[0\]: unknown value 'gradcam\+\+'; did you mean 'gradcam'"),
        (
            "cam.targets=top3",
            r"cam.targets 'top3' is invalid. Valid choices: pred, label, all, class:<i>, topk:<k>",
        ),
        ("train.epochs=abc", r"train.epochs must be an integer, got 'abc'"),
        ("train.epochs=0", r"train.epochs must be > 0"),
        ("train.channels_last=maybe", r"train.channels_last must be true or false"),
        ("data.split.train=0.5", r"data.split ratios must sum to 1"),
        ("data.crop_scale=[0.5]", r"data.crop_scale must be a list of 2 values"),
        ("data.resize=10", r"data.resize \(10\) must be >= data.image_size \(64\)"),
        ("data.rotation=400", r"data.rotation must be within \[0, 180\]"),
        ("train=3", r"the config|train must be a mapping"),
        ("train.epochs.x=3", r"train.epochs is a value, not a section"),
        ("epochs", r"must look like key.path=value"),
        ("name=a b", r"name 'a b' must be letters"),
    ],
)
def test_errors_name_the_key_and_the_choices(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    bad.write_text("train:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lerning_rate'"):
        load_config(bad)


def test_to_dict_is_plain_and_keys_are_listed() -> None:
    d = to_dict(RunConfig())
    assert isinstance(d["cam"]["methods"], list) and d["train"]["precision"] == "fp32"
    keys = valid_keys()
    assert "train.epochs" in keys and "data.split.train" in keys and "slurm.partition" in keys
    assert len(keys) == len(set(keys))
