"""The model registry: every model builds, its CAM layer and head are real, weights load, backbones freeze."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cnncam.config import REGISTERED_MODELS, ModelConfig
from cnncam.errors import ConfigError, ModelError
from cnncam.models import (
    MODELS,
    SimpleCNN,
    count_parameters,
    create_model,
    get_module,
    head_name,
    set_train_mode,
    trainable_parameters,
)

SIZE = 64  # the smallest round size at which every model's CAM layer is still >= 2x2
# Downsampling from the input to each model's CAM layer (simple_cnn: 3 default blocks of max-pool 2;
# vgg16: the last ReLU sits before the 5th max-pool).
CAM_STRIDE = {"simple_cnn": 8, "vgg16": 16}
TINY = ModelConfig(name="simple_cnn", channels=(4, 8), dropout=0.0)


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model tried to download weights")


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, nn.Module]]:
    """Every registered model, built once (vgg16 has 138M parameters) with downloads forbidden."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        mp.setattr(torch.hub, "download_url_to_file", _no_download)
        mp.setattr(torchvision.models.WeightsEnum, "get_state_dict", _no_download)
        torch.manual_seed(0)
        yield {name: create_model(ModelConfig(name=name), 3).eval() for name in REGISTERED_MODELS}


@pytest.fixture
def model_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for "cnncam.models" even when setup_logging() turned off propagation to the root."""
    logger = logging.getLogger("cnncam.models")
    logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


def _forward_with_hooks(
    model: nn.Module, layers: list[str], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    outs: list[torch.Tensor] = []
    hook = lambda module, inputs, out: outs.append(out)  # noqa: E731
    handles = [get_module(model, name).register_forward_hook(hook) for name in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def test_registry_matches_config_names() -> None:
    assert tuple(MODELS) == REGISTERED_MODELS


@pytest.mark.parametrize("name", list(MODELS))
def test_model_logits_cam_layer_and_head(built: dict[str, nn.Module], name: str) -> None:
    model, spec = built[name], MODELS[name]
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    logits, (act, head_out) = _forward_with_hooks(model, [spec.cam_layer, spec.head], x)

    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    head = get_module(model, spec.head)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    assert torch.equal(head_out, logits)  # the head is the very last layer
    side = SIZE // CAM_STRIDE.get(name, 32)
    assert act.dim() == 4 and act.shape[0] == 2 and act.shape[2:] == (side, side)
    # Grad-CAM needs the logits to depend on the CAM layer (it is on the path, not a side branch).
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), act)
    assert grad.shape == act.shape and grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_declares_its_cam_layer_and_the_finder_agrees(
    built: dict[str, nn.Module], name: str
) -> None:
    from cnncam.cam.finder import RULES, find_auto_layer
    from cnncam.cam.layers import probe_model

    model = built[name]
    assert model.cnncam_cam_layer == MODELS[name].cam_layer  # what `auto` reads
    probe = probe_model(model, torch.zeros(1, 3, SIZE, SIZE))
    assert find_auto_layer(probe) == MODELS[name].cam_layer
    # without the declaration the structural rules find the same layer (VGG: before the last max-pool)
    found = next(f for f in (rule(probe) for rule in RULES) if f is not None)
    assert found == MODELS[name].cam_layer


@pytest.mark.parametrize("size", [32, 64, 150])
@pytest.mark.parametrize("hidden", [0, 16])
def test_simple_cnn_any_input_size(size: int, hidden: int) -> None:
    cfg = ModelConfig(name="simple_cnn", channels=(8, 16, 32), convs_per_block=2, hidden=hidden)
    model = create_model(cfg, 5).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, (feat,) = _forward_with_hooks(model, [MODELS["simple_cnn"].cam_layer], x)
    assert logits.shape == (2, 5)
    assert feat.shape == (2, 32, size // 8, size // 8)
    assert isinstance(model, SimpleCNN) and len(model.features) == 3
    block1 = model.features[0]
    assert isinstance(block1, nn.Sequential)
    assert [type(m) for m in block1] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.MaxPool2d]
    if hidden:
        assert isinstance(model.hidden, nn.Sequential) and model.fc.in_features == hidden
        assert [type(m) for m in model.hidden] == [nn.Linear, nn.ReLU, nn.Dropout]
    else:
        assert isinstance(model.hidden, nn.Identity) and model.fc.in_features == 32


def test_simple_cnn_parameter_count() -> None:
    model = create_model(TINY, 3)
    # conv 3->4 (108) + BN 4 (8) + conv 4->8 (288) + BN 8 (16) + fc 8->3 (27); convs have no bias.
    assert count_parameters(model) == trainable_parameters(model) == 108 + 8 + 288 + 16 + 27
    assert isinstance(model, SimpleCNN)


@pytest.mark.parametrize("name", ["resnet81", "timm:", "torchvision:convnext tiny", "python:mod", "hub:x"])
def test_unknown_model_lists_registry_and_forms(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(name=name)
    msg = str(err.value)
    assert f"{name!r}" in msg and all(n in msg for n in MODELS)
    assert "torchvision:<builder>, timm:<name>, python:<module>:<callable>" in msg
    if name == "resnet81":
        assert "did you mean 'resnet18'" in msg


def test_unknown_layer_suggests_closest() -> None:
    with pytest.raises(ModelError, match="did you mean 'features'"):
        get_module(create_model(TINY, 3), "featres")


# ----------------------------------------------------------------------------------------------
# Pretrained weights


def test_pretrained_skips_imagenet_head(tmp_path: Path, model_log: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = create_model(ModelConfig(name="resnet18"), 1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(1)
    model = create_model(ModelConfig(name="resnet18", pretrained=str(path)), 3)
    src, dst = source.state_dict(), model.state_dict()
    backbone = [k for k in src if not k.startswith("fc.")]
    assert backbone and all(torch.equal(src[k], dst[k]) for k in backbone)
    assert dst["fc.weight"].shape == (3, 512)
    assert "fc.weight" in model_log.text and "skipped" in model_log.text


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_pretrained_unwraps_checkpoints(tmp_path: Path, wrap: str, prefix: str) -> None:
    source = create_model(TINY, 3)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {prefix + k: v for k, v in source.state_dict().items()}
    torch.save(state if wrap == "plain" else {wrap: state, "epoch": 3}, tmp_path / "w.pt")
    model = create_model(dataclasses.replace(TINY, pretrained=str(tmp_path / "w.pt")), 3)
    src, dst = source.state_dict(), model.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)


def test_pretrained_headless_file_without_bn_counters(
    tmp_path: Path, model_log: pytest.LogCaptureFixture
) -> None:
    # Old torchvision files predate BatchNorm's num_batches_tracked; backbone-only files have no head.
    state = {
        k: v
        for k, v in create_model(TINY, 3).state_dict().items()
        if "num_batches_tracked" not in k and not k.startswith("fc.")
    }
    torch.save(state, tmp_path / "old.pt")
    loaded = create_model(dataclasses.replace(TINY, pretrained=str(tmp_path / "old.pt")), 3).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "classifier fc stays randomly initialised (not in the file)" in model_log.text


def _save_edited(tmp_path: Path, edit: str) -> ModelConfig:
    state = create_model(TINY, 3).state_dict()
    if edit == "unexpected":
        state["bogus.weight"] = torch.zeros(1)
    elif edit == "missing":
        del state["features.block2.conv1.weight"]
    else:  # a backbone tensor of the wrong shape is an error, unlike the head
        state["features.block2.conv1.weight"] = torch.zeros(8, 4, 5, 5)
    torch.save(state, tmp_path / f"{edit}.pt")
    return dataclasses.replace(TINY, pretrained=str(tmp_path / f"{edit}.pt"))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("unexpected", "1 unexpected keys: bogus.weight"),
        ("missing", "1 missing keys: features.block2.conv1.weight"),
        ("shape", r"features.block2.conv1.weight: file \(8, 4, 5, 5\), model \(8, 4, 3, 3\)"),
    ],
)
def test_pretrained_key_errors(tmp_path: Path, edit: str, expected: str) -> None:
    with pytest.raises(ModelError, match=expected):
        create_model(_save_edited(tmp_path, edit), 3)


def test_pretrained_missing_or_bad_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(ModelError, match="does not exist") as err:
        create_model(ModelConfig(pretrained=str(missing)), 3)
    assert str(missing) in str(err.value)

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read"):
        create_model(ModelConfig(pretrained=str(tmp_path / "junk.pt")), 3)

    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ModelError, match="holds no state dict.*epoch, lr"):
        create_model(ModelConfig(pretrained=str(tmp_path / "meta.pt")), 3)


# ----------------------------------------------------------------------------------------------
# Frozen backbones


def _bn_modes(model: nn.Module) -> set[bool]:
    return {m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("name", ["simple_cnn", "mobilenet_v2"])
def test_freeze_backbone_trains_only_the_head(tmp_path: Path, name: str) -> None:
    torch.save(create_model(ModelConfig(name=name), 3).state_dict(), tmp_path / "w.pt")
    cfg = ModelConfig(name=name, pretrained=str(tmp_path / "w.pt"), freeze_backbone=True)
    model = create_model(cfg, 3)
    head = MODELS[name].head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    assert trainable_parameters(model) == count_parameters(get_module(model, head)) < count_parameters(model)

    set_train_mode(model, cfg)
    assert model.training and get_module(model, head).training
    assert _bn_modes(model) == {False}
    # An optimizer step over *all* parameters moves only the head: the backbone gets no gradients
    # and its BN running statistics stay put.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_set_train_mode_unfrozen_and_wrapped() -> None:
    cfg = ModelConfig(name="simple_cnn", channels=(4, 8))
    model = create_model(cfg, 3).eval()
    set_train_mode(model, cfg)
    assert model.training and _bn_modes(model) == {True}

    frozen = ModelConfig(name="simple_cnn", channels=(4, 8), freeze_backbone=True)
    with pytest.warns(UserWarning, match="randomly initialised backbone"):
        model = create_model(frozen, 3)
    wrapped = nn.DataParallel(model)  # what DDP/DataParallel hand to the trainer: keys under .module
    assert set_train_mode(wrapped, frozen) is wrapped
    assert wrapped.training and get_module(model, "fc").training and _bn_modes(model) == {False}
    set_train_mode(wrapped, frozen, mode=False)
    assert not model.training and not get_module(model, "fc").training


# ----------------------------------------------------------------------------------------------
# External models: torchvision:, timm:, python: (issue 10)


def test_timm_pretrained_goes_through_timms_loader(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    cfg = ModelConfig(name="timm:vit_tiny_patch16_224", pretrained=str(path), kwargs={"img_size": 32})
    with pytest.warns(
        UserWarning, match=r"classifier 'head' has 1000 outputs, the run 3 classes; it is replaced"
    ):
        model = create_model(cfg, 3)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 1 + 2 * 2, 192)  # resampled by timm's filter for img_size=32
    assert model.head.weight.shape == (3, 192)
    assert head_name(model, cfg) == "head" and model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_external_builders_refuse_downloads_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model.kwargs may not set weights"):
        create_model(ModelConfig(name="torchvision:resnet18", kwargs={"weights": "DEFAULT"}), 3)
    with pytest.raises(ModelError, match="did you mean 'convnext_tiny'"):
        create_model(ModelConfig(name="torchvision:convnext_tinny"), 3)
    with pytest.raises(ModelError, match="timm model: unknown value 'resnet1000'"):
        create_model(ModelConfig(name="timm:resnet1000"), 3)
    with pytest.raises(ModelError, match="cannot import 'no_such_module'.*working directory"):
        create_model(ModelConfig(name="python:no_such_module:build"), 3)


def test_python_factory_declares_head_and_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def build(num_classes, width=4):\n"
        "    net = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                        nn.Linear(width, num_classes))\n"
        "    net.cnncam_cam_layer = '1'\n"
        "    return net\n"
        "not_callable = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    cfg = ModelConfig(name="python:my_models:build", kwargs={"width": 6}, freeze_backbone=True)
    with pytest.warns(UserWarning, match="without model.pretrained"):
        model = create_model(cfg, 2)
    assert head_name(model, cfg) == "4"  # the last nn.Linear with one output per class
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["4.weight", "4.bias"]
    assert model.cnncam_cam_layer == "1"
    with pytest.raises(ModelError, match="not callable"):
        create_model(ModelConfig(name="python:my_models:not_callable"), 2)
    with pytest.raises(ModelError, match=r"build\(num_classes=\.\.\., depth=\.\.\.\) failed"):
        create_model(ModelConfig(name="python:my_models:build", kwargs={"depth": 3}), 2)
    sys.modules.pop("my_models", None)


def test_safetensors_pretrained_and_corrupt_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = create_model(TINY, 3)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_model(dataclasses.replace(TINY, pretrained=str(tmp_path / "w.safetensors")), 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="cannot read .*bad.safetensors' as safetensors"):
        create_model(dataclasses.replace(TINY, pretrained=str(tmp_path / "bad.safetensors")), 3)
