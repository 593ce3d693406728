"""What a reader accepts from a CAM file it did not write: only what cnncam itself writes.

Run folders are copied and handed over, so every CAM file is treated as foreign.  HDF5 can make a
dataset read bytes from anywhere: an external link (``h5py.ExternalLink``), a soft link to one,
external raw storage (``create_dataset(..., external=[('/etc/passwd', 0, n)])``) or a virtual
dataset whose sources are other files.  cnncam writes none of these except the virtual datasets
of a merged file, whose sources are the part files next to it.  So before anything is read:

- :func:`check_objects` refuses every link that is not a hard link and every dataset with external
  raw storage, and (in a part file) every virtual dataset;
- :func:`virtual_pieces` lists the sources each virtual dataset *actually* uses (not what the
  ``parts`` attribute claims), as regular row blocks, and :func:`source_path` refuses a source
  that is absolute or resolves outside the merged file's folder;
- :func:`validated_attrs` decodes the root attributes and checks their types and ranges, so a
  damaged attribute gives one line naming the file instead of a traceback far away.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cnncam.errors import SchemaError
from cnncam.storage import schema as S

_SHOW = 80  # characters of a damaged value quoted in an error message


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW] + "..."


def check_objects(f: h5py.File, where: object, *, allow_virtual: bool) -> dict[str, h5py.Dataset]:
    """Refuse links and storage that read outside ``f``; virtual datasets only if ``allow_virtual``.

    Returns every dataset by path (what :func:`schema.list_datasets` lists), checked.
    """
    links: list[tuple[str, int]] = []
    # Every link, none followed (H5Lvisit at the low level: half the cost of h5py's visititems).
    f.id.links.visit(lambda name, info: links.append((name.decode("utf-8", "replace"), info.type)), info=True)
    for name, kind in links:
        if kind == h5py.h5l.TYPE_HARD:
            continue
        link = f.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise SchemaError(
                f"{where}: {name} is an external link to {link.filename}:{link.path}; cnncam files "
                "never link to other files, so it is not read. The file was crafted or damaged."
            )
        what = f"a soft link to {link.path}" if isinstance(link, h5py.SoftLink) else "not a hard link"
        raise SchemaError(
            f"{where}: {name} is {what}; cnncam files hold only hard links, so it is not followed. "
            "The file was crafted or damaged."
        )
    datasets: dict[str, h5py.Dataset] = {}
    for name, _ in links:
        if h5py.h5o.get_info(f.id, name.encode()).type != h5py.h5o.TYPE_DATASET:
            continue
        d = datasets[name] = h5py.Dataset(h5py.h5d.open(f.id, name.encode()))
        dcpl = d.id.get_create_plist()
        if dcpl.get_external_count():
            files = ", ".join(sorted({str(e[0]) for e in d.external or ()}))
            raise SchemaError(
                f"{where}: dataset {name} uses external raw storage ({files}); cnncam stores every "
                "dataset inside its file, so it is not read. The file was crafted or damaged."
            )
        if dcpl.get_layout() == h5py.h5d.VIRTUAL and not allow_virtual:
            raise SchemaError(
                f"{where}: dataset {name} is a virtual dataset, but a part file holds its own data; "
                "it is not read. The file was crafted or damaged."
            )
    return datasets


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a virtual dataset come from rows ``src_start...`` of ``dset`` in ``file``."""

    start: int
    stop: int
    file: str  # as stored in the merged file (relative to its folder)
    path: Path  # where cnncam opens it: inside the merged file's folder
    dset: str
    src_start: int


def virtual_pieces(
    d: h5py.Dataset, name: str, where: object, folder: Path, known: dict[str, Path] | None = None
) -> list[Piece]:
    """The sources ``d`` really reads, as whole-row blocks that cover its rows exactly once; each
    source file must lie inside ``folder`` (see :func:`source_path`; ``known`` caches its answers)."""
    known = {} if known is None else known
    dcpl = d.id.get_create_plist()
    pieces = []
    for i in range(dcpl.get_virtual_count()):
        vspace, sspace = dcpl.get_virtual_vspace(i), dcpl.get_virtual_srcspace(i)
        start, stop = _rows(vspace, d.shape, name, where)
        if sspace.get_select_type() == h5py.h5s.SEL_ALL:
            src_start = 0
        else:
            src_start, src_stop = _rows(sspace, None, name, where)
            if src_stop - src_start != stop - start:
                raise SchemaError(f"{where}: virtual dataset {name} maps blocks of different sizes")
        file = dcpl.get_virtual_filename(i)
        path = known.get(file)
        if path is None:
            path = known[file] = source_path(folder, file, name, where)
        pieces.append(Piece(start, stop, file, path, dcpl.get_virtual_dsetname(i), src_start))
    pieces.sort(key=lambda p: p.start)
    end = 0
    for p in pieces:
        if p.start != end:
            raise SchemaError(
                f"{where}: virtual dataset {name} has no source for rows [{end}, {p.start}) or maps "
                "rows twice; a merged file written by cnncam covers every row once. Merge again."
            )
        if p.dset.lstrip("/") != name:
            raise SchemaError(
                f"{where}: virtual dataset {name} reads dataset {p.dset!r} of {p.file}; "
                "cnncam maps each dataset to the dataset of the same name in the parts"
            )
        end = p.stop
    if end != d.shape[0]:
        raise SchemaError(f"{where}: virtual dataset {name} has sources for {end} of its {d.shape[0]} rows")
    return pieces


def _rows(
    space: h5py.h5s.SpaceID, shape: tuple[int, ...] | None, name: str, where: object
) -> tuple[int, int]:
    """``[start, stop)`` of a selection that is one block of whole rows (the only kind cnncam writes)."""
    bad = SchemaError(f"{where}: virtual dataset {name} uses a selection cnncam does not write")
    if space.get_select_type() != h5py.h5s.SEL_HYPERSLABS:
        raise bad
    lo, hi = space.get_select_bounds()
    count = int(np.prod([b - a + 1 for a, b in zip(lo, hi)], dtype=np.int64))
    if count != space.get_select_npoints():
        raise bad  # not one contiguous block
    if shape is not None and (any(lo[1:]) or tuple(b + 1 for b in hi[1:]) != tuple(shape[1:])):
        raise bad  # only part of each row
    return int(lo[0]), int(hi[0]) + 1


def source_path(folder: Path, file: str, name: str, where: object) -> Path:
    """The part file a virtual source names, refused unless it lies inside ``folder``.

    cnncam's reader opens parts itself (relative to the merged file's folder), so
    ``HDF5_VDS_PREFIX`` and the working directory play no part in where it reads.
    """
    folder_real = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(folder / file)) if file not in ("", ".") else None
    if target is None or Path(file).is_absolute() or folder_real not in target.parents:
        raise SchemaError(
            f"{where}: dataset {name} reads virtual source {file!r}, which is outside {folder}; "
            "a merged file may only read the part files next to it, so it is not read"
        )
    return target


# ----------------------------------------------------------------------------------------------
# Root attributes


_INT_ATTRS = ("n_items", "index_start", "index_stop", "shard_index", "num_shards")
_STR_ATTRS = ("kind", "model", "targets", "split", "fingerprint")


def validated_attrs(where: object, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decoded root attributes (:func:`schema.decode_attrs`) after checking every type and range
    a reader relies on; the first problem raises one :class:`SchemaError` naming ``where``."""
    S.check_version(where, raw)
    attrs = S.decode_attrs(raw, where)
    missing = [k for k in S.REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise SchemaError(f"{where} lacks required root attributes: {', '.join(missing)}")

    def bad(key: str, need: str) -> SchemaError:
        return SchemaError(
            f"{where}: root attribute {key} must be {need}, got {shown(attrs[key])}; the file is damaged"
        )

    for key in _INT_ATTRS:
        if not is_int(attrs[key]):
            raise SchemaError(f"{where}: root attribute {key} {shown(attrs[key])} is not an integer")
    for key in _STR_ATTRS:
        if not isinstance(attrs[key], str):
            raise bad(key, "a string")
    if attrs["n_items"] < 0 or attrs["index_stop"] - attrs["index_start"] != attrs["n_items"]:
        raise SchemaError(
            f"{where}: n_items={attrs['n_items']} does not fit the range "
            f"[{attrs['index_start']}, {attrs['index_stop']}); the file is damaged"
        )
    names = attrs["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("class_names", "a non-empty list of strings")
    for key in ("methods", "layers"):
        if not isinstance(attrs[key], list) or not attrs[key]:
            raise bad(key, "a non-empty list")
    try:
        for method in attrs["methods"]:
            S.validate_method(method)
        for layer in attrs["layers"]:
            S.validate_name("layer", layer)
    except SchemaError as e:
        raise SchemaError(f"{where}: root attribute methods/layers: {e}") from None
    size = attrs["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(s) and 0 < s <= 1 << 16 for s in size)):
        raise bad("input_size", "two positive integers (H, W)")
    return attrs


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
