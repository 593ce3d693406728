"""The non-cnncam variants of ``cam_throughput.py`` and the data/model plumbing all variants share.

Moved out of ``cam_throughput.py`` (which holds the cnncam variants, the child/parent harness and
the table) to keep it short; that script imports this module from its own folder.  Variants:
  a  forward only (``torch.inference_mode``), nothing written: the ceiling
  d  the seeds' loop: forward + backward hooks, ``loss.backward()`` per image, numpy weights,
     cv2 resize (PIL without OpenCV), one image at a time; maps written with plain h5py
  e  pytorch-grad-cam's batched ``GradCAM``; maps written with plain h5py
  f  captum ``LayerGradCam`` (+ a forward for the predicted class)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 10
LAYER = "layer4"


# ----------------------------------------------------------------------------------------------
# Shared by every variant


class InMemoryDataset(Dataset[tuple[Tensor, int, int, Tensor]]):
    """Preloaded images (N, 3, S, S): ``ds[i]`` -> (image, label, index, NaN box) like the export's."""

    boxes = None  # the export then stores NaN boxes and skips box metrics

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels
        self.nan_box = torch.full((4,), float("nan"))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, Tensor]:
        return self.images[i], int(self.labels[i]), i, self.nan_box


def batches(ds: InMemoryDataset, batch: int) -> Iterator[tuple[int, Tensor]]:
    """(first index, images (B, 3, S, S)) through the same DataLoader the export uses."""
    for images, _, index, _ in DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0):
        yield int(index[0]), images


def load_model(work: Path) -> nn.Module:
    """The run's model (resnet18, or the demo's simple_cnn) from its checkpoint, as the export loads it."""
    from cnncam.config import load_config
    from cnncam.models import create_model
    from cnncam.train.checkpoint import load_checkpoint

    cfg = load_config(work / "run" / "config.yaml")
    model = create_model(cfg.model, NUM_CLASSES)
    model.load_state_dict(load_checkpoint(work / "run" / "checkpoints" / "best.pt")["model"])
    return model.eval()


def maps_file(path: Path, n: int, shape: tuple[int, ...]) -> Any:
    """A plain h5py file with one float32 dataset ``cams`` (n, *shape), as users write it."""
    import h5py

    f = h5py.File(path, "w")
    return f, f.create_dataset("cams", (n, *shape), dtype="float32")


# ----------------------------------------------------------------------------------------------
# The baselines (a, d, e, f): (work dir, dataset, batch size) -> output file or None


def run_forward(work: Path, ds: InMemoryDataset, batch: int) -> Path | None:
    model = load_model(work)
    with torch.inference_mode():
        for _, images in batches(ds, batch):
            model(images).argmax(1)
    return None


def run_seed_loop(work: Path, ds: InMemoryDataset, batch: int) -> Path | None:
    """What the seeds do (e.g. seeds/001): hooks, backward per image, numpy, resize, write."""
    model = load_model(work)
    saved: dict[str, Tensor] = {}
    layer = dict(model.named_modules())[LAYER]
    layer.register_forward_hook(lambda m, i, o: saved.__setitem__("act", o.detach()))
    layer.register_full_backward_hook(lambda m, gi, go: saved.__setitem__("grad", go[0].detach()))
    size = ds.images.shape[-1]
    out = work / f"out-seed-{os.getpid()}.h5"
    f, dset = maps_file(out, len(ds), (size, size))
    with f:
        for first, images in batches(ds, batch):
            for j in range(len(images)):
                model.zero_grad()
                logits = model(images[j : j + 1])
                one_hot = torch.zeros_like(logits)
                one_hot[0, int(logits.argmax(1))] = 1
                logits.backward(gradient=one_hot)
                act, grad = saved["act"].numpy()[0], saved["grad"].numpy()[0]
                cam = np.maximum((grad.mean((1, 2))[:, None, None] * act).sum(0), 0)
                cam = cam / cam.max() if cam.max() > 0 else cam
                dset[first + j] = _resize(cam.astype(np.float32), size)
    return out


def _resize(cam: np.ndarray, size: int) -> np.ndarray:
    try:
        import cv2

        return cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(cam).resize((size, size), Image.Resampling.BILINEAR))


def run_grad_cam(work: Path, ds: InMemoryDataset, batch: int) -> Path | None:
    from pytorch_grad_cam import GradCAM

    model = load_model(work)
    size = ds.images.shape[-1]
    out = work / f"out-gradcam-{os.getpid()}.h5"
    f, dset = maps_file(out, len(ds), (size, size))
    with f, GradCAM(model=model, target_layers=[dict(model.named_modules())[LAYER]]) as cam:
        for first, images in batches(ds, batch):
            dset[first : first + len(images)] = cam(input_tensor=images, targets=None)  # None: top-1
    return out


def run_captum(work: Path, ds: InMemoryDataset, batch: int) -> Path | None:
    from captum.attr import LayerGradCam

    model = load_model(work)
    lgc = LayerGradCam(model, dict(model.named_modules())[LAYER])
    out = work / f"out-captum-{os.getpid()}.h5"
    h = ds.images.shape[-1] // 32  # resnet layer4: stride 32
    f, dset = maps_file(out, len(ds), (1, h, h))
    with f:
        for first, images in batches(ds, batch):
            with torch.no_grad():
                pred = model(images).argmax(1)
            maps = lgc.attribute(images, target=pred, relu_attributions=True)
            dset[first : first + len(images)] = maps.detach().numpy()
    return out
