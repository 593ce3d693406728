"""The cnncam HDF5 schema in one place: paths, dtypes, fill values, chunking, attributes.

Writer, reader, merge, exporter and report build every dataset path and root attribute
through this module.  The user-facing description is ``docs/hdf5-schema.md``; bump
:data:`SCHEMA_VERSION` whenever a path, dtype or attribute meaning changes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import h5py
import numpy as np

from cnncam.config import CamMethod
from cnncam.errors import SchemaError, choice_message

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1,)
# 'v108' (not 'v110'/'latest'): checksummed object headers, yet no superblock v3 status
# flag, which would make a partial file killed mid-write unopenable without `h5clear`.
# The upper bound keeps files readable by HDF5 1.10 tools (h5dump, MATLAB >= R2021b).
LIBVER: tuple[str, str] = ("v108", "v110")
PART_KIND = "part"
MERGED_KIND = "merged"
MERGED_FILENAME = "cams.h5"

SAMPLES = "samples"
SAMPLE_FIELDS: tuple[str, ...] = ("index", "path", "label", "pred", "logits", "targets", "boxes")
INDEX = "samples/index"
PATH = "samples/path"
CAMS = "cams"
UPSAMPLED = "upsampled"
METRICS = "metrics"
ACTIVATIONS = "activations"
ACTIVATIONS_INDEX = "activations/index"
FILTERS_FIRST_CONV = "filters/first_conv"
META_CONFIG = "meta/config"
PER_ITEM_GROUPS: tuple[str, ...] = (SAMPLES, CAMS, UPSAMPLED, METRICS)

METRIC_DTYPES: dict[str, np.dtype] = {
    "deletion_auc": np.dtype(np.float32),
    "insertion_auc": np.dtype(np.float32),
    "energy_in_box": np.dtype(np.float32),
    "pointing_hit": np.dtype(np.int8),  # 1 hit, 0 miss, -1 no box
    # issue 11: the exact pointing game (tolerance 0) and ROAD (mean target probability over percentiles)
    "pointing_hit_exact": np.dtype(np.int8),
    "road_morf": np.dtype(np.float32),
    "road_lerf": np.dtype(np.float32),
}
METHODS: tuple[str, ...] = get_args(CamMethod)
# Fixed-length NUL-terminated UTF-8: variable-length strings cannot go through the gzip /
# fletcher32 pipeline ("not suitable for filters") and are fragile in virtual datasets.
PATH_BYTES = 512
COMPRESSION: dict[str, Any] = {
    "compression": "gzip",
    "compression_opts": 4,
    "shuffle": True,
    "fletcher32": True,
}
CHUNK_TARGET_BYTES = 1 << 20  # h5py guidance: chunks of 10 KiB - 1 MiB
ATTR_TEXT_LIMIT = 60_000  # HDF5 object headers cap attributes near 64 KiB
SLURM_ATTRS = tuple(
    "slurm_job_id slurm_array_job_id slurm_array_task_id slurm_restart_count slurm_job_nodelist".split()
)
JSON_ATTRS = frozenset(
    "class_names layers methods normalization versions config_json parts part_provenance".split()
)
# Stored as int8 1/0 (-1 = unknown), read as bool/None.
BOOL_ATTRS = frozenset({"complete", "git_dirty", "consolidated"})
# Describe the run: all parts of one merge must agree on every one of them.
RUN_LEVEL_ATTRS = tuple(
    "schema_version fingerprint run_name split split_sha256 model class_names layers methods targets "
    "input_size normalization checkpoint_sha256 checkpoint_path".split()
)
# May differ between an interrupted-and-resumed file and an uninterrupted one, or between parts.
VOLATILE_ATTRS = frozenset({"created_utc", "git_commit", "git_dirty", "versions", *SLURM_ATTRS})
REQUIRED_ATTRS = tuple(
    "schema_version kind complete n_items shard_index num_shards index_start index_stop class_names model "
    "layers methods targets input_size normalization split checkpoint_sha256 checkpoint_path git_commit "
    "git_dirty versions created_utc fingerprint".split()
)
# Config keys that change no stored value: left out of the fingerprint so that a requeue with
# more workers or a longer time limit still resumes its own parts.
VOLATILE_CONFIG_KEYS = tuple(
    "runs_dir slurm report cam.num_workers cam.queue_size cam.out data.num_workers data.pin_memory "
    "data.persistent_workers cam.durable sanity cam.consolidate".split()
)


# ----------------------------------------------------------------------------------------------
# Names and paths


def validate_name(what: str, name: str) -> str:
    """Check a method/layer/metric name can be one HDF5 path component; return it."""
    if not isinstance(name, str) or not name.strip() or name in (".", ".."):
        raise SchemaError(f"{what} name {name!r} must be a non-empty string")
    if "/" in name or "\x00" in name:
        raise SchemaError(f"{what} name {name!r} must not contain '/' or NUL (it is an HDF5 path component)")
    return name


def validate_method(method: str) -> str:
    if method not in METHODS:
        raise SchemaError(choice_message("CAM method", method, METHODS))
    return method


def sample_path(name: str) -> str:
    if name not in SAMPLE_FIELDS:
        raise SchemaError(choice_message("sample field", name, SAMPLE_FIELDS))
    return f"{SAMPLES}/{name}"


def check_paths(paths: Iterable[str | bytes]) -> None:
    """Refuse an image path that ``samples/path`` cannot store (UTF-8, at most PATH_BYTES - 1 bytes)."""
    for p in paths:
        encoded = p if isinstance(p, bytes) else str(p).encode("utf-8")
        if len(encoded) >= PATH_BYTES:
            raise SchemaError(
                f"image path {encoded[:80]!r}... is {len(encoded)} bytes; the schema stores at most "
                f"{PATH_BYTES - 1} (samples/path). Move or rename the file to a shorter path."
            )


def cam_path(method: str, layer: str) -> str:
    return f"{CAMS}/{validate_method(method)}/{validate_name('layer', layer)}"


def upsampled_path(method: str, layer: str) -> str:
    return f"{UPSAMPLED}/{validate_method(method)}/{validate_name('layer', layer)}"


def metric_path(method: str, layer: str, name: str) -> str:
    if name not in METRIC_DTYPES:
        raise SchemaError(choice_message("metric", name, METRIC_DTYPES))
    return f"{METRICS}/{validate_method(method)}/{validate_name('layer', layer)}/{name}"


def activation_path(layer: str) -> str:
    if validate_name("layer", layer) == "index":
        raise SchemaError("a layer named 'index' collides with activations/index; rename the layer")
    return f"{ACTIVATIONS}/{layer}"


def is_per_item(path: str) -> bool:
    """True for datasets with one row per item (resized while writing, virtual when merged)."""
    return path.split("/", 1)[0] in PER_ITEM_GROUPS


def list_datasets(f: h5py.Group) -> dict[str, h5py.Dataset]:
    """Every dataset below ``f`` by path, in HDF5's (alphabetical) visiting order."""
    out: dict[str, h5py.Dataset] = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


Layout = dict[str, tuple[tuple[int, ...], np.dtype]]  # dataset path -> (shape after the item axis, dtype)


def layout_diff(where: object, layout: Layout, ref_where: object, ref: Layout) -> str:
    """Message naming the datasets or shapes in which ``layout`` differs from ``ref``."""
    missing, extra = sorted(set(ref) - set(layout)), sorted(set(layout) - set(ref))
    if missing or extra:
        return (
            f"{where} lacks datasets {missing} and has unexpected datasets {extra}, compared with {ref_where}"
        )
    bad = [
        f"{k}: {layout[k][0]} {layout[k][1]} vs {ref[k][0]} {ref[k][1]}"
        for k in sorted(ref)
        if layout[k] != ref[k]
    ]
    return f"{where}: per-item shapes/dtypes differ from {ref_where}: {'; '.join(bad)}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def part_filename(shard_index: int, num_shards: int) -> str:
    """``part-00002-of-00005.h5``."""
    return f"part-{shard_index:05d}-of-{num_shards:05d}.h5"


def shard_range(n_total: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """The deterministic contiguous slice ``[start, stop)`` of ``n_total`` items for one shard."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SchemaError(
            f"shard {shard_index}/{num_shards} is invalid: need num_shards >= 1 and 0 <= shard < num_shards"
        )
    if n_total < 0:
        raise SchemaError(f"n_total must be >= 0, got {n_total}")
    return shard_index * n_total // num_shards, (shard_index + 1) * n_total // num_shards


# ----------------------------------------------------------------------------------------------
# Dtypes, fill values, chunking


def dtype_for(path: str) -> np.dtype:
    """The on-disk numpy dtype of a dataset path (paths: fixed-length UTF-8 bytes)."""
    group = path.split("/", 1)[0]
    if path == PATH:
        return h5py.string_dtype("utf-8", PATH_BYTES)
    if path in (sample_path("logits"), sample_path("boxes"), FILTERS_FIRST_CONV):
        return np.dtype(np.float32)
    if group == SAMPLES or path == ACTIVATIONS_INDEX:
        return np.dtype(np.int64)
    if group in (CAMS, ACTIVATIONS):
        return np.dtype(np.float16)
    if group == UPSAMPLED:
        return np.dtype(np.uint8)
    if group == METRICS:
        return METRIC_DTYPES[path.rsplit("/", 1)[1]]
    if path == META_CONFIG:
        return h5py.string_dtype("utf-8")
    raise SchemaError(f"{path!r} is not a dataset of schema version {SCHEMA_VERSION}")


def h5_type(path: str) -> np.dtype | h5py.Datatype:
    """The HDF5 type to create: like :func:`dtype_for`, but paths are NUL-terminated (h5dump shows
    clean strings, MATLAB needs no ``deblank``)."""
    if path != PATH:
        return dtype_for(path)
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(PATH_BYTES)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    tid.set_cset(h5py.h5t.CSET_UTF8)
    return h5py.Datatype(tid)


def fill_for(path: str) -> Any:
    """Fill value: what a virtual dataset returns for a missing source (NaN / -1 are testable)."""
    dt = dtype_for(path)
    if dt.kind == "f":
        return np.nan
    if dt.kind == "S":
        return b""
    if dt == np.int8:
        return np.int8(-128)  # -1 already means "no box" for pointing_hit
    if dt.kind == "i":
        return -1
    return 0  # uint8 maps: no free sentinel; samples/index == -1 flags the row instead


def chunk_rows(batch_rows: int, row_bytes: int) -> int:
    """Rows per chunk: the largest divisor of the commit size whose chunk fits CHUNK_TARGET_BYTES.

    A divisor keeps chunk boundaries on commit boundaries, so a committed chunk is never
    rewritten in place by a later batch.
    """
    batch_rows = max(1, batch_rows)
    fits = [
        c for c in range(1, batch_rows + 1) if batch_rows % c == 0 and c * row_bytes <= CHUNK_TARGET_BYTES
    ]
    return max(fits) if fits else 1


def dataset_kwargs(path: str, tail: tuple[int, ...], rows: int, commit_rows: int | None) -> dict[str, Any]:
    """``create_dataset`` keyword arguments for ``path``: per-item datasets are resizable along
    the item axis (``maxshape=(None, *tail)``) and chunked on commit boundaries."""
    dt = dtype_for(path)
    row_bytes = int(np.prod(tail, dtype=np.int64)) * dt.itemsize
    if commit_rows is None:  # fixed-size dataset (activations, filters)
        n = max(1, min(rows, chunk_rows(max(rows, 1), row_bytes)))
        maxshape: tuple[int | None, ...] = (rows, *tail)
    else:
        n = chunk_rows(commit_rows, row_bytes)
        maxshape = (None, *tail)
    return {
        "shape": (rows, *tail),
        "maxshape": maxshape,
        "dtype": h5_type(path),
        "chunks": (n, *(max(1, t) for t in tail)),
        "fillvalue": None if path == PATH else fill_for(path),  # b"" is the default; no ASCII->UTF-8 cast
        **COMPRESSION,
    }


# ----------------------------------------------------------------------------------------------
# Run identity and root attributes


@dataclass(frozen=True)
class RunInfo:
    """What a CAM file is about: identical for every part of one export.

    ``fingerprint`` hashes everything that determines the stored values (run, resolved config
    minus :data:`VOLATILE_CONFIG_KEYS`, checkpoint hash, split), so a part written by another
    run, config or checkpoint is refused instead of being resumed or merged.
    """

    run_name: str
    split: str
    model: str
    class_names: tuple[str, ...]
    methods: tuple[str, ...]
    layers: tuple[str, ...]
    targets: str
    input_size: tuple[int, int]
    checkpoint_sha256: str
    checkpoint_path: str
    normalization: Mapping[str, Any] = field(default_factory=dict)  # {"mean": [...], "std": [...]}
    config: Mapping[str, Any] = field(default_factory=dict)  # cnncam.config.to_dict(cfg)
    split_sha256: str = ""  # hash of the ordered sample list of the split, when known
    git_commit: str | None = None
    git_dirty: bool | None = None
    versions: Mapping[str, str | None] = field(default_factory=dict)
    slurm: Mapping[str, str] = field(default_factory=dict)  # cnncam.runs.slurm_ids()

    def __post_init__(self) -> None:
        for m in self.methods:
            validate_method(m)
        for layer in self.layers:
            validate_name("layer", layer)
        if not self.methods or not self.layers:
            raise SchemaError("RunInfo needs at least one method and one layer")

    def fingerprint(self) -> str:
        ident = {k: getattr(self, k) for k in _IDENTITY}
        ident.update(schema_version=SCHEMA_VERSION, config=strip_volatile(self.config))
        return hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:32]


def split_sha256(samples: Sequence[tuple[str, int]]) -> str:
    """The ``split_sha256`` attribute: hash of the ordered ``(path, label)`` list of the split."""
    h = hashlib.sha256()
    for rel, label in samples:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


# RunInfo fields that define the stored values (with the config minus VOLATILE_CONFIG_KEYS).
_IDENTITY = tuple(
    "run_name split split_sha256 model class_names methods layers targets input_size normalization "
    "checkpoint_sha256".split()
)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def strip_volatile(config: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` without :data:`VOLATILE_CONFIG_KEYS`."""
    out = json.loads(canonical_json(config))
    for key in VOLATILE_CONFIG_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


_TEXT_ATTRS = tuple("run_name split split_sha256 model targets checkpoint_sha256 checkpoint_path".split())


def run_attrs(run: RunInfo) -> tuple[dict[str, Any], str | None]:
    """Root attributes describing the run, and the config JSON when too big for an attribute
    (then stored as the string dataset ``meta/config``)."""
    config_json = canonical_json(run.config)
    attrs: dict[str, Any] = {k: str(getattr(run, k)) for k in _TEXT_ATTRS}
    attrs.update({k: canonical_json(list(getattr(run, k))) for k in ("class_names", "methods", "layers")})
    versions = {**run.versions, "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}
    attrs.update(
        schema_version=np.int64(SCHEMA_VERSION),
        fingerprint=run.fingerprint(),
        input_size=np.asarray(run.input_size, dtype=np.int64),
        normalization=canonical_json(run.normalization),
        git_commit=run.git_commit or "",
        git_dirty=np.int8(-1 if run.git_dirty is None else int(run.git_dirty)),
        versions=canonical_json(versions),
    )
    for key, value in run.slurm.items():
        name = key.lower() if key.lower().startswith("slurm_") else f"slurm_{key.lower()}"
        attrs[name] = str(value)
    if len(config_json) > ATTR_TEXT_LIMIT:
        return attrs, config_json
    attrs["config_json"] = config_json
    return attrs, None


def decode_attrs(raw: Mapping[str, Any], where: object = "CAM file") -> dict[str, Any]:
    """HDF5 root attributes as Python values: JSON decoded, 0/1 flags as bool, numpy scalars unwrapped.

    Raises :class:`SchemaError` naming ``where`` when a JSON attribute does not parse.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if key in JSON_ATTRS and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise SchemaError(
                    f"{where}: root attribute {key} is not valid JSON ({e}); the file is damaged"
                ) from None
        elif key in BOOL_ATTRS:
            value = None if value == -1 else bool(value)
        out[key] = value
    return out


def check_version(path: object, attrs: Mapping[str, Any]) -> int:
    """Raise :class:`SchemaError` unless ``attrs`` carry a supported ``schema_version``."""
    if "schema_version" not in attrs:
        raise SchemaError(f"{path} is not a cnncam CAM file (no 'schema_version' root attribute)")
    version = np.asarray(attrs["schema_version"]).item()
    if isinstance(version, bytes):
        version = version.decode("utf-8", errors="replace")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(
            f"{path}: schema_version {str(version)[:40]!r} is not an integer; the file is damaged "
            "or not a cnncam CAM file"
        )
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))
        raise SchemaError(
            f"{path} has schema_version {version}; this cnncam reads schema version(s) {supported}. "
            "Re-export the CAMs or use a matching cnncam version."
        )
    return version
