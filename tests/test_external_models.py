"""Models cnncam did not register, end to end (random weights, small inputs, CPU): train one step,
then export Grad-CAM through the CLI from an external weights file (export-only run, 2 shards,
merged), and build the report."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from train_helpers import tiny_dataset

from cnncam.cli import main
from cnncam.config import load_config
from cnncam.data import eval_transform, load_rgb
from cnncam.runs import read_metrics
from cnncam.storage import open_cams
from cnncam.train import run_training

CLASSES = ["circle", "square", "triangle"]
FACTORY = '''
from torch import nn


def build(num_classes, width=8):
    """A user's own CNN: conv-BN-ReLU stages, global average pooling, linear head."""
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()))
    net.add_module("stage", nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc", nn.Linear(2 * width, num_classes))
    return net
'''


def _source_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model as its own library builds it (not through cnncam), random weights."""
    torch.manual_seed(7)
    kind, _, target = name.partition(":")
    if kind == "timm":
        return timm.create_model(target, pretrained=False, num_classes=len(CLASSES), **kwargs)
    if kind == "torchvision":
        return torchvision.models.get_model(target, weights=None, num_classes=len(CLASSES), **kwargs)
    module = __import__(target.split(":")[0])
    return module.build(len(CLASSES), **kwargs)  # type: ignore[no-any-return]


CASES = [
    pytest.param("torchvision:convnext_tiny", {}, 64, "features", ".pth", marks=pytest.mark.slow),
    pytest.param("timm:resnet18", {}, 64, "layer4", ".safetensors", marks=pytest.mark.slow),
    pytest.param(
        "timm:vit_tiny_patch16_224",
        {"img_size": 32},
        32,
        "blocks.11.norm1:tokens",
        ".safetensors",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "timm:swin_tiny_patch4_window7_224",
        {"img_size": 64, "window_size": 2},
        64,
        "layers.3:nhwc",
        ".safetensors",
        marks=pytest.mark.slow,
    ),
    pytest.param("python:tiny_factory:build", {"width": 8}, 32, "stage", ".pt"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working directory, holding their factory module (python: imports from here)."""
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "tiny_factory", raising=False)
    yield tmp_path
    sys.modules.pop("tiny_factory", None)


def _overrides(size: int, kwargs: dict[str, Any]) -> list[str]:
    return [
        f"data.image_size={size}",
        f"data.resize={size}",
        "data.num_workers=0",
        f"model.kwargs={json.dumps(kwargs)}",
        "cam.batch_size=4",
        "cam.num_workers=0",
        "report.gallery_size=2",
        "report.per_class=1",
        "report.compare_size=2",
    ]


@pytest.mark.parametrize("name, kwargs, size, layer, suffix", CASES)
def test_external_model_trains_exports_merges_and_reports(
    workdir: Path, name: str, kwargs: dict[str, Any], size: int, layer: str, suffix: str
) -> None:
    data = tiny_dataset(workdir / "shapes", per_class=4, size=size)
    common = _overrides(size, kwargs)

    # train one step (12 images, batch 8: the epoch's first step, then a second, partial one)
    cfg = load_config(
        None,
        ["name=trained", "runs_dir=runs", f"data.root={data}", f"model.name={name}", "data.batch_size=8"]
        + ["data.augment=none", "train.epochs=1", "train.log_every=1", *common],
    )
    run_training(cfg)
    steps = [r for r in read_metrics(Path("runs/trained/metrics.jsonl")) if r.get("kind") == "iter"]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert Path("runs/trained/checkpoints/best.pt").is_file()

    # export from a weights file made by the model's own library
    source = _source_model(name, kwargs).eval()
    weights = workdir / f"model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    else:
        torch.save(source.state_dict(), weights)
    (workdir / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    argv = [
        "cam",
        "--model",
        name,
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--classes",
        "classes.txt",
    ]
    argv += ["--name", "ext", "--executor", "inline", "--shards", "2", "--set", "runs_dir=runs"]
    argv += [x for o in common for x in ("--set", o)]
    assert main(argv) == 0

    run = workdir / "runs" / "ext"
    # No training files; the run lock's hidden files (.lock, .lock.holders) are not run content.
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "cams", "classes.json", "config.yaml", "jobs.json", "provenance.json", "skipped.json", "splits",
    ]  # fmt: skip
    prov = json.loads((run / "provenance.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert prov["kind"] == "export-only" and prov["weights_sha256"] == digest
    run_cfg = load_config(run / "config.yaml")
    with open_cams(run / "cams" / "cams.h5") as cams:
        assert cams.layers == [layer] and cams.methods == ["gradcam"] and cams.n_items == 12
        assert cams.attrs["model"] == name and cams.attrs["checkpoint_sha256"] == digest
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in cams.read("samples/path")]
        logits = cams.read("samples/logits")
        maps = cams.read(f"cams/gradcam/{layer}")
    # the export predicts exactly what the source model predicts on the same transformed images
    mean = run_cfg.model.mean or (0.485, 0.456, 0.406)
    std = run_cfg.model.std or (0.229, 0.224, 0.225)
    tf = eval_transform(run_cfg.data, mean, std)
    x = torch.stack([tf(load_rgb(data / p, 10**8)) for p in paths])
    with torch.no_grad():
        expected = source(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    assert maps.shape[:2] == (12, 1) and maps.shape[2] * maps.shape[3] > 1 and float(maps.max()) > 0

    assert main(["report", "--run", str(run), "--executor", "inline"]) == 0
    html = (run / "report" / "index.html").read_text()
    assert "Export-only run" in html and "Learning curves" not in html and layer in html
    assert digest in html


def test_export_only_reuse_retry_and_refusals(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_dataset(workdir / "shapes", per_class=4, size=32)
    source = _source_model("python:tiny_factory:build", {}).eval()
    torch.save(source.state_dict(), workdir / "w.pt")
    (workdir / "classes.txt").write_text("\n".join(CLASSES))
    argv = ["cam", "--model", "python:tiny_factory:build", "--weights", "w.pt", "--data", str(data)]
    argv += ["--classes", "classes.txt", "--name", "ext", "--executor", "inline", "--shards", "2"]
    argv += ["--set", "runs_dir=runs", "--set", "data.image_size=32", "--set", "cam.num_workers=0"]
    assert main(argv) == 0
    cams = workdir / "runs" / "ext" / "cams"
    before = (cams / "part-00001-of-00002.h5").read_bytes()
    # a lost shard: --retry-failed on the run folder redoes only it, then merges
    (cams / "part-00001-of-00002.h5").unlink()
    (cams / "cams.h5").unlink()
    assert main(["cam", "--run", "runs/ext", "--retry-failed", "--executor", "inline"]) == 0
    assert "retrying shards [1] of 2" in capsys.readouterr().out
    assert (cams / "cams.h5").is_file()
    with open_cams(cams / "part-00001-of-00002.h5") as part:
        assert part.n_items == 6
    assert len(before) > 0 and (cams / "part-00001-of-00002.h5").read_bytes() != b""
    # the same command again reuses the run (nothing to do: every part is complete)
    assert main(argv) == 0
    # other classes or other weights under the same name are refused
    (workdir / "other.txt").write_text("a\nb\nc\n")
    assert main([*argv[:8], "other.txt", *argv[9:]]) == 2
    assert "another class list" in capsys.readouterr().err
    with torch.no_grad():
        next(iter(source.parameters())).add_(1)
    torch.save(source.state_dict(), workdir / "w.pt")
    assert main(argv) == 2
    assert "changed since" in capsys.readouterr().err
    # a weights file for other classes is a clear error, not a random head
    five = nn.Linear(16, 5).state_dict()
    state = _source_model("python:tiny_factory:build", {}).state_dict()
    state.update({"fc.weight": five["weight"], "fc.bias": five["bias"]})
    torch.save(state, workdir / "w5.pt")
    bad = [*argv[:4], "w5.pt", *argv[5:10], "five", *argv[11:]]
    assert main(bad) == 2
    assert "has 5 outputs but the run has 3 classes" in capsys.readouterr().err
