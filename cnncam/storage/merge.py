"""Merge complete part files into one file of virtual datasets; report the state of every shard.

A virtual dataset reads a missing or unreadable source as its fill value without any error
(HDFGroup/hdf5#5088, h5py#1546), and a source smaller than declared can hang a read
(h5py#1218).  So :func:`merge_parts` validates every part before it builds anything: a plain
part file (no links, no external or virtual storage), complete, the run's fingerprint when one
is given, same schema version and run attributes as the other parts, same dataset shapes,
contiguous index ranges covering ``[0, N)``, and every chunk of every dataset read once so that
its fletcher32 checksum is verified (a bit flip names the part and the dataset here, not later
in a report).  With many parts (or ``consolidate=True``) the data is copied into one physical
file instead (:mod:`cnncam.storage.consolidate`).

Concurrent merges into one folder are serialised by a lock file and write unique temporary
names; the last one publishes (``os.replace``), and both results are the same file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage import guard
from cnncam.storage import schema as S
from cnncam.storage.locks import merge_lock
from cnncam.storage.recover import commit_path, partial_path, read_commit
from cnncam.storage.sources import read_rows, verify_dataset

# Above this many parts merge_parts consolidates by default: libhdf5 keeps every source of a
# virtual dataset open (1024 is a common `ulimit -n`), and opening and reading through
# thousands of sources is slow for every tool but cnncam's own reader (benchmarks/README.md).
CONSOLIDATE_ABOVE = 128

PartState = Literal["missing", "partial", "complete", "foreign", "corrupt"]
_STATUS_ATTRS = ("fingerprint", "shard_index", "num_shards", "complete", "n_items")


@dataclass(frozen=True)
class PartStatus:
    """State of one shard's output: missing, partial (``n_committed`` items), complete, foreign
    (another run's file, or another sharding) or corrupt (final name but unreadable)."""

    shard_index: int
    state: PartState
    path: Path
    n_committed: int = 0
    n_items: int | None = None
    message: str = ""


def part_status(cams_dir: Path, num_shards: int, fingerprint: str | None = None) -> list[PartStatus]:
    """The state of shards ``0 .. num_shards-1`` in ``cams_dir``.

    Partials are judged from their commit record only (cheap, and safe while a writer runs).
    Without ``fingerprint`` a part is foreign only when it belongs to another sharding.
    """
    S.shard_range(0, 0, num_shards)
    return [_status(Path(cams_dir), i, num_shards, fingerprint) for i in range(num_shards)]


def _status(cams_dir: Path, i: int, n: int, fingerprint: str | None) -> PartStatus:
    final = cams_dir / S.part_filename(i, n)
    if final.exists():
        try:
            with h5py.File(final, "r", locking=False) as f:
                S.check_version(final, f.attrs)
                # Only what the state needs: a merge reads every attribute later anyway.
                attrs = S.decode_attrs({k: f.attrs[k] for k in _STATUS_ATTRS if k in f.attrs}, final)
        except (OSError, SchemaError) as e:
            return PartStatus(i, "corrupt", final, message=str(e))
        found = attrs.get("fingerprint")
        if fingerprint is not None and found != fingerprint:
            return PartStatus(i, "foreign", final, message=f"fingerprint {found}, expected {fingerprint}")
        if (attrs.get("shard_index"), attrs.get("num_shards")) != (i, n):
            return PartStatus(
                i,
                "foreign",
                final,
                message=f"holds shard {attrs.get('shard_index')} of {attrs.get('num_shards')}",
            )
        if not attrs.get("complete"):
            return PartStatus(i, "corrupt", final, message="final name but not marked complete")
        if not guard.is_int(attrs.get("n_items")):
            return PartStatus(i, "corrupt", final, message=f"n_items {guard.shown(attrs.get('n_items'))}")
        return PartStatus(i, "complete", final, int(attrs["n_items"]), int(attrs["n_items"]))
    partial = partial_path(final)
    if partial.exists():
        record = read_commit(commit_path(final))
        if record is None:
            return PartStatus(i, "partial", partial, message="no commit record yet")
        if fingerprint is not None and record.get("fingerprint") != fingerprint:
            return PartStatus(
                i,
                "foreign",
                partial,
                record["n_committed"],
                record.get("n_items"),
                f"fingerprint {record.get('fingerprint')}, expected {fingerprint}",
            )
        return PartStatus(i, "partial", partial, record["n_committed"], record.get("n_items"))
    return PartStatus(i, "missing", final)


@dataclass(frozen=True)
class Part:
    path: Path
    attrs: dict[str, Any]  # decoded
    raw: dict[str, Any]  # as stored, to copy verbatim
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]]  # every dataset: (shape, dtype)

    @property
    def start(self) -> int:
        return int(self.attrs["index_start"])

    @property
    def stop(self) -> int:
        return int(self.attrs["index_stop"])

    def tails(self, per_item: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            k: (s[1:], d)
            for k, (s, d) in self.shapes.items()
            if S.is_per_item(k) == per_item and k != S.META_CONFIG
        }


def merge_parts(
    part_paths: Sequence[Path],
    out: Path,
    *,
    fingerprint: str | None = None,
    consolidate: bool | None = None,
    verify: bool = True,
) -> Path:
    """Check every part, then write ``out`` (kind "merged") and return it.

    ``fingerprint``: the run's; a part with another one is refused by name.  ``consolidate``:
    True copies the data into ``out`` (one self-contained file), False writes virtual datasets
    over the parts (source paths relative to ``out``'s folder), None (default) consolidates above
    :data:`CONSOLIDATE_ABOVE` parts.  ``verify=False`` skips reading every chunk (tests only).
    Written to a unique temporary name, then ``os.replace``: a crash never leaves a half file.
    """
    if not part_paths:
        raise SchemaError("merge_parts needs at least one part file")
    parts = [_inspect(Path(p), fingerprint, verify and consolidate is not True) for p in part_paths]
    _check_consistent(parts)
    parts.sort(key=lambda p: (p.start, int(p.attrs["shard_index"])))
    _check_coverage(parts)
    if consolidate is None:
        consolidate = len(parts) > CONSOLIDATE_ABOVE
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with merge_lock(out.with_name(out.name + ".lock")) as locked:
        if locked:  # we hold the lock: temp files left here are from killed merges
            for old in out.parent.glob(f"{out.name}.*.partial"):
                old.unlink(missing_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")
        try:
            if consolidate:
                from cnncam.storage.consolidate import write_consolidated

                rel, provenance = _provenance(parts, out.parent)
                write_consolidated(tmp, parts, lambda f: merged_attrs(f, parts, rel, provenance))
            else:
                with h5py.File(tmp, "w", libver=S.LIBVER, locking=False) as f:
                    _write_merged(f, parts, out.parent)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _inspect(path: Path, fingerprint: str | None, verify: bool) -> Part:
    if not path.exists():
        hint = (
            " (a .partial file exists: the shard is still running or was interrupted)"
            if partial_path(path).exists()
            else ""
        )
        raise SchemaError(f"part {path} is missing{hint}")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise SchemaError(f"part {path} cannot be opened: {e}") from None
    with f:
        raw = dict(f.attrs)  # each attribute read once
        attrs = guard.validated_attrs(f"part {path}", raw)
        datasets = guard.check_objects(f, f"part {path}", allow_virtual=False)
        if attrs["kind"] != S.PART_KIND or not attrs["complete"]:
            raise SchemaError(
                f"part {path} is not a complete part (kind={attrs['kind']}, "
                f"{attrs.get('n_committed')} of {attrs['n_items']} items committed)"
            )
        if fingerprint is not None and attrs["fingerprint"] != fingerprint:
            raise SchemaError(
                f"part {path} belongs to another run/config/checkpoint/split (fingerprint "
                f"{attrs['fingerprint']}, this run has {fingerprint}); remove it or export that shard again"
            )
        shapes = {k: (d.shape, d.dtype) for k, d in datasets.items()}
        part = Part(path, attrs, raw, shapes)
        n = part.stop - part.start
        short = [k for k, (s, _) in part.tails(True).items() if part.shapes[k][0][0] != n]
        if short:
            raise SchemaError(f"part {path}: {', '.join(short)} do not have n_items={n} rows")
        if n and S.INDEX not in shapes:
            raise SchemaError(f"part {path} has {n} items but no {S.INDEX} dataset")
        if n:
            for a in range(0, n, 1 << 20):
                got = read_rows(f"part {path}", datasets[S.INDEX], a, a + (1 << 20))
                if not np.array_equal(got, np.arange(part.start + a, part.start + a + len(got))):
                    raise SchemaError(f"part {path}: samples/index is not {part.start}..{part.stop - 1}")
        if verify:
            for name, d in datasets.items():
                verify_dataset(f"part {path}", name, d)
    return part


def _provenance(parts: list[Part], out_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Part paths relative to ``out_dir`` and, per part, its volatile attributes (provenance)."""
    rel = [Path(os.path.relpath(p.path.resolve(), out_dir.resolve())).as_posix() for p in parts]
    provenance = [
        {"path": r, **{k: v for k, v in p.attrs.items() if k in S.VOLATILE_ATTRS}} for r, p in zip(rel, parts)
    ]
    return rel, provenance


def _check_consistent(parts: list[Part]) -> None:
    ref = parts[0]
    for p in parts[1:]:
        if p.attrs["fingerprint"] != ref.attrs["fingerprint"]:
            raise SchemaError(
                f"part {p.path} has fingerprint {p.attrs['fingerprint']} but {ref.path} has "
                f"{ref.attrs['fingerprint']}: they come from different runs, configs, checkpoints "
                "or splits"
            )
        for key in (*S.RUN_LEVEL_ATTRS, "num_shards"):
            if p.attrs.get(key) != ref.attrs.get(key):
                raise SchemaError(
                    f"part {p.path}: attribute {key}={p.attrs.get(key)!r} differs from "
                    f"{ref.path} ({ref.attrs.get(key)!r})"
                )
    n = int(ref.attrs["num_shards"])
    seen: dict[int, Path] = {}
    for p in parts:
        i = int(p.attrs["shard_index"])
        if i in seen:
            raise SchemaError(f"parts {seen[i]} and {p.path} are both shard {i} of {n}")
        seen[i] = p.path
    absent = [i for i in range(n) if i not in seen]
    if absent:
        names = ", ".join(S.part_filename(i, n) for i in absent[:5])
        raise SchemaError(f"{len(absent)} of {n} parts are missing from the merge: {names}")
    filled = [p for p in parts if p.stop > p.start]
    for per_item in (True, False):  # filters are copied from one part: they need not be in all
        layouts = [
            (p, {k: v for k, v in p.tails(per_item).items() if k != S.FILTERS_FIRST_CONV}) for p in filled
        ]
        for p, lay in layouts[1:]:
            if lay != layouts[0][1]:
                raise SchemaError(S.layout_diff(f"part {p.path}", lay, layouts[0][0].path, layouts[0][1]))


def _check_coverage(parts: list[Part]) -> None:
    end, prev = 0, None
    for p in parts:
        if p.start > end:
            raise SchemaError(
                f"items [{end}, {p.start}) are in no part: gap before part {p.path} [{p.start}, {p.stop})"
            )
        if p.start < end:
            raise SchemaError(f"part {p.path} [{p.start}, {p.stop}) overlaps part {prev} which ends at {end}")
        end, prev = p.stop, p.path


def merged_attrs(f: h5py.File, parts: list[Part], rel: list[str], provenance: list[dict[str, Any]]) -> None:
    """The merged file's root attributes (and ``meta/config``), from part 0 and the part list."""
    ref, n_total = parts[0], parts[-1].stop
    keep = (*S.RUN_LEVEL_ATTRS, "kind", "config_json", "git_commit", "git_dirty", "versions")
    f.attrs.update({k: v for k, v in ref.raw.items() if k in keep})
    f.attrs.update(
        {
            "kind": S.MERGED_KIND,
            "complete": np.int8(1),
            "n_items": np.int64(n_total),
            "shard_index": np.int64(-1),
            "num_shards": np.int64(len(parts)),
            "index_start": np.int64(0),
            "index_stop": np.int64(n_total),
            "parts": json.dumps(rel),
            "part_provenance": json.dumps(provenance, default=str),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    with h5py.File(ref.path, "r", locking=False) as src:
        if S.META_CONFIG in src:
            f.create_dataset(S.META_CONFIG, data=src[S.META_CONFIG][()], dtype=S.dtype_for(S.META_CONFIG))


def _write_merged(f: h5py.File, parts: list[Part], out_dir: Path) -> None:
    rel, provenance = _provenance(parts, out_dir)
    merged_attrs(f, parts, rel, provenance)
    n_total = parts[-1].stop
    filled = [(p, r) for p, r in zip(parts, rel) if p.stop > p.start]
    if not filled:
        return
    for name, (tail, _) in filled[0][0].tails(True).items():
        layout = h5py.VirtualLayout((n_total, *tail), dtype=S.h5_type(name))
        for p, r in filled:
            layout[p.start : p.stop] = h5py.VirtualSource(r, name, shape=(p.stop - p.start, *tail))
        f.create_virtual_dataset(name, layout, fillvalue=None if name == S.PATH else S.fill_for(name))
    extras = filled[0][0].tails(False)
    for name, (tail, _) in extras.items():
        if name == S.FILTERS_FIRST_CONV:
            continue
        sizes = [(p.shapes[name][0][0], r) for p, r in filled]
        layout = h5py.VirtualLayout((sum(m for m, _ in sizes), *tail), dtype=S.h5_type(name))
        at = 0
        for m, r in sizes:
            layout[at : at + m] = h5py.VirtualSource(r, name, shape=(m, *tail))
            at += m
        f.create_virtual_dataset(name, layout, fillvalue=S.fill_for(name))
    with_filters = [p for p, _ in filled if S.FILTERS_FIRST_CONV in p.shapes]
    if with_filters:  # small and identical in every part: copy, not virtual
        with h5py.File(with_filters[0].path, "r", locking=False) as src:
            w = src[S.FILTERS_FIRST_CONV][...]
        f.create_dataset(
            S.FILTERS_FIRST_CONV, **S.dataset_kwargs(S.FILTERS_FIRST_CONV, w.shape[1:], len(w), None)
        )[...] = w
