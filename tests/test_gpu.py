"""CUDA-only checks (``pytest -m gpu``; skipped where no CUDA device is visible).

They cover what the CPU suite cannot: fp16 loss scaling on a real GradScaler, bf16 autocast on the
GPU, the CUDA RNG in checkpoints and exact resume, CAM export on CUDA against the CPU, and the
pinned-memory host-to-device path.  ``benchmarks/gpu_check.sh`` runs them on a GPU node.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from train_helpers import StopAfter, assert_bit_identical, state_of, tiny_config, tiny_dataset

from cnncam.train.precision import Precision

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )


def test_fp16_scaler_scales_the_backward_and_steps_with_true_gradients() -> None:
    prec = Precision("fp16", CUDA)
    assert prec.scaler.is_enabled() and prec.scaler.get_scale() > 1
    scale = prec.scaler.get_scale()
    net, ref = _tiny_net().to(CUDA), _tiny_net().to(CUDA)
    x, y = torch.randn(16, 3, 16, 16, device=CUDA), torch.randint(0, 4, (16,), device=CUDA)
    seen: list[float] = []
    net[4].weight.register_hook(lambda g: seen.append(float(g.norm())))  # the gradient autograd produced

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with prec.autocast():
        loss = nn.functional.cross_entropy(net(x).float(), y)
    prec.backward_step(loss, opt, list(net.parameters()), clip=None)

    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    nn.functional.cross_entropy(ref(x), y).backward()
    true_norm = float(ref[4].weight.grad.norm())  # type: ignore[union-attr]
    ref_opt.step()
    # The backward ran on the scaled loss; the optimizer saw the unscaled gradient.
    assert seen[0] == pytest.approx(true_norm * scale, rel=2e-2)
    assert torch.allclose(net[4].weight, ref[4].weight, atol=1e-3)


def test_fp16_scaler_skips_a_step_on_inf_and_halves_the_scale() -> None:
    prec = Precision("fp16", CUDA)
    net = _tiny_net().to(CUDA)
    before = [p.detach().clone() for p in net.parameters()]
    scale = prec.scaler.get_scale()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with prec.autocast():
        loss = net(torch.randn(2, 3, 8, 8, device=CUDA)).float().sum() * float("inf")
    prec.backward_step(loss, opt, list(net.parameters()), clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert prec.scaler.get_scale() == scale / 2


def test_bf16_autocast_runs_in_bf16_without_a_scaler() -> None:
    prec = Precision("bf16", CUDA)
    assert not prec.scaler.is_enabled()
    with prec.autocast():
        out = _tiny_net().to(CUDA)[0](torch.randn(2, 3, 8, 8, device=CUDA))
    assert out.dtype == torch.bfloat16


def test_cuda_rng_is_checkpointed_and_resume_is_exact_in_deterministic_mode(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data")
    common = ("train.device=cuda", "train.deterministic=true", "model.dropout=0.5")
    from cnncam.train import run_training

    straight = tiny_config(tmp_path, data, *common, name="straight")
    run_training(straight)
    parts = tiny_config(tmp_path, data, *common, name="parts")
    assert run_training(parts, StopAfter(3)).status == "interrupted"
    ckpt = torch.load(parts.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"][0]["cuda"]) == torch.cuda.device_count()  # CUDA generator states saved
    assert run_training(parts).status == "completed"
    assert_bit_identical(state_of(straight.run_dir), state_of(parts.run_dir))


def test_pinned_memory_path_is_used_on_cuda(tmp_path: Path) -> None:
    from cnncam.runs import RunPaths
    from cnncam.train import distributed as D
    from cnncam.train.sampler import EpochBatchSampler
    from cnncam.train.setup import build_data, train_loader

    cfg = tiny_config(tmp_path, tiny_dataset(tmp_path / "data"), "data.pin_memory=true")
    data = build_data(cfg, RunPaths(cfg.run_dir), D.DistInfo())
    sampler = EpochBatchSampler(len(data.train), cfg.data.batch_size, cfg.seed)
    loader = train_loader(data.train, sampler, cfg, CUDA)
    images, _, _ = next(iter(loader))
    assert loader.pin_memory and images.is_pinned()


def test_cam_export_on_cuda_equals_the_cpu_export(tmp_path: Path) -> None:
    from cnncam.cam.export import export
    from cnncam.train import run_training

    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, "train.epochs=1", "cam.methods=[gradcam,gradcam_pp,layercam]")
    run_training(cfg)
    # Convolutions may use TF32 on Ampere+ GPUs by default; switch it off to compare fp32 with fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for device in ("cpu", "cuda"):
        c = tiny_config(
            tmp_path,
            data,
            "train.epochs=1",
            "cam.methods=[gradcam,gradcam_pp,layercam]",
            f"train.device={device}",
            f"cam.out={tmp_path / device}",
        )
        path = export(c)
        with h5py.File(path, "r") as f:
            out[device] = {k: np.asarray(f["cams"][k]["features"]) for k in f["cams"]}
    assert out["cpu"].keys() == out["cuda"].keys() == {"gradcam", "gradcam_pp", "layercam"}
    for method, cpu in out["cpu"].items():
        gpu = out["cuda"][method].astype(np.float32)
        scale = max(float(np.abs(cpu).max()), 1e-12)
        # Stated tolerance: maps are stored as float16, so two fp32 results that differ in the last
        # bits may round one float16 step apart (2**-10 relative): allow two steps of the range.
        assert np.abs(gpu - cpu.astype(np.float32)).max() <= 2 * 2**-10 * scale, method


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam", "eigencam"])
def test_engine_maps_on_cuda_equal_cpu_maps_in_fp32(method: str) -> None:
    from cnncam.cam import compute_cams
    from cnncam.models import SimpleCNN

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = SimpleCNN(5, channels=(8, 16)).eval()
    images = torch.randn(8, 3, 32, 32)
    cpu = compute_cams(model, images, [method], ["features"], targets="all").maps[method, "features"]
    gpu = compute_cams(model.to(CUDA), images.to(CUDA), [method], ["features"], targets="all")
    g = gpu.maps[method, "features"].cpu()
    # Stated tolerance: 1e-4 of the map's range (fp32 on both devices, TF32 off).
    assert torch.allclose(g, cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))
