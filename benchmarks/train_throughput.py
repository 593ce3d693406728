"""Training-loop overhead: cnncam's loop vs a bare hand-written loop, same settings, side by side.

    python benchmarks/train_throughput.py [--data data/shapes] [--epochs 3] [--workers 2]
    python benchmarks/train_throughput.py --model resnet50 --size 224 --device cuda   # on a GPU
    python benchmarks/train_throughput.py --set model.channels=[32,64,128] --set model.convs_per_block=1

Both loops train the same model class on the same images with the same transforms, batch size,
optimizer and precision; epochs alternate between the two so machine noise hits both alike.
The bare loop is what the seed notebooks do: a plain Dataset (PIL open + transform), DataLoader
with shuffle=True, autocast, backward, step.  cnncam's adds the resumable sampler, per-sample
RNG seeding, device-side metric sums (read every log_every steps), stop-flag polling and
metrics.jsonl lines.  Reported: images/s and
cnncam/bare ratio per setting (fp32, and bf16 + channels_last).  Goal: overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cnncam.config import RunConfig, load_config
from cnncam.data import generate_shapes
from cnncam.runs import RunPaths
from cnncam.stop import StopFlag
from cnncam.train.distributed import DistInfo
from cnncam.train.precision import Precision, numerics
from cnncam.train.trainer import Trainer


class PlainImages(Dataset):
    """What a notebook writes: open, convert, transform."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], transform: object) -> None:
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(self.root / path) as im:
            return self.transform(im.convert("RGB")), label  # type: ignore[operator]


def bare_epoch(
    trainer: Trainer, loader: DataLoader, device: torch.device, prec: Precision, cl: bool
) -> float:
    model, opt = trainer.model, trainer.optimizer
    model.train()
    fmt = torch.channels_last if cl else torch.contiguous_format
    n, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        with prec.autocast():
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        prec.backward_step(loss, opt, trainer.params, None)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def cnncam_epoch(trainer: Trainer) -> float:
    n = len(trainer.sampler.global_batches(trainer.epoch)) * trainer.cfg.data.batch_size
    start = time.perf_counter()
    trainer._train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    trainer.epoch, trainer.batch = trainer.epoch + 1, 0
    trainer.sums.zero_()  # what _end_epoch does after its (validation) work, which is not timed here
    return n / elapsed


def measure(cfg: RunConfig, epochs: int, device: torch.device) -> tuple[list[float], list[float]]:
    trainer = Trainer(cfg, DistInfo(), device, StopFlag())
    tf = trainer.data.train.transform
    plain = PlainImages(Path(cfg.data.root), trainer.data.index.splits["train"], tf)
    loader = DataLoader(
        plain,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    prec = Precision(cfg.train.precision, device)
    bare_epoch(trainer, loader, device, prec, cfg.train.channels_last)  # warm-up both
    cnncam_epoch(trainer)
    ours, bare = [], []
    for _ in range(epochs):
        ours.append(cnncam_epoch(trainer))
        bare.append(bare_epoch(trainer, loader, device, prec, cfg.train.channels_last))
    return ours, bare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="image folder (default: generate demo shapes)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", default=None, help="override model.name, e.g. resnet50")
    ap.add_argument("--size", type=int, default=None, help="override data.image_size")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--set", action="append", default=[], help="extra config override, e.g. model.channels=[8,16]"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cnncam-bench-"))
    data = args.data
    if data is None:
        data = tmp / "shapes"
        generate_shapes(data, num_classes=4, per_class=150, image_size=64, seed=0)
    base = [
        f"data.root={data}",
        f"runs_dir={tmp / 'runs'}",
        f"data.num_workers={args.workers}",
        "train.log_every=5",
        f"train.device={args.device}",
        f"train.epochs={args.epochs + 2}",
    ]
    if args.model:
        base.append(f"model.name={args.model}")
    if args.size:
        base += [f"data.image_size={args.size}", f"data.resize={args.size}"]
    if args.batch_size:
        base.append(f"data.batch_size={args.batch_size}")
    base += args.set
    settings = {
        "fp32": ["train.precision=fp32"],
        "bf16+channels_last": ["train.precision=bf16", "train.channels_last=true"],
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, python {sys.version.split()[0]}"
    )
    print("| setting | cnncam img/s | bare img/s | cnncam / bare |\n|---|---|---|---|")
    for name, extra in settings.items():
        cfg = load_config(args.config, [*base, f"name=bench-{name.replace('+', '-')}", *extra])
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        RunPaths(cfg.run_dir).root.mkdir(parents=True, exist_ok=True)
        with numerics(cfg.train.deterministic, device):  # cuDNN autotuning on GPUs, as run_training
            ours, bare = measure(cfg, args.epochs, device)
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"| {name} | {o:.1f} | {b:.1f} | {o / b:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
