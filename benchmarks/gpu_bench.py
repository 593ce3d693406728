"""GPU throughput: training fp32 vs bf16 + channels_last, and CAM export vs forward-only.

Run by ``benchmarks/gpu_check.sh`` on a GPU node (or by hand)::

    python benchmarks/gpu_bench.py --out gpu_bench.json            # ResNet-50 at 224 px on cuda:0
    python benchmarks/gpu_bench.py --smoke --device cpu             # tiny sizes: checks the script

What it measures, side by side in one process (the order alternates to spread clock drift):

* training images/s of cnncam's step (``Precision`` autocast/GradScaler, AdamW, cross entropy)
  on device-resident random batches, so the data pipeline is not what is measured — fp32 against
  bf16 + channels_last (goal ≥ 1.8×);
* CAM throughput of :class:`cnncam.cam.CamEngine` (Grad-CAM, top-1) against a forward-only
  ``inference_mode`` pass of the same model and batch (goal ≥ 0.9×), with the peak CUDA memory of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnncam.cam import CamEngine  # noqa: E402
from cnncam.config import ModelConfig  # noqa: E402
from cnncam.models import create_model  # noqa: E402
from cnncam.train.precision import Precision  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], object], batch: int, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - t0)


def _peak_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def train_rate(
    model_name: str, mode: str, channels_last: bool, a: argparse.Namespace, dev: torch.device
) -> float:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=model_name), 1000).to(dev)  # type: ignore[arg-type]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    prec = Precision(mode, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (a.batch,), device=dev)

    def step() -> None:
        with prec.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        prec.backward_step(loss, opt, params, None)

    return _rate(step, a.batch, a.warmup, a.iters, dev)


def cam_rates(model_name: str, a: argparse.Namespace, dev: torch.device) -> dict[str, float | None]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=model_name), 1000).to(dev).eval()  # type: ignore[arg-type]
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)

    def forward() -> None:
        with torch.inference_mode():
            model(x).argmax(1)

    out: dict[str, float | None] = {}
    out["forward_mb"] = _peak_mb(dev, forward)
    out["forward_img_s"] = _rate(forward, a.batch, a.warmup, a.iters, dev)
    with CamEngine(model, ["auto"], ["gradcam"]) as engine:

        def cams() -> None:
            engine(x, "pred")

        out["cam_mb"] = _peak_mb(dev, cams)
        out["cam_img_s"] = _rate(cams, a.batch, a.warmup, a.iters, dev)
    out["forward_img_s_again"] = _rate(forward, a.batch, a.warmup, a.iters, dev)
    fwd = (out["forward_img_s"] + out["forward_img_s_again"]) / 2  # type: ignore[operator]
    out["cam_vs_forward"] = out["cam_img_s"] / fwd  # type: ignore[operator]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.batch, a.size, a.warmup, a.iters = "resnet18", 4, 64, 1, 2
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": a.model,
        "batch": a.batch,
        "size": a.size,
    }
    # fp32 / bf16 / fp32 again: the ratio uses the mean of the two fp32 runs.
    fp32 = train_rate(a.model, "fp32", False, a, dev)
    bf16 = train_rate(a.model, "bf16", True, a, dev)
    fp32b = train_rate(a.model, "fp32", False, a, dev)
    result["train_img_s"] = {"fp32": fp32, "bf16_channels_last": bf16, "fp32_again": fp32b}
    result["train_bf16_vs_fp32"] = bf16 / ((fp32 + fp32b) / 2)
    result["cam"] = cam_rates(a.model, a, dev)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
