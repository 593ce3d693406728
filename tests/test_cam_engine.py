"""CamEngine behaviour: batching, model state, hooks, no-grad callers, precision, memory."""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any

import pytest
import torch
from test_cam_helpers import ALL_METHODS, GRAD_METHODS, images, no_hooks_left, simple_gap, vgg_like
from torch import Tensor, nn

from cnncam.cam import CamEngine, compute_cams
from cnncam.config import CamConfig
from cnncam.errors import CamError


def _close(a: dict[Any, Tensor], b: dict[Any, Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=str(key), **tol)


@pytest.mark.parametrize("make", [simple_gap, vgg_like], ids=["gap", "vgg"])
def test_batched_equals_one_by_one(make: Any) -> None:
    model = make()
    x = images(4, 16)
    targets = torch.tensor([[0, 3], [4, 4], [2, 0], [1, 2]])  # per image, mixed classes
    methods = [m for m in ALL_METHODS if m != "cam" or make is simple_gap]
    with CamEngine(model, methods=methods, scorecam_batch_size=5) as engine:
        batch = engine(x, targets=targets)
        singles = [engine(x[i : i + 1], targets=targets[i : i + 1]) for i in range(4)]
    assert batch.targets.tolist() == targets.tolist()
    for key, maps in batch.maps.items():
        assert maps.shape[:2] == (4, 2)
        torch.testing.assert_close(
            # eigencam's float32 SVD differs by ~4e-6 of the map's range between batch sizes
            maps,
            torch.cat([s.maps[key] for s in singles]),
            rtol=1e-4,
            atol=1e-5,
            msg=str(key),
        )
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), rtol=1e-5, atol=1e-6)


def test_state_restored_and_no_parameter_grads() -> None:
    model = simple_gap()
    model.train()
    model.features[1].eval()  # a mixed state (frozen BN) must survive, not become model.train()
    model.fc.weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    batch = compute_cams(model, images(3, 16), GRAD_METHODS + ("cam",), targets="topk:2", fast_path=False)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == before
    assert [m.training for m in model.modules()] == modes
    assert no_hooks_left(model)
    assert all(not t.requires_grad and t.grad_fn is None for t in [batch.logits, *batch.maps.values()])


def test_frozen_model_no_grad_and_inference_mode_callers() -> None:
    model = simple_gap()
    x = images(2, 16)
    reference = compute_cams(model, x, GRAD_METHODS, targets="all", fast_path=False).maps
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = compute_cams(model, x, GRAD_METHODS, targets="all", fast_path=False).maps
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        no_grad = compute_cams(model, x, GRAD_METHODS, targets="all", fast_path=False).maps
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor, as a DataLoader under inference_mode yields
        inference = compute_cams(model, x_inf, GRAD_METHODS, targets="all", fast_path=False).maps
    for other in (frozen, no_grad, inference):
        _close(reference, other, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


class Boom(nn.Module):
    """Identity until armed, then raises (a failure in the middle of a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_hooks_removed_and_state_restored_after_exception_mid_forward() -> None:
    model = simple_gap()
    model.add_module("boom", Boom())  # runs after fc; harmless during the probe
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with CamEngine(model, layers=["features", "features.2"], record_activations=["features.0"]) as engine:
            engine.prepare(images(1, 16))
            assert not no_hooks_left(model)  # the hooks really were there
            model.boom.armed = True
            engine(images(2, 16))
    assert no_hooks_left(model)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    model.boom.armed = False
    with pytest.raises(CamError, match="unknown layer"):  # failing in prepare restores too
        with CamEngine(model, layers=["nope"]) as engine:
            engine(images(2, 16))
    assert no_hooks_left(model) and model.training


def test_inplace_relu_after_target_layer_is_safe() -> None:
    plain, inplace = simple_gap(inplace=False), simple_gap(inplace=True)
    x = images(3, 16)
    kw: dict[str, Any] = dict(
        layers=["features.4"], targets="all", record_activations=["features.4"], fast_path=False
    )
    a = compute_cams(plain, x, GRAD_METHODS + ("eigencam", "scorecam"), **kw)
    b = compute_cams(inplace, x, GRAD_METHODS + ("eigencam", "scorecam"), **kw)
    _close(a.maps, b.maps, rtol=1e-5, atol=1e-7)
    # the recorded conv output is the pre-ReLU tensor, untouched by the in-place ReLU after it
    assert (b.activations["features.4"] < 0).any()
    torch.testing.assert_close(b.activations["features.4"], a.activations["features.4"])


def test_multiple_layers_in_one_forward_match_separate_runs() -> None:
    model = simple_gap()
    x = images(2, 16)
    both = compute_cams(model, x, GRAD_METHODS, layers=["features.2", "features"], targets="topk:2")
    for layer in ("features.2", "features"):
        alone = compute_cams(model, x, GRAD_METHODS, layers=[layer], targets="topk:2")
        for m in GRAD_METHODS:
            torch.testing.assert_close(both.maps[(m, layer)], alone.maps[(m, layer)], rtol=1e-5, atol=1e-7)
    assert list(both.maps)[0] == ("gradcam", "features.2")


def test_record_activations_any_layer() -> None:
    model = simple_gap()
    x = images(2, 16)
    batch = compute_cams(model, x, ["gradcam"], record_activations=["features.0", "features"])
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(batch.activations["features.0"], model.features[0](x))
        torch.testing.assert_close(batch.activations["features"], model.features(x))


def test_gradient_free_methods_build_no_graph() -> None:
    model = simple_gap()
    seen: list[bool] = []
    with CamEngine(model, methods=["eigencam", "scorecam"]) as engine:
        engine.prepare(images(1, 16))
        handle = model.features.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
        engine(images(2, 16))
        handle.remove()
    assert seen[0] is False  # the main forward; Score-CAM forwards follow


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_half_precision_autocast_on_cpu_close_to_fp32(precision: str, fast_path: bool) -> None:
    model = simple_gap()
    x = images(4, 16)
    methods = ["gradcam", "layercam", "eigencam", "cam"]
    ref = compute_cams(model, x, methods, targets="topk:2", fast_path=False)
    half = compute_cams(model, x, methods, targets=ref.targets, precision=precision, fast_path=fast_path)
    assert half.fast_path == {"features": fast_path}
    for key, maps in half.maps.items():
        assert maps.dtype == torch.float32  # float32 accumulation whatever the autocast dtype
        scale = ref.maps[key].abs().amax()
        assert float((maps - ref.maps[key]).abs().amax()) < 0.05 * float(scale), key
    assert half.logits.dtype == torch.float32
    torch.testing.assert_close(half.logits, ref.logits, rtol=0.05, atol=0.05)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some torch proxies warns
        return sum(1 for o in gc.get_objects() if isinstance(o, Tensor))


def test_no_memory_growth_over_batches() -> None:
    model = simple_gap()
    refs: list[weakref.ref[Tensor]] = []
    counts = []
    with CamEngine(model, methods=["gradcam", "hirescam", "scorecam"], fast_path=False) as engine:
        engine.prepare(images(1, 16))
        # Runs after the engine's hook, so it sees the tensor handed downstream (part of the graph).
        handle = model.features.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)) or None)
        for i in range(20):
            batch = engine(images(2, 16, seed=i), targets="topk:2")
            assert batch.maps[("gradcam", "features")].shape == (2, 2, 4, 4)
            del batch
            if i in (2, 19):
                counts.append(_live_tensors())
        handle.remove()
        assert not engine._acts and not engine._records  # nothing kept between calls
    assert all(r() is None for r in refs)  # every batch's graph tensors are gone
    assert counts[1] <= counts[0]


def test_engine_argument_errors() -> None:
    model = simple_gap()
    with pytest.raises(CamError, match="did you mean 'gradcam'"):
        CamEngine(model, methods=["gradcm"])
    with pytest.raises(CamError, match="Valid choices: fp32, bf16, fp16"):
        CamEngine(model, precision="fp64")
    engine = CamEngine(model)
    with pytest.raises(CamError, match="context manager"):
        engine(images(1, 16))
    with engine, pytest.raises(CamError, match="non-empty tensor"):
        engine(torch.zeros(0, 3, 16, 16))
    with pytest.raises(CamError, match="'cam' needs global average pooling"):
        compute_cams(vgg_like(), images(1, 16), ["cam"])


def test_target_errors_surface_from_engine() -> None:
    model = simple_gap()
    x = images(3, 16)
    with pytest.raises(CamError, match="2 rows but the batch has 3"):
        compute_cams(model, x, targets=[1, 2])
    with pytest.raises(CamError, match="class 7 is out of range: the model has 5 classes"):
        compute_cams(model, x, targets="class:7")
    with pytest.raises(CamError, match="needs the true labels"):
        compute_cams(model, x, targets="label")
    batch = compute_cams(model, x, targets="label", labels=torch.tensor([4, 0, 2]))
    assert batch.targets.tolist() == [[4], [0], [2]]


def test_from_config_and_batch_properties() -> None:
    model = simple_gap()
    cfg = CamConfig(methods=("gradcam", "cam"), layers=("auto",), activations=("features.0",))
    with CamEngine.from_config(model, cfg) as engine:
        batch = engine(images(2, 16), targets="topk:3")
        assert engine.layers == ("features",)
    assert set(batch.activations) == {"features.0"}
    torch.testing.assert_close(batch.probs.sum(1), torch.ones(2))
    assert batch.preds.tolist() == batch.targets[:, 0].tolist()
    torch.testing.assert_close(batch.target_scores, batch.logits.topk(3).values)
