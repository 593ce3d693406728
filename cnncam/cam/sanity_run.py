"""``python jobs/launch.py sanity --run runs/<name>``: run the sanity checks and write ``cams/sanity.h5``.

The sample: ``sanity.images`` items of the split (``sanity.split``, default ``cam.split``) drawn
without replacement with ``sanity.seed`` and kept in split order, so every run of the check (and
the data test) sees the same images.  The classes explained are fixed by the trained model
(``sanity.targets``) and used for every randomised or permuted model.

With ``permuted`` (the run folder of the same config trained on permuted labels, made by
``pipeline --sanity-data``) the data-randomisation test compares that model's maps (its
``last.pt``: the model after fitting the random labels, not the epoch with the best validation
score, which is chance either way) with the trained model's, on the same images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnncam.cam.export_data import build_dataset, load_model, load_split
from cnncam.cam.sanity import (
    SIMILARITIES,
    MapFn,
    SanityResult,
    cam_maps,
    data_randomisation,
    model_randomisation,
)
from cnncam.cam.viz import denormalize
from cnncam.config import RunConfig, load_config, to_dict
from cnncam.console import setup_logging
from cnncam.errors import CheckpointError, CnncamError
from cnncam.runs import RunPaths, cams_dir, git_info, slurm_ids
from cnncam.storage.sanity import SANITY_FILENAME, SanityData, write_sanity
from cnncam.storage.schema import utc_now
from cnncam.train.distributed import DistInfo, select_device

log = logging.getLogger("cnncam.sanity")

RANDOMISATION = (
    "units = modules with parameters of their own, in forward order, top (classifier) first; a "
    "normalisation layer joins the unit that ran before it. Conv/Linear weights and biases ~ "
    "U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default init) from a CPU generator seeded with "
    "seed * 1000003 + position; normalisation layers reset (weight 1, bias 0, running mean 0, running "
    "var 1); eval mode. Similarity of signed maps (relu=False) upsampled to the input size: Spearman of "
    "|map| and of map, SSIM (11x11 Gaussian, sigma 1.5) of min-max(ReLU(map))."
)


def sanity_sample(n_items: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(size, n_items)`` items drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_items, size=min(size, n_items), replace=False)).astype(np.int64)


def run_sanity(cfg: RunConfig, permuted: Path | None = None, extra: Sequence[MapFn] = ()) -> Path:
    """Run the model-randomisation test (and with ``permuted`` the data test); write ``sanity.h5``.

    ``extra`` map functions are checked beside the config's CAM methods (any saliency method, or
    a deliberately model-independent one to see the check flag it).
    """
    setup_logging()
    sc = cfg.sanity
    device = select_device(cfg.train.device, DistInfo())
    split = sc.split or cfg.cam.split
    cam_cfg = dataclasses.replace(cfg, cam=dataclasses.replace(cfg.cam, split=split))
    paths = RunPaths(cfg.run_dir)
    loaded = load_model(cam_cfg, paths, device)
    samples = load_split(cam_cfg, paths, loaded.classes)
    dataset = build_dataset(cam_cfg, samples, loaded.mean, loaded.std)
    index = sanity_sample(len(samples), sc.images, sc.seed)
    images = torch.stack([dataset[int(i)][0] for i in index]).to(device)
    labels = torch.tensor([samples[int(i)][1] for i in index], dtype=torch.long, device=device)
    targets = _targets(sc.targets, loaded.model, images, labels, len(loaded.classes))
    methods = tuple(sc.methods or cfg.cam.methods)
    map_fn = cam_maps(methods, cfg.cam.layers, cfg.cam.precision, sc.batch_size)
    log.info("sanity: %d images of the %s split, methods %s, modes %s", len(index), split, methods, sc.modes)
    map_fns = [map_fn, *extra]
    result = model_randomisation(loaded.model, images, targets, map_fns, sc.modes, sc.seed, sc.examples)
    shown = torch.arange(min(sc.examples, len(index)))
    pictures = denormalize(images[shown], loaded.mean, loaded.std).clamp(0, 1)
    data = SanityData(
        attrs=_attrs(
            cfg, split, loaded.model_name, loaded.classes, loaded.checkpoint_sha256, images.shape[-2:]
        ),
        index=index,
        path=[samples[int(i)][0] for i in index],
        label=labels.cpu().numpy(),
        target=targets.cpu().numpy(),
        units=[u.label for u in result.units],
        images=(pictures * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(),
        original={k: v[: sc.examples].cpu().numpy() for k, v in result.original.items()},
        model=_model_arrays(result),
    )
    _log_flags(data)
    if permuted is not None:
        other, sha = _permuted_model(cfg, Path(permuted), loaded.classes, device)
        sims, maps = data_randomisation(loaded.model, other, images, targets, map_fns)
        data.data = {
            key: {
                **{n: t.cpu().numpy() for n, t in s.as_dict().items()},
                "examples": maps[key][: sc.examples].cpu().numpy(),
            }
            for key, s in sims.items()
        }
        data.attrs.update(permuted_run=str(permuted), permuted_checkpoint_sha256=sha)
        for key, values in data.data.items():
            log.info("sanity data test %s/%s: mean similarity %s", *key, _means(values))
    out = write_sanity(cams_dir(cfg) / SANITY_FILENAME, data)
    log.info("sanity checks written to %s", out)
    return out


def _targets(spec: str, model: torch.nn.Module, images: Tensor, labels: Tensor, classes: int) -> Tensor:
    if spec == "label":
        return labels
    if spec.startswith("class:"):
        c = int(spec.split(":", 1)[1])
        if c >= classes:
            raise CnncamError(f"sanity.targets {spec!r}: the model has {classes} classes (0..{classes - 1})")
        return torch.full_like(labels, c)
    with torch.no_grad():
        was = model.training
        model.eval()
        pred = model(images).argmax(1)
        model.train(was)
    return pred


def _attrs(
    cfg: RunConfig, split: str, model: str, classes: tuple[str, ...], sha: str, size: torch.Size
) -> dict[str, object]:
    git = git_info()
    sc = cfg.sanity
    attrs: dict[str, object] = {
        "run_name": cfg.name,
        "model": model,
        "split": split,
        "class_names": list(classes),
        "input_size": [int(size[0]), int(size[1])],
        "checkpoint_sha256": sha,
        "modes": list(sc.modes),
        "targets": sc.targets,
        "seed": sc.seed,
        "flag_metric": sc.flag_metric,
        "flag_depth": sc.flag_depth,
        "flag_threshold": sc.flag_threshold,
        "randomisation": RANDOMISATION,
        "config_json": json.dumps(to_dict(cfg), sort_keys=True, default=str),
        "git_commit": git["commit"] or "",
        "created_utc": utc_now(),
    }
    attrs.update({k.lower(): str(v) for k, v in slurm_ids().items()})
    return attrs


def _model_arrays(result: SanityResult) -> dict[str, dict[tuple[str, str], dict[str, np.ndarray]]]:
    out: dict[str, dict[tuple[str, str], dict[str, np.ndarray]]] = {}
    for mode, per_key in result.modes.items():
        out[mode] = {
            key: {
                **{n: t.numpy() for n, t in r.similarity.as_dict().items()},
                "examples": r.examples.numpy(),
            }
            for key, r in per_key.items()
        }
    return out


def _means(values: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{n} {float(np.nanmean(values[n])):.3f}" for n in SIMILARITIES if n in values)


def _log_flags(data: SanityData) -> None:
    for key in data.keys:
        if data.flagged(key):
            log.warning(
                "sanity: %s/%s maps stay similar (%s >= %s) after the top %s units are randomised: "
                "they may not depend on what the model learned",
                *key,
                data.attrs["flag_metric"],
                data.attrs["flag_threshold"],
                data.attrs["flag_depth"],
            )


def _permuted_model(
    cfg: RunConfig, run: Path, classes: tuple[str, ...], device: torch.device
) -> tuple[torch.nn.Module, str]:
    """The permuted-label run's ``last.pt`` model; it must have the same classes."""
    if not (run / "config.yaml").is_file():
        raise CheckpointError(
            f"permuted-label run {run} has no config.yaml; train it first (pipeline --sanity-data does)"
        )
    other_cfg = load_config(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}"])
    other_cfg = dataclasses.replace(other_cfg, cam=dataclasses.replace(other_cfg.cam, checkpoint="last"))
    loaded = load_model(other_cfg, RunPaths(run), device)
    if loaded.classes != classes:
        raise CheckpointError(
            f"permuted-label run {run} has classes {list(loaded.classes)}, not {list(classes)}"
        )
    if not other_cfg.data.permute_labels:
        log.warning("run %s was not trained with data.permute_labels=true; comparing it anyway", run)
    return loaded.model, loaded.checkpoint_sha256
