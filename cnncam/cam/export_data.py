"""What the CAM export reads: the run's checkpoint and saved split, images with their boxes.

Everything here is about *inputs* (checkpoint, model, split, boxes) and moving a batch's results
to the host; :mod:`cnncam.cam.export` drives the loop and the HDF5 writer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from cnncam.config import DataConfig, ModelConfig, RunConfig, from_dict
from cnncam.data import ImageDataset, Sample, box_to_input, eval_transform, load_boxes, load_index
from cnncam.errors import CheckpointError, DataError
from cnncam.models import create_model
from cnncam.runs import RunPaths, read_classes
from cnncam.storage.runmerge import resolve_checkpoint as resolve_checkpoint
from cnncam.storage.schema import split_sha256 as split_sha256
from cnncam.train.checkpoint import load_checkpoint_and_sha256

log = logging.getLogger("cnncam.cam")


@dataclass(frozen=True)
class LoadedModel:
    """A trained model restored from a checkpoint, with what the export records about it."""

    model: nn.Module  # eval mode, on its device
    model_name: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: Path
    checkpoint_label: str  # relative to the run dir when inside it (stable when the run moves)
    checkpoint_sha256: str


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint and its SHA-256; it must carry what the export needs (classes, mean, std)."""
    state, digest = load_checkpoint_and_sha256(path)
    meta = state.get("meta")
    missing = [k for k in ("classes", "mean", "std") if not isinstance(meta, dict) or k not in meta]
    if "model" not in state or missing:
        what = "model weights" if "model" not in state else "meta " + ", ".join(missing)
        raise CheckpointError(f"checkpoint {path} lacks {what} (not a checkpoint written by cnncam training)")
    return state, digest


def load_model(cfg: RunConfig, paths: RunPaths, device: torch.device) -> LoadedModel:
    """Rebuild the checkpoint's model (``weights_only`` load) in eval mode on ``device``.

    The architecture comes from the checkpoint's own config, so ``cam.checkpoint=<path>`` of
    another run still builds the right network; ``pretrained`` is dropped (weights come from the
    checkpoint, the ImageNet file need not exist on the CAM node).  An export-only run
    (``model.weights``, issue 10) loads those weights instead: see :func:`_load_weights_model`.
    """
    if cfg.model.weights is not None:
        return _load_weights_model(cfg, paths, device)
    path = resolve_checkpoint(cfg.cam, paths)
    state, digest = read_checkpoint(path)
    meta = state["meta"]
    classes = tuple(meta["classes"])
    if meta.get("image_size") not in (None, cfg.data.image_size):
        log.warning(
            "checkpoint %s was trained at %s px; exporting CAMs at data.image_size=%d px",
            path,
            meta["image_size"],
            cfg.data.image_size,
        )
    model_cfg = _model_config(meta, cfg.model)
    model = create_model(dataclasses.replace(model_cfg, pretrained=None), len(classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit model {model_cfg.name!r}: {e}") from None
    model.to(device).eval()
    try:
        label = path.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        label = str(path.resolve())
    return LoadedModel(
        model=model,
        model_name=model_cfg.name,
        classes=classes,
        mean=tuple(float(v) for v in meta["mean"]),
        std=tuple(float(v) for v in meta["std"]),
        checkpoint=path,
        checkpoint_label=label,
        checkpoint_sha256=digest,
    )


def _load_weights_model(cfg: RunConfig, paths: RunPaths, device: torch.device) -> LoadedModel:
    """An export-only run: ``cfg.model`` built for the run's classes with its complete ``model.weights``."""
    from cnncam.data import normalization
    from cnncam.models import head_name
    from cnncam.models.weights import load_final_weights

    classes = tuple(read_classes(paths))
    model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    model = create_model(model_cfg, len(classes))
    path = Path(str(cfg.model.weights))
    digest = load_final_weights(model, path, head_name(model, model_cfg, len(classes)), len(classes))
    model.to(device).eval()
    if cfg.model.mean is not None and cfg.model.std is not None:
        mean, std = list(cfg.model.mean), list(cfg.model.std)
    else:
        mean, std = normalization(cfg.data, [], Path(cfg.data.root), None)
    return LoadedModel(model, model_cfg.name, classes, tuple(mean), tuple(std), path, str(path), digest)


def _model_config(meta: Mapping[str, Any], fallback: ModelConfig) -> ModelConfig:
    raw = meta.get("config", {}).get("model") if isinstance(meta.get("config"), dict) else None
    return from_dict(ModelConfig, raw, "model.") if isinstance(raw, dict) else fallback


def load_split(cfg: RunConfig, paths: RunPaths, classes: Sequence[str]) -> list[Sample]:
    """The run's saved ``cam.split`` (the exact order training wrote); checks the class list."""
    saved = read_classes(paths)
    if tuple(saved) != tuple(classes):
        raise CheckpointError(
            f"the checkpoint's classes {list(classes)} differ from {paths.classes} {saved}: "
            "it belongs to another run"
        )
    samples = load_index(paths, Path(cfg.data.root)).splits[cfg.cam.split]
    if not samples:
        others = ", ".join(s for s in ("train", "val", "test") if s != cfg.cam.split)
        raise DataError(
            f"split {cfg.cam.split!r} of run {paths.root} is empty; choose another (cam.split: {others})"
        )
    return samples


class _SizeRecorder:
    """The eval transform, remembering the size (W, H) of the last upright image it saw.

    ``ImageDataset`` hands us only the transformed tensor; boxes need the original size.  Each
    DataLoader worker owns its copy, and ``__getitem__`` reads the size right after the call.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        self.size: tuple[int, int] = (0, 0)

    def __call__(self, image: Image.Image) -> Tensor:
        self.size = image.size
        return self.transform(image)


class ExportDataset(Dataset[tuple[Tensor, int, int, Tensor]]):
    """``ds[i]`` -> (image (3, S, S), label, index, box (4,) float32 in input pixels, NaN = none)."""

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        data: DataConfig,
        mean: Sequence[float],
        std: Sequence[float],
        boxes: Mapping[str, tuple[int, int, int, int]] | None,
        seed: int = 0,
    ) -> None:
        self.sizes = _SizeRecorder(eval_transform(data, mean, std))
        self.images = ImageDataset(root, samples, self.sizes, data.max_image_pixels, seed=seed)
        self.data, self.boxes = data, boxes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, Tensor]:
        image, label, j = self.images[index]
        box = torch.full((4,), math.nan)
        rel = self.images.samples[j][0]
        if self.boxes is not None and rel in self.boxes:
            box = torch.tensor(box_to_input(self.boxes[rel], self.sizes.size, self.data), dtype=torch.float32)
        return image, label, j, box


def build_dataset(
    cfg: RunConfig, samples: Sequence[Sample], mean: Sequence[float], std: Sequence[float]
) -> ExportDataset:
    """The split as an in-order dataset with eval transforms and, when ``boxes.json`` exists, boxes."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} is not a folder; the CAM export reads the run's images from it"
        )
    return ExportDataset(root, samples, cfg.data, mean, std, load_boxes(root), seed=cfg.seed)


class HostTransfer:
    """Device tensors -> numpy, with one synchronisation per batch.

    On CUDA every tensor is copied ``non_blocking`` into a reused pinned buffer and one event
    is waited on; the writer copies what it is given (``PartWriter.put``), so reuse is safe.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pinned: dict[str, Tensor] = {}

    def __call__(self, tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        if not self.cuda:
            return {k: t.detach().cpu().numpy() for k, t in tensors.items()}
        out: dict[str, Tensor] = {}
        for key, t in tensors.items():
            buf = self._pinned.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out[key] = buf.copy_(t.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return {k: t.numpy() for k, t in out.items()}
