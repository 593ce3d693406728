"""Export-only runs: a run folder for a model cnncam did not train.

``python jobs/launch.py cam --model timm:convnext_tiny --weights model.safetensors --data /path/test
--classes classes.txt --name mymodel`` calls :func:`create_export_run`, which writes::

    runs/mymodel/
      config.yaml       the resolved config: model.name/kwargs/weights, the input transform
      classes.json      from --classes (index = the model's output index)
      provenance.json   kind "export-only", the weights' path and SHA-256, git, versions, host
      splits/*.csv      every image of --data in cam.split (or as a manifest's split column says)
      skipped.json      images that could not be decoded

and no training files (no checkpoints, metrics.jsonl or predictions).  From then on the run
folder is used like a trained one: CAM shards, Slurm arrays, merge, ``--retry-failed``, report.

The input transform: for ``timm:`` models, the image size, resize (from timm's ``crop_pct``) and
mean/std come from timm's pretrained data config, except for keys the user set (``--config`` or
``--set``); for other models from the config (``data.image_size``, ``data.resize``,
``data.normalize`` or ``model.mean/std``).  The resolved values are written to ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cnncam.config import RunConfig, to_dict
from cnncam.errors import ConfigError, DataError
from cnncam.runs import RunPaths, atomic_write_json, provenance, read_json, write_config

EXPORT_ONLY = "export-only"
# Keys whose value timm's data config supplies unless the user set them.
_INPUT_KEYS = ("data.image_size", "data.resize", "model.mean", "model.std")
_VOLATILE = ("name", "runs_dir")


def is_export_only(paths: RunPaths) -> bool:
    """Whether the run folder was made by :func:`create_export_run` (no training happened)."""
    try:
        prov = read_json(paths.provenance) if paths.provenance.is_file() else None
    except Exception:  # an unreadable provenance is the report's problem, not ours
        return False
    return isinstance(prov, dict) and prov.get("kind") == EXPORT_ONLY


def export_only_facts(paths: RunPaths) -> list[tuple[str, object]]:
    """Report rows naming the weights of an export-only run and their SHA-256."""
    prov = read_json(paths.provenance)
    return [
        ("weights (trained outside cnncam)", prov.get("weights")),
        ("weights sha256", prov.get("weights_sha256")),
    ]


def explicit_keys(config_path: str | None, overrides: Sequence[str]) -> set[str]:
    """Dotted keys the user set: in the YAML file and in ``key=value`` overrides."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    if config_path and Path(config_path).is_file():
        raw = yaml.safe_load(Path(config_path).read_text()) or {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    keys.add(prefix + str(k))
                    if k != "kwargs":
                        walk(v, f"{prefix}{k}.")

        walk(raw, "")
    return keys


def data_overrides(data: str) -> list[str]:
    """``--data``: a CSV file is a manifest, a folder of ``*.tar`` WebDataset shards, else class folders."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".csv":
        return [f"data.root={path.parent}", "data.format=csv", f"data.manifest={path.name}"]
    if path.is_dir() and (any(path.glob("*.tar")) or any(path.glob("train/*.tar"))):
        return [f"data.root={path}", "data.format=webdataset"]
    return [f"data.root={path}", "data.format=folder"]


def read_class_list(path: Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list; index = model output."""
    if not path.is_file():
        raise ConfigError(f"--classes {str(path)!r} does not exist; give a text file with one class per line")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        classes = json.loads(text)
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ConfigError(f"{path} must hold a JSON list of class names")
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or dupes:
        raise ConfigError(f"{path}: the class list is empty or repeats {dupes}")
    return classes


def resolve_input(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """Fill in timm's data config (size, resize, mean/std) for keys the user did not set."""
    if not cfg.model.name.startswith("timm:"):
        return cfg
    from cnncam.models.external import timm_input_spec

    spec = timm_input_spec(cfg.model)
    data, model = cfg.data, cfg.model
    if "data.image_size" not in explicit:
        resize = spec.resize if "data.resize" not in explicit else data.resize
        data = dataclasses.replace(data, image_size=spec.image_size, resize=resize)
    elif "data.resize" not in explicit:
        data = dataclasses.replace(data, resize=None)
    if not {"model.mean", "model.std", "data.normalize"} & explicit:
        model = dataclasses.replace(model, mean=spec.mean, std=spec.std)
    return dataclasses.replace(cfg, data=data, model=model)


def create_export_run(cfg: RunConfig, classes_file: str | None, explicit: set[str]) -> RunConfig:
    """Create (or reuse, when identical) the export-only run folder ``cfg.run_dir``; its config."""
    from cnncam.data import save_index
    from cnncam.data.layouts import discover_all
    from cnncam.models.external import describe_factory
    from cnncam.models.weights import weights_sha256

    if cfg.model.weights is None:
        raise ConfigError("an export-only run needs the model's weights: --weights FILE (model.weights)")
    weights = Path(cfg.model.weights).expanduser().resolve()
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, weights=str(weights), pretrained=None)
    )
    if cfg.data.normalize == "dataset" and cfg.model.mean is None:
        raise ConfigError(
            "data.normalize=dataset needs a training split; an export-only run takes model.mean/model.std "
            "(or data.normalize=imagenet/none)"
        )
    cfg = resolve_input(cfg, explicit)
    paths = RunPaths(cfg.run_dir)
    if paths.config.exists():
        return _reuse(cfg, paths, classes_file)
    if classes_file is None:
        raise ConfigError("an export-only run needs its class list: --classes FILE (one name per line)")
    classes = read_class_list(Path(classes_file))
    digest = weights_sha256(weights)
    index = discover_all(cfg.data, classes, cfg.cam.split)
    if not index.splits[cfg.cam.split]:
        raise DataError(f"no usable image for split {cfg.cam.split!r} under {cfg.data.root}")
    paths.root.mkdir(parents=True, exist_ok=True)
    save_index(index, paths)
    write_config(paths, cfg)
    info = provenance(cfg.seed)
    info.update(
        kind=EXPORT_ONLY, model=describe_factory(cfg.model), weights=str(weights), weights_sha256=digest
    )
    atomic_write_json(paths.provenance, info)
    return cfg


def _reuse(cfg: RunConfig, paths: RunPaths, classes_file: str | None) -> RunConfig:
    """An existing folder: only the same export-only run (same config, classes and weights) is reused."""
    from cnncam.runs import read_classes

    if not is_export_only(paths) or paths.checkpoints.exists():
        raise ConfigError(f"{paths.root} exists and is not an export-only run; choose another --name")
    from cnncam.config import load_config

    saved = load_config(paths.config, [f"runs_dir={cfg.runs_dir}", f"name={cfg.name}"])
    now, before = _comparable(cfg), _comparable(saved)
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if diff:
        raise ConfigError(
            f"{paths.root} was created with other settings ({', '.join(diff[:6])}); "
            "use a new --name, or `cam --run` to export it again as it is"
        )
    if classes_file is not None and read_class_list(Path(classes_file)) != read_classes(paths):
        raise ConfigError(f"{paths.root} was created with another class list; use a new --name")
    from cnncam.models.weights import weights_sha256

    digest = weights_sha256(Path(str(cfg.model.weights)))
    if read_json(paths.provenance).get("weights_sha256") != digest:
        raise ConfigError(f"{cfg.model.weights} changed since {paths.root} was created; use a new --name")
    return dataclasses.replace(saved, cam=cfg.cam, report=cfg.report, slurm=cfg.slurm)


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    raw = to_dict(cfg)
    return {k: v for k, v in raw.items() if k not in ("cam", "report", "slurm", "train", *_VOLATILE)}
