"""Sanity-check machinery on tiny untrained models: similarity measures, units, randomisation,
the flag rule, the sanity file and the permuted-label hook.  (The trained-model behaviour, Grad-CAM
passing and an edge detector being flagged, is in test_cam_trust_trained.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from cnncam.cam.sanity import (
    cam_maps,
    data_randomisation,
    model_randomisation,
    randomisation_units,
    randomise_unit,
    unit_seed,
)
from cnncam.cam.similarity import average_ranks, spearman, ssim
from cnncam.errors import CamError, SchemaError
from cnncam.models.simple import SimpleCNN
from cnncam.storage.sanity import SanityData, is_flagged, read_sanity, write_sanity
from cnncam.train.setup import permuted_labels


def edges(model: nn.Module, images: Tensor, targets: Tensor) -> dict[tuple[str, str], Tensor]:
    """Sobel gradient magnitude of the grey image: a 'saliency map' that never looks at the model."""
    grey = images.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(grey, kx, padding=1), F.conv2d(grey, kx.transpose(2, 3), padding=1)
    return {("edges", "input"): torch.hypot(gx, gy)[:, 0]}


def _model(seed: int = 0) -> SimpleCNN:
    torch.manual_seed(seed)
    model = SimpleCNN(3, channels=(8, 16), dropout=0.0).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_spearman_matches_scipy_with_ties_and_nan_for_constant_maps() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, generator=g)
    b = a + torch.randn(6, 40, generator=g)
    a[:, :15] = 0.0  # ties, as in ReLU'd maps
    b[:, 20:30] = 1.0
    ours = spearman(a.view(6, 5, 8), b.view(6, 5, 8))
    ref = [spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[2.5, 0.0, 2.5, 1.0]]
    const = spearman(torch.ones(2, 9), torch.randn(2, 9, generator=g))
    assert torch.isnan(const).all()
    with pytest.raises(CamError, match="one shape"):
        spearman(a, b[:, :3])


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written out with loops: 11x11 Gaussian (sigma 1.5), valid windows, range 1."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_formula_and_is_one_for_equal_maps() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 16, 14, generator=g)
    b = (a + 0.3 * torch.rand(3, 16, 14, generator=g)).clamp(0, 1)
    ours = ssim(a, b)
    ref = [_ssim_reference(a[i].double().numpy(), b[i].double().numpy()) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5)
    torch.testing.assert_close(ssim(a, a), torch.ones(3))
    assert float(ssim(a, torch.rand(3, 16, 14, generator=g)).max()) < 0.5


def test_units_group_normalisation_with_its_conv_top_first() -> None:
    units = randomisation_units(_model(), torch.zeros(1, 3, 16, 16))
    assert [u.modules for u in units] == [
        ("fc",),
        ("features.block2.conv1", "features.block2.bn1"),
        ("features.block1.conv1", "features.block1.bn1"),
    ]


def test_randomise_unit_is_seeded_device_free_and_resets_batchnorm() -> None:
    a, b = _model(), _model()
    unit = randomisation_units(a, torch.zeros(1, 3, 16, 16))[1]
    randomise_unit(a, unit, unit_seed(3, 1))
    randomise_unit(b, unit, unit_seed(3, 1))
    conv_a, bn_a = a.features.block2.conv1, a.features.block2.bn1
    torch.testing.assert_close(conv_a.weight, b.features.block2.conv1.weight, rtol=0, atol=0)
    bound = 1 / math.sqrt(conv_a.weight[0].numel())
    w = conv_a.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) > bound / 3
    assert torch.equal(bn_a.running_mean, torch.zeros(16)) and torch.equal(bn_a.running_var, torch.ones(16))
    assert torch.equal(bn_a.weight, torch.ones(16)) and torch.equal(bn_a.bias, torch.zeros(16))
    untouched = _model()
    torch.testing.assert_close(a.features.block1.conv1.weight, untouched.features.block1.conv1.weight)
    randomise_unit(b, unit, unit_seed(4, 1))
    assert not torch.equal(conv_a.weight, b.features.block2.conv1.weight)


def test_model_randomisation_modes_and_the_original_is_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 0, 1])
    fn = cam_maps(["gradcam"], ["features"])
    res = model_randomisation(model, x, targets, [fn, edges], examples=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(res.units) == 3 and set(res.modes) == {"cascading", "independent"}
    for mode in res.modes:
        for key in (("gradcam", "features"), ("edges", "input")):
            r = res.modes[mode][key]
            assert r.similarity.ssim.shape == (3, 5) and r.examples.shape[:2] == (3, 2)
    # the edge detector never looks at the model: identical maps at every step
    torch.testing.assert_close(res.modes["cascading"]["edges", "input"].similarity.spearman, torch.ones(3, 5))
    # cascading step 0 and independent step 0 randomise the same unit with the same seed
    casc, ind = res.modes["cascading"]["gradcam", "features"], res.modes["independent"]["gradcam", "features"]
    torch.testing.assert_close(casc.examples[0], ind.examples[0])
    torch.testing.assert_close(casc.similarity.spearman[0], ind.similarity.spearman[0])
    assert not torch.allclose(casc.examples[-1], ind.examples[-1])
    with pytest.raises(CamError, match="Valid choices: cascading, independent"):
        model_randomisation(model, x, targets, [fn], modes=["sequential"])
    with pytest.raises(CamError, match="unique name"):
        model_randomisation(model, x, targets, [edges, edges])


def test_data_randomisation_compares_two_models_on_the_same_images() -> None:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2, 0])
    fn = cam_maps(["gradcam"], ["features"])
    same, _ = data_randomisation(_model(0), _model(0), x, targets, [fn])
    other, maps = data_randomisation(_model(0), _model(1), x, targets, [fn])
    torch.testing.assert_close(same["gradcam", "features"].spearman, torch.ones(4))
    assert float(other["gradcam", "features"].spearman.mean()) < 0.9
    assert maps["gradcam", "features"].shape == (4, 4, 4)


def test_flag_rule() -> None:
    curve = np.array([0.9, 0.6, 0.2])
    assert is_flagged(curve, 2, 0.5) and not is_flagged(curve, 3, 0.5) and is_flagged(curve, 1, 0.9)
    assert is_flagged(curve[:1], 2, 0.5)  # fewer units than the depth: the last step counts
    assert not is_flagged(np.array([0.9, np.nan]), 2, 0.5) and not is_flagged(np.array([]), 1, 0.5)


def _data(n: int = 4, steps: int = 3) -> SanityData:
    rng = np.random.default_rng(0)
    sims = {s: rng.random((steps, n)).astype(np.float32) for s in ("spearman_abs", "spearman", "ssim")}
    key = ("gradcam", "layer4.1")
    return SanityData(
        attrs={"flag_metric": "ssim", "flag_depth": 2, "flag_threshold": 0.5, "class_names": ["a", "b"]},
        index=np.arange(n) * 3,
        path=[f"a/{i}.png" for i in range(n)],
        label=np.zeros(n, dtype=np.int64),
        target=np.ones(n, dtype=np.int64),
        units=["fc", "layer4.1.conv2 + layer4.1.bn2", "conv1"],
        images=np.zeros((2, 8, 8, 3), dtype=np.uint8),
        original={key: rng.random((2, 4, 4)).astype(np.float32)},
        model={"cascading": {key: {**sims, "examples": rng.random((steps, 2, 4, 4))}}},
        data={
            key: {**{s: np.full(n, 0.25, dtype=np.float32) for s in sims}, "examples": np.zeros((2, 4, 4))}
        },
    )


def test_sanity_file_round_trip_and_foreign_files(tmp_path: Path) -> None:
    data = _data()
    path = write_sanity(tmp_path / "cams" / "sanity.h5", data)
    assert sorted(p.name for p in path.parent.iterdir()) == ["sanity.h5"]  # no temp file left
    back = read_sanity(path)
    key = ("gradcam", "layer4.1")
    assert back.units == data.units and back.path == data.path and back.keys == [key]
    np.testing.assert_array_equal(back.index, data.index)
    np.testing.assert_allclose(back.model["cascading"][key]["ssim"], data.model["cascading"][key]["ssim"])
    assert back.attrs["class_names"] == ["a", "b"] and back.attrs["kind"] == "sanity"
    np.testing.assert_allclose(
        back.curve("cascading", key, "ssim"), data.model["cascading"][key]["ssim"].mean(1)
    )
    assert back.flagged(key) == is_flagged(back.curve("cascading", key, "ssim"), 2, 0.5)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["kind"] = "merged"
    with pytest.raises(SchemaError, match="not a cnncam sanity file"):
        read_sanity(tmp_path / "other.h5")
    with h5py.File(path, "a") as f:
        del f["sanity/data/gradcam/layer4.1/spearman"]
    with pytest.raises(SchemaError, match="lacks spearman"):
        read_sanity(path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(SchemaError, match="not a readable HDF5 file"):
        read_sanity(tmp_path / "junk.h5")


def test_permuted_labels_shuffle_labels_among_images() -> None:
    samples = [(f"c{i % 3}/{i}.png", i % 3) for i in range(30)]
    perm = permuted_labels(samples, seed=0)
    assert [p for p, _ in perm] == [p for p, _ in samples]  # same images, same order
    assert sorted(label for _, label in perm) == sorted(label for _, label in samples)  # same class counts
    assert perm == permuted_labels(samples, seed=0) != permuted_labels(samples, seed=1)
    assert sum(a[1] != b[1] for a, b in zip(perm, samples)) > 10


def test_the_report_side_needs_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cnncam.storage.sanity, cnncam.localisation; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_data_trains_on_permuted_labels_only_when_asked(tmp_path: Path) -> None:
    from cnncam.config import load_config
    from cnncam.data import generate_shapes
    from cnncam.runs import RunPaths
    from cnncam.train.distributed import DistInfo
    from cnncam.train.setup import build_data

    root = generate_shapes(tmp_path / "shapes", num_classes=3, per_class=8, image_size=16, seed=0)
    base = [f"runs_dir={tmp_path}", f"data.root={root}", "data.layout=single", "data.image_size=16"]
    real = build_data(load_config(None, [*base, "name=real"]), RunPaths(tmp_path / "real"), DistInfo())
    perm_cfg = load_config(None, [*base, "name=perm", "data.permute_labels=true"])
    perm = build_data(perm_cfg, RunPaths(tmp_path / "perm"), DistInfo())
    assert perm.index.splits == real.index.splits  # same seed: same split, saved with the true labels
    assert real.train.samples == real.index.splits["train"]
    assert perm.train.samples == permuted_labels(perm.index.splits["train"], perm_cfg.seed)
    assert perm.train.samples != perm.index.splits["train"]
    assert perm.val.samples == perm.index.splits["val"] and perm.test.samples == perm.index.splits["test"]


def test_report_shows_a_sanity_file_without_any_cam_file(tmp_path: Path) -> None:
    from cnncam.config import load_config
    from cnncam.report import build_report
    from cnncam.runs import RunPaths, write_config

    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    write_config(RunPaths(cfg.run_dir), cfg)
    data = _data()
    data.model["cascading"]["gradcam", "layer4.1"]["ssim"][:] = 0.9  # stays similar: flagged
    data.attrs.update(split="test", targets="pred", randomisation="units <b>top</b> first")
    write_sanity(cfg.run_dir / "cams" / "sanity.h5", data)
    page = build_report(cfg.run_dir).read_text()
    assert "Can these maps be trusted?" in page
    assert "Warning: gradcam at layer4.1 maps stay similar to the trained model&#x27;s" in page
    assert "(ssim 0.90 &gt;= 0.5) after the top 2 unit(s) (fc, layer4.1.conv2 + layer4.1.bn2)" in page
    assert "units &lt;b&gt;top&lt;/b&gt; first" in page  # file text is escaped
    assert "train on permuted labels" in page and "sanity_curves.png" in page
    (cfg.run_dir / "cams" / "sanity.h5").write_bytes(b"damaged")
    page = build_report(cfg.run_dir).read_text()
    assert "sanity checks not shown" in page  # a damaged file is a note, not a failed report
