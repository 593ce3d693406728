"""The CAM export command: one shard of a run's split -> one resumable HDF5 part; merge -> ``cams.h5``.

``python jobs/launch.py cam --run runs/<name> [--shard i/n]`` ends up in :func:`export_shard`
(one Slurm array task each) and :func:`merge` (the dependent job); :func:`export` runs every
shard in-process and merges (the demo).  Per batch, on the model's device::

    images -> CamEngine (logits, targets, raw maps for every method x layer)
           -> optional deletion/insertion AUC, pointing game, energy in box (cam.metrics), ROAD (cam.road)
           -> optional uint8 maps at input size (cam.upsampled)
           -> one host transfer -> PartWriter.put (a background thread writes and commits)

so the device never waits on the disk, except when ``cam.queue_size`` batches are already queued.

Determinism: every forward sees exactly ``cam.batch_size`` images; the last batch of a shard is
padded by repeating its last image and the padding rows are dropped.  CPU convolution kernels
(oneDNN) pick different algorithms for different batch sizes (measured: N=1 and N=3 differ from
N=8 in the last bits), so without padding a 1-shard and an n-shard export would differ
slightly.  With it every item's values are bit-identical whatever the sharding, and a resumed
shard equals an uninterrupted one (the writer's "start over gives the identical file").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from cnncam.cam.activations import first_conv_filters, record_activations
from cnncam.cam.engine import CamEngine
from cnncam.cam.export_data import (
    ExportDataset,
    HostTransfer,
    LoadedModel,
    build_dataset,
    load_model,
    load_split,
    split_sha256,
)
from cnncam.cam.faithfulness import deletion_insertion, energy_in_box, pointing_game
from cnncam.cam.layers import frozen_eval, probe_model, resolve_layers
from cnncam.cam.road import road_metrics
from cnncam.cam.targets import parse_target_spec
from cnncam.cam.viz import normalize, to_uint8, upsample
from cnncam.config import CamConfig, RunConfig, to_dict
from cnncam.console import setup_logging, track
from cnncam.data import Sample
from cnncam.data.webdataset import tar_aligned_range
from cnncam.errors import CamError, DataError
from cnncam.runs import RunPaths, cams_dir, git_info, package_versions, slurm_ids
from cnncam.stop import StopFlag
from cnncam.storage import PartSpec, PartWriter, RunInfo
from cnncam.storage import schema as S
from cnncam.storage.runmerge import merge_run
from cnncam.train.distributed import DistInfo, select_device

log = logging.getLogger("cnncam.cam")


@dataclass(frozen=True)
class _Setup:
    """Everything one shard needs, built before the part file is opened."""

    loaded: LoadedModel
    samples: list[Sample]
    dataset: ExportDataset
    layers: tuple[str, ...]  # resolved CAM layers (``auto`` -> a module name)
    act_layers: tuple[str, ...]  # resolved cam.activations
    run: RunInfo
    input_size: tuple[int, int]
    has_boxes: bool


def export_shard(cfg: RunConfig, shard: int = 0, num_shards: int = 1, stop: StopFlag | None = None) -> Path:
    """Export shard ``shard`` of ``num_shards`` of the run's ``cam.split`` to its part file.

    Resumes a ``.partial`` left by a killed or requeued task; a complete part with the same
    fingerprint is left untouched (no-op).  A part written by another run/config/checkpoint
    raises :class:`SchemaError`.  When ``stop`` fires the loop ends between batches and the
    partial stays resumable.

    Returns
    -------
    Path
        The complete part ``part-XXXXX-of-YYYYY.h5``, or its ``.partial`` when stopped early.
    """
    setup_logging()
    stop = stop or StopFlag()
    # No rank/Slurm mapping here: one export task on its GPU if it has one, unless the config pins
    # the device (train.device is the run's one device key: cpu forces the CPU, cuda requires a GPU).
    device = select_device(cfg.train.device, DistInfo())
    setup = _prepare(cfg, device)
    spec = PartSpec.for_shard(setup.run, len(setup.samples), shard, num_shards)
    aligned = tar_aligned_range([rel for rel, _ in setup.samples], shard, num_shards)
    if aligned is not None:  # issue 10: WebDataset samples: each array task reads whole tar files
        spec = PartSpec(setup.run, shard, num_shards, *aligned)
    out_dir = cams_dir(cfg)
    writer = PartWriter.open_or_resume(
        out_dir, spec, batch_size=cfg.cam.batch_size, queue_size=cfg.cam.queue_size, durable=cfg.cam.durable
    )
    if writer.state.done:  # the writer logs "already complete; nothing to do"
        return writer.path
    try:
        _put_missing_extras(writer, setup, cfg.cam, device)
        stopped_at = _run_batches(writer, setup, cfg.cam, device, stop)
    except BaseException:
        writer.abort()  # keeps the committed prefix: the requeued task resumes it
        raise
    if stopped_at is not None:
        writer.abort()  # batches already committed stay; queued ones are computed again
        log.warning(
            "shard %d/%d stopped (%s) before item %d of [%d, %d); %s is kept and resumes on the next run",
            shard,
            num_shards,
            stop.reason or "stop requested",
            stopped_at,
            spec.index_start,
            spec.index_stop,
            writer.partial,
        )
        return writer.partial
    return writer.close()


def merge(cfg: RunConfig, num_shards: int) -> Path:
    """Validate the ``num_shards`` parts against the run and build ``cams.h5`` next to them
    (:func:`cnncam.storage.runmerge.merge_run`, which needs no torch)."""
    return merge_run(cfg, num_shards)


def export(cfg: RunConfig, num_shards: int = 1, stop: StopFlag | None = None) -> Path:
    """Run every shard in this process, then merge; returns ``cams.h5``.

    When ``stop`` fires, returns the interrupted part's ``.partial`` path without merging.
    """
    for shard in range(num_shards):
        path = export_shard(cfg, shard, num_shards, stop)
        if path.name.endswith(".partial"):
            return path
    return merge(cfg, num_shards)


# ----------------------------------------------------------------------------------------------
# Setup


def _prepare(cfg: RunConfig, device: torch.device) -> _Setup:
    """Load checkpoint, split and data; resolve layers; describe the run (fingerprint); check
    everything knowable (targets, path lengths) before any file is created."""
    loaded, samples, layers, act_layers, run = _describe(cfg, device)
    dataset = build_dataset(cfg, samples, loaded.mean, loaded.std)
    size = cfg.data.image_size
    return _Setup(loaded, samples, dataset, layers, act_layers, run, (size, size), dataset.boxes is not None)


def _describe(
    cfg: RunConfig, device: torch.device
) -> tuple[LoadedModel, list[Sample], tuple[str, ...], tuple[str, ...], RunInfo]:
    """Checkpoint, split, resolved layers and the run description whose fingerprint every part
    carries (``storage.runmerge`` recomputes the same fingerprint without the model)."""
    paths = RunPaths(cfg.run_dir)
    loaded = load_model(cfg, paths, device)
    samples = load_split(cfg, paths, loaded.classes)
    check_targets(cfg.cam.targets, len(loaded.classes))
    S.check_paths(rel for rel, _ in samples)
    size = cfg.data.image_size
    # A zero image suffices to resolve layer names: the probe records shapes, not values.
    example = torch.zeros(1, 3, size, size, device=device)
    with frozen_eval(loaded.model):
        probe = probe_model(loaded.model, example)
    layers = resolve_layers(probe, cfg.cam.layers)
    act_layers = resolve_layers(probe, cfg.cam.activations) if cfg.cam.activations else ()
    for layer in act_layers:
        S.activation_path(layer)  # 'index' would collide with activations/index
    git = git_info()
    run = RunInfo(
        run_name=cfg.name,
        split=cfg.cam.split,
        model=loaded.model_name,
        class_names=loaded.classes,
        methods=tuple(dict.fromkeys(cfg.cam.methods)),
        layers=layers,
        targets=cfg.cam.targets,
        input_size=(size, size),
        checkpoint_sha256=loaded.checkpoint_sha256,
        checkpoint_path=loaded.checkpoint_label,
        normalization={"mean": list(loaded.mean), "std": list(loaded.std)},
        config=to_dict(cfg),
        split_sha256=split_sha256(samples),
        git_commit=git["commit"],
        git_dirty=git["dirty"],
        versions=package_versions(),
        slurm=slurm_ids(),
    )
    return loaded, samples, layers, act_layers, run


def check_targets(spec: str, num_classes: int) -> None:
    """``cam.targets`` against the model's classes (``class:<i>``, ``topk:<k>``), before any work."""
    kind, arg = parse_target_spec(spec)
    if kind == "class" and arg is not None and arg >= num_classes:
        raise CamError(
            f"cam.targets {spec!r}: class {arg} is out of range; the model has {num_classes} classes. "
            f"Valid choices: pred, label, all, class:0..{num_classes - 1}, topk:1..{num_classes}"
        )
    if kind == "topk" and arg is not None and arg > num_classes:
        raise CamError(
            f"cam.targets {spec!r} asks for {arg} classes but the model has {num_classes}. "
            f"Valid choices: pred, label, all, class:0..{num_classes - 1}, topk:1..{num_classes}"
        )


def _loader(
    dataset: ExportDataset, first: int, stop: int, cam: CamConfig, device: torch.device
) -> DataLoader:
    """Sequential loader over items ``[first, stop)`` of the split (in order: rows are committed in order)."""
    return DataLoader(
        Subset(dataset, range(first, stop)),
        batch_size=cam.batch_size,
        shuffle=False,
        num_workers=cam.num_workers,
        pin_memory=device.type == "cuda",
    )


# ----------------------------------------------------------------------------------------------
# Once per part: activations of the first images and the first conv's filters


def _put_missing_extras(writer: PartWriter, setup: _Setup, cam: CamConfig, device: torch.device) -> None:
    """Record ``cam.activations`` for the first ``cam.activation_images`` items of the part, and the
    first conv's filters, unless the resumed part already committed them (recomputed when lost)."""
    spec = writer.spec
    m = min(cam.activation_images, spec.n_items)
    if not setup.act_layers or m <= 0:
        return
    want_acts = [S.ACTIVATIONS_INDEX, *(S.activation_path(layer) for layer in setup.act_layers)]
    need_acts = any(p not in writer.state.extras for p in want_acts)
    need_filters = S.FILTERS_FIRST_CONV not in writer.state.extras
    if not (need_acts or need_filters):
        return
    images = torch.stack([setup.dataset[i][0] for i in range(spec.index_start, spec.index_start + m)])
    model = setup.loaded.model
    acts = None
    if need_acts:
        recorded = record_activations(
            model, images.to(device), setup.act_layers, cam.activation_channels, cam.precision
        )
        acts = {layer: t.cpu().numpy() for layer, t in recorded.items()}
    filters = first_conv_filters(model, images[:1].to(device)).cpu().numpy() if need_filters else None
    index = np.arange(spec.index_start, spec.index_start + m, dtype=np.int64) if acts else None
    writer.put_extras(activations=acts, activation_index=index, first_conv=filters)


# ----------------------------------------------------------------------------------------------
# The batch loop


def _run_batches(
    writer: PartWriter, setup: _Setup, cam: CamConfig, device: torch.device, stop: StopFlag
) -> int | None:
    """Compute and queue every remaining batch; the next item when ``stop`` ended the loop, else None."""
    spec, first = writer.spec, writer.state.next_index
    loader = _loader(setup.dataset, first, spec.index_stop, cam, device)
    to_host = HostTransfer(device)
    desc = f"CAM shard {spec.shard_index}/{spec.num_shards}"
    start_time, done = time.perf_counter(), 0
    model = setup.loaded.model
    with CamEngine.from_config(
        model, cam, record_activations=(), fast_path=cam.fast_path, relu=cam.relu
    ) as engine:
        engine.prepare(torch.zeros(1, 3, *setup.input_size, device=device))
        expected = first
        for images, labels, index, boxes in track(loader, total=len(loader), desc=desc, unit="batch"):
            if stop.requested:
                return expected
            n = len(index)
            _check_index(index, expected, setup.samples)
            tensors = _compute(engine, model, images, labels, boxes, cam, setup, device, index)
            arrays = to_host({k: t[:n] for k, t in tensors.items()})
            rows: dict[str, Any] = {
                S.INDEX: index.numpy(),
                S.PATH: [setup.samples[i][0] for i in index.tolist()],
                S.sample_path("label"): labels.numpy(),
                **arrays,
            }
            writer.put(rows)
            expected += n
            done += n
    rate = done / max(time.perf_counter() - start_time, 1e-9)
    log.info("%s: %d images (%.1f images/s) -> %s", desc, done, rate, writer.path)
    return None


def _check_index(index: Tensor, expected: int, samples: list[Sample]) -> None:
    """``ImageDataset`` replaces an image that no longer decodes by the next one; an export row
    must be the image it names, so that is an error here (the partial stays resumable)."""
    want = torch.arange(expected, expected + len(index))
    if not torch.equal(index, want):
        bad = int(want[index != want][0])
        raise DataError(
            f"image {samples[bad][0]!r} (item {bad} of the split) can no longer be decoded; restore it "
            "and run the shard again (it resumes), or train a new run whose split leaves it out"
        )


def _pad(t: Tensor, size: int) -> Tensor:
    """Repeat the last row until ``t`` has ``size`` rows (see the module doc: determinism)."""
    missing = size - t.shape[0]
    return t if missing <= 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])


def _compute(
    engine: CamEngine,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    boxes: Tensor,
    cam: CamConfig,
    setup: _Setup,
    device: torch.device,
    index: Tensor,
) -> dict[str, Tensor]:
    """One batch's per-item datasets as device tensors keyed by HDF5 path (padded rows included)."""
    b = cam.batch_size
    images = _pad(images.to(device, non_blocking=True), b)
    labels = _pad(labels.to(device, non_blocking=True), b)
    out = engine(images, cam.targets, labels)
    tensors: dict[str, Tensor] = {
        S.sample_path("pred"): out.preds,
        S.sample_path("logits"): out.logits,
        S.sample_path("targets"): out.targets,
        S.sample_path("boxes"): _pad(boxes, b),
    }
    box_dev = _pad(boxes.to(device), b) if setup.has_boxes else None
    for (method, layer), maps in out.maps.items():
        tensors[S.cam_path(method, layer)] = maps
        if cam.upsampled:
            tensors[S.upsampled_path(method, layer)] = to_uint8(normalize(upsample(maps, setup.input_size)))
        if cam.metrics or cam.road:
            # The engine's forward already scored the unperturbed images: the metrics reuse it.
            ref = out.probs.gather(1, out.targets[:, :1])[:, 0]
            named = _metrics(
                model, images, maps[:, 0], out.targets[:, 0], box_dev, cam, setup.input_size, ref
            )
            if cam.road:
                named.update(road_metrics(model, images, maps[:, 0], out.targets[:, 0], cam, _pad(index, b)))
            tensors.update({S.metric_path(method, layer, k): v for k, v in named.items()})
    return tensors


def _metrics(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    boxes: Tensor | None,
    cam: CamConfig,
    input_size: tuple[int, int],
    reference: Tensor,
) -> dict[str, Tensor]:
    """Faithfulness of the first target's maps (N, h, w): deletion / insertion AUC (RISE) and, with
    boxes, the pointing game (1 hit, 0 miss, -1 no box; TorchRay's 15 px tolerance and the exact
    arg-max-in-box form) and the CAM energy inside the box."""
    if not cam.metrics:
        return {}
    scores = deletion_insertion(
        model,
        images,
        maps,
        targets,
        steps=cam.metric_steps,
        deletion_baseline=cam.deletion_baseline,
        precision=cam.precision,
        batch_size=cam.metric_batch_size or cam.batch_size,
        reference=reference,
    )
    named: dict[str, Tensor] = {"deletion_auc": scores.deletion, "insertion_auc": scores.insertion}
    if boxes is not None:
        up = upsample(maps, input_size)
        no_box = torch.isnan(boxes).any(1)
        for name, tolerance in (("pointing_hit", None), ("pointing_hit_exact", 0.0)):
            hit = pointing_game(up, boxes, tolerance).to(torch.int8)
            named[name] = torch.where(no_box, torch.full_like(hit, -1), hit)
        named["energy_in_box"] = energy_in_box(up, boxes)
    return named
