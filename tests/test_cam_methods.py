"""Each CAM formula against values computed by hand (numpy), never by the code under test."""

from __future__ import annotations

import re
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cam_helpers import ALL_METHODS, GRAD_METHODS, OneConv, images, simple_gap

from cnncam.cam import CamInputs, compute_cams, run_method
from cnncam.cam.methods import METHODS, get_method
from cnncam.config import CamMethod
from cnncam.errors import CamError


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def test_registry_is_the_config_literal() -> None:
    assert tuple(METHODS) == get_args(CamMethod) == ALL_METHODS
    assert {m for m, s in METHODS.items() if s.needs_grads} == set(GRAD_METHODS)
    assert METHODS["cam"].needs_head and METHODS["scorecam"].needs_forward
    assert not METHODS["eigencam"].needs_grads


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(CamError, match=r"did you mean 'gradcam_pp'.*Valid choices: gradcam, gradcam_pp"):
        get_method("gradcam++")


# ---------------------------------------------------------------------------------------------
# The reference case: one hand-set 1x1 conv on torch.arange input, in-place ReLU, flatten, fc.


def _reference() -> dict[str, np.ndarray]:
    """Activations, gradients and expected maps for OneConv on arange inputs, in numpy."""
    x = np.stack([np.arange(9.0).reshape(3, 3), 8.0 - np.arange(9.0).reshape(3, 3)])  # (N=2, 3, 3)
    acts = np.stack([1.0 * x, -0.5 * x + 1.0], axis=1)  # conv: w = (1, -0.5), b = (0, 1) -> (2, 2, 3, 3)
    j = np.arange(18.0)
    fc = np.stack([((c + 1) * (j % 5) - 2) / 10 for c in range(3)])  # (3, 18)
    targets = np.array([[0, 2], [1, 1]])
    # logits = fc @ flatten(relu(A)) + b, so d logit_c / dA = fc[c] reshaped, masked by A > 0.
    grads = np.stack([[fc[c].reshape(2, 3, 3) * (acts[n] > 0) for c in targets[n]] for n in range(2)])
    return {"x": x, "acts": acts, "grads": grads, "targets": targets}


def _expected(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Signed map (h, w) of one image/target: a (C, h, w), g (C, h, w)."""
    if method == "gradcam":
        return np.einsum("c,chw->hw", g.mean((1, 2)), a)
    if method == "hirescam":
        return (g * a).sum(0)
    if method == "layercam":
        return (relu(g) * a).sum(0)
    if method == "xgradcam":
        w = (g * a / (a.sum((1, 2))[:, None, None] + 1e-7)).sum((1, 2))
        return np.einsum("c,chw->hw", w, a)
    if method == "gradcam_pp":
        s = a.sum((1, 2))[:, None, None]
        alpha = g**2 / (2 * g**2 + s * g**3 + 1e-6)
        alpha = np.where(g != 0, alpha, 0.0)
        w = (alpha * relu(g)).sum((1, 2))
        return np.einsum("c,chw->hw", w, a)
    raise AssertionError(method)


@pytest.mark.parametrize("relu_maps", [True, False])
def test_gradient_methods_match_hand_computed_reference(relu_maps: bool) -> None:
    ref = _reference()
    model = OneConv()
    x = torch.tensor(ref["x"], dtype=torch.float32)[:, None]
    targets = torch.tensor(ref["targets"])
    batch = compute_cams(
        model,
        x,
        GRAD_METHODS,
        layers=["conv"],
        targets=targets,
        relu=relu_maps,
        fast_path=False,
        record_activations=["conv"],
    )
    np.testing.assert_allclose(batch.activations["conv"].numpy(), ref["acts"], rtol=0, atol=1e-6)
    assert batch.targets.tolist() == ref["targets"].tolist()
    for method in GRAD_METHODS:
        expected = np.stack(
            [[_expected(method, ref["acts"][n], ref["grads"][n, k]) for k in range(2)] for n in range(2)]
        )
        if relu_maps:
            expected = relu(expected)
        got = batch.maps[(method, "conv")]
        assert got.shape == (2, 2, 3, 3) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=method)
    if not relu_maps:
        assert (batch.maps[("hirescam", "conv")] < 0).any()  # the signed sum really is signed


def test_grad_layouts_agree() -> None:
    """A spatially constant gradient given as (N, K, C, 1, 1) equals the expanded (N, K, C, h, w)."""
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(2, 4, 5, 5, generator=g)
    const = torch.randn(2, 3, 4, 1, 1, generator=g)
    targets = torch.zeros(2, 3, dtype=torch.long)
    for method in GRAD_METHODS:
        small = run_method(method, CamInputs(acts, targets, const), relu=False)
        full = run_method(
            method, CamInputs(acts, targets, const.expand(2, 3, 4, 5, 5).contiguous()), relu=False
        )
        torch.testing.assert_close(small, full, rtol=1e-5, atol=1e-6, msg=method)


def test_cam_is_gradcam_times_hw_on_gap_model() -> None:
    model = simple_gap()
    x = images(3, 16)
    batch = compute_cams(model, x, ["cam", "gradcam"], targets="all", fast_path=False)
    cam, grad = batch.maps[("cam", "features")], batch.maps[("gradcam", "features")]
    hw = cam.shape[-1] * cam.shape[-2]
    torch.testing.assert_close(cam, grad * hw, rtol=1e-4, atol=1e-5)
    # and CAM itself is W[c] . A (Zhou et al. Eq. 2), checked in numpy
    feats = model.features.eval()(x).detach().numpy()
    w = model.fc.weight.detach().numpy()
    expected = relu(np.einsum("kc,nchw->nkhw", w, feats))
    np.testing.assert_allclose(cam.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_eigencam_matches_numpy_svd() -> None:
    g = torch.Generator().manual_seed(3)
    acts = torch.rand(3, 6, 4, 5, generator=g)
    targets = torch.tensor([[0, 1], [2, 2], [1, 0]])
    got = run_method("eigencam", CamInputs(acts, targets), relu=False)
    assert got.shape == (3, 2, 4, 5)
    for n in range(3):
        a = acts[n].numpy().astype(np.float64)
        rows = a.reshape(6, -1).T
        rows = rows - rows.mean(0)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        proj = rows @ vt[0]
        mean_map = a.mean(0).ravel()
        if np.dot(proj - proj.mean(), mean_map - mean_map.mean()) < 0:
            proj = -proj
        for k in range(2):
            np.testing.assert_allclose(got[n, k].numpy().ravel(), proj, rtol=1e-4, atol=1e-5)
    relued = run_method("eigencam", CamInputs(acts, targets))
    torch.testing.assert_close(relued, got.clamp(min=0))


def test_scorecam_matches_slow_per_channel_loop() -> None:
    model = simple_gap(classes=4, channels=(3, 4)).eval()
    x = images(2, 8)
    targets = torch.tensor([[1, 3], [0, 0]])
    batch = compute_cams(
        model,
        x,
        ["scorecam"],
        layers=["features"],
        targets=targets,
        record_activations=["features"],
        scorecam_batch_size=3,
    )
    acts = batch.activations["features"]
    expected = torch.zeros(2, 2, *acts.shape[-2:])
    with torch.no_grad():
        for n in range(2):
            for k in range(2):
                scores = []
                for c in range(acts.shape[1]):
                    up = F.interpolate(
                        acts[n, c][None, None], size=(8, 8), mode="bilinear", align_corners=False
                    )
                    mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                    scores.append(model(x[n : n + 1] * mask)[0, targets[n, k]])
                weights = torch.softmax(torch.stack(scores), 0)
                expected[n, k] = torch.relu(sum(weights[c] * acts[n, c] for c in range(acts.shape[1])))
    torch.testing.assert_close(batch.maps[("scorecam", "features")], expected, rtol=1e-5, atol=1e-6)


def test_missing_inputs_raise_cam_error() -> None:
    acts = torch.rand(1, 2, 3, 3)
    targets = torch.zeros(1, 1, dtype=torch.long)
    for method in ("gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"):
        with pytest.raises(CamError, match=f"^method '{method}' needs gradients but none were computed$"):
            run_method(method, CamInputs(acts, targets))
    with pytest.raises(CamError, match=r"^method 'cam' needs the linear head's weights \(GAP \+ Linear"):
        run_method("cam", CamInputs(acts, targets))
    with pytest.raises(CamError, match="^method 'scorecam' needs the input images and a forward function$"):
        run_method("scorecam", CamInputs(acts, targets))
    # Images alone are not enough: Score-CAM runs forward passes of the masked images.
    with pytest.raises(CamError, match="^method 'scorecam' needs"):
        run_method("scorecam", CamInputs(acts, targets, images=torch.rand(1, 3, 6, 6)))


@pytest.mark.parametrize(
    ("spelling", "ours"),
    [
        ("Grad-CAM", "gradcam"),
        ("Layer CAM", "layercam"),
        ("Score-CAM", "scorecam"),
        ("gradcam++", "gradcam_pp"),
    ],
)
def test_other_libraries_spellings_suggest_our_name(spelling: str, ours: str) -> None:
    expected = f"unknown CAM method {spelling!r}; did you mean {ours!r}? Valid choices: "
    with pytest.raises(CamError, match="^" + re.escape(expected)):
        get_method(spelling)


def test_an_unknown_name_lists_every_method() -> None:
    with pytest.raises(CamError, match="^unknown CAM method 'nope' Valid choices: gradcam, gradcam_pp, "):
        get_method("nope")
