"""The ``merge`` command: a run's parts, checked against the run, merged into ``cams.h5`` (no torch).

Every part carries the fingerprint of the export that wrote it (:meth:`RunInfo.fingerprint`).
The merge recomputes that fingerprint from the run itself: the run name, split and the hash of the
saved split, ``classes.json``, the SHA-256 of the checkpoint file ``cam.checkpoint`` names, the CAM
methods and targets, the input size and the config.  Three fields are taken from the part: the
model name, the resolved layers and the normalization.  They are functions of the checkpoint and
the config (both checked), so a part of another run, config, checkpoint or split cannot pass; and
the merge needs neither torch nor the model (it starts in a fraction of a second and runs on a
node without a GPU or torch).  :func:`cnncam.cam.export.export_shard` computes the same
fingerprint from the loaded model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py

from cnncam.config import CamConfig, RunConfig, to_dict
from cnncam.console import setup_logging
from cnncam.data.splits import load_index
from cnncam.errors import CheckpointError, CnncamError, SchemaError, first_items
from cnncam.runs import RunPaths, cams_dir, path_sha256, read_classes
from cnncam.storage import schema as S
from cnncam.storage.merge import merge_parts, part_status

log = logging.getLogger("cnncam.cam")


def resolve_checkpoint(cam: CamConfig, paths: RunPaths) -> Path:
    """``cam.checkpoint``: ``best`` / ``last`` in the run's checkpoints folder, or a file path."""
    if cam.checkpoint in ("best", "last"):
        path = paths.best_ckpt if cam.checkpoint == "best" else paths.last_ckpt
        if not path.is_file():
            raise CheckpointError(
                f"cam.checkpoint={cam.checkpoint!r} but {path} does not exist; train the run first or "
                "set cam.checkpoint to best, last or the path of a .pt file"
            )
        return path
    path = Path(cam.checkpoint)
    if not path.is_file():
        raise CheckpointError(
            f"cam.checkpoint {cam.checkpoint!r} is not a file. "
            "Valid choices: best, last, or a path to a .pt file"
        )
    return path


def merge_run(cfg: RunConfig, num_shards: int) -> Path:
    """Validate the ``num_shards`` parts against the run and build ``cams.h5`` next to them.

    Parts of another run or config are refused by name, as are incomplete parts (one
    :class:`SchemaError` names the first ten with their state and counts the rest;
    ``launch.py cam --retry-failed`` reruns them).  Every chunk of every part is read once
    (fletcher32).  ``cam.consolidate``: ``auto`` copies the data into one file above
    ``CONSOLIDATE_ABOVE`` parts, ``always`` / ``never`` force it either way (else ``cams.h5``
    holds virtual datasets over the parts).
    """
    setup_logging()
    out_dir = cams_dir(cfg)
    fingerprint = run_fingerprint(cfg, out_dir, num_shards)
    states = part_status(out_dir, num_shards, fingerprint)
    bad = [s for s in states if s.state != "complete"]
    if bad:
        listed = first_items(
            [
                f"{out_dir / S.part_filename(s.shard_index, num_shards)} ({s.state}"
                + (f", {s.n_committed} of {s.n_items} items" if s.state == "partial" else "")
                + (f": {s.message}" if s.message else "")
                + ")"
                for s in bad
            ],
            limit=10,
            sep="; ",
        )
        raise SchemaError(
            f"cannot merge: {len(bad)} of {num_shards} parts are not complete: {listed}. "
            "Run the missing shards again (launch.py cam --run <run> --retry-failed)"
        )
    consolidate = {"auto": None, "always": True, "never": False}[cfg.cam.consolidate]
    out = merge_parts(
        [s.path for s in states],
        out_dir / S.MERGED_FILENAME,
        fingerprint=fingerprint,
        consolidate=consolidate,
    )
    log.info("merged %d part(s) into %s", num_shards, out)
    return out


def run_fingerprint(cfg: RunConfig, out_dir: Path, num_shards: int) -> str:
    """The fingerprint this run's export writes (see the module doc).

    The model-derived fields are read from each part and the fingerprint recomputed with them and
    the run's own fields: the one that a part's stored fingerprint matches is the run's.  When no
    part matches, the value computed for the first readable part is returned, so that every part
    is reported as foreign next to the fingerprint expected.
    """
    paths = RunPaths(cfg.run_dir)
    classes = tuple(read_classes(paths))
    samples = load_index(paths, Path(cfg.data.root)).splits[cfg.cam.split]
    # An export-only run (issue 10) is described by its weights file, a trained run by its checkpoint.
    weights = Path(cfg.model.weights) if cfg.model.weights is not None else None
    digest = path_sha256(weights if weights is not None else resolve_checkpoint(cfg.cam, paths))
    size = cfg.data.image_size
    computed: dict[str, str] = {}
    first = None
    for i in range(num_shards):
        fields = _model_fields(out_dir / S.part_filename(i, num_shards))
        if fields is None:
            continue
        key = S.canonical_json([fields["model"], fields["layers"], fields["normalization"]])
        if key not in computed:
            computed[key] = S.RunInfo(
                run_name=cfg.name,
                split=cfg.cam.split,
                model=str(fields["model"]),
                class_names=classes,
                methods=tuple(dict.fromkeys(cfg.cam.methods)),
                layers=tuple(fields["layers"]),
                targets=cfg.cam.targets,
                input_size=(size, size),
                checkpoint_sha256=digest,
                checkpoint_path="",  # not in the fingerprint
                normalization=dict(fields["normalization"]),
                config=to_dict(cfg),
                split_sha256=S.split_sha256(samples),
            ).fingerprint()
        if computed[key] == fields["fingerprint"]:
            return computed[key]
        first = first or computed[key]
    return first or "no readable part"


def _model_fields(path: Path) -> dict[str, Any] | None:
    """A part's model, layers, normalization and fingerprint; None when unreadable or malformed."""
    keys = ("model", "layers", "normalization", "fingerprint")
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = S.decode_attrs({k: f.attrs[k] for k in keys}, path)
        if not isinstance(attrs["layers"], list) or not isinstance(attrs["normalization"], dict):
            return None
        for layer in attrs["layers"]:
            S.validate_name("layer", layer)
    except (OSError, KeyError, CnncamError):
        return None
    return attrs
