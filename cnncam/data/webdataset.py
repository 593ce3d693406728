"""WebDataset tar shards, read with the standard library's ``tarfile`` (no webdataset package).

A shard ``root/<name>.tar`` holds samples as members ``{key}.{ext}``: the image (``.jpg``,
``.png``, ... any of ``data.extensions``) and the label ``{key}.cls`` (a class id or name as
text), the WebDataset convention (the key is the member path up to the first dot of its file
name).  A sample's path in the run's split files, the HDF5 ``samples/path`` and the report is
``<name>.tar/<key>``: ``load_rgb(root / "<name>.tar/<key>")`` finds the member through the index
here, so discovery, training, the CAM export and the report read shards with the same code as
loose files.

Each shard is indexed once per process (member headers only, sequentially: one pass over the
file), then every image is one seek and one read in the big file - a parallel file system sees a
few large files instead of millions of small ones.  The index is dropped when the shard's size
or mtime changes.
"""

from __future__ import annotations

import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cnncam.errors import DataError

TAR_SUFFIX = ".tar"
LABEL_EXT = "cls"


@dataclass(frozen=True)
class Member:
    """Byte range of one member's data inside its tar file."""

    offset: int
    size: int


@dataclass(frozen=True)
class ShardIndex:
    """key -> {extension: Member} for one tar file, and the (size, mtime) it was built for."""

    stamp: tuple[int, int]
    samples: dict[str, dict[str, Member]]


_cache: dict[str, ShardIndex] = {}
_lock = threading.Lock()


def split_key(name: str) -> tuple[str, str]:
    """``"a/b/0001.seg.png"`` -> (``"a/b/0001"``, ``"seg.png"``): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_index(path: Path) -> ShardIndex:
    """The (cached) index of tar file ``path``; :class:`DataError` when it is not a readable tar."""
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    key = os.path.abspath(path)
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached.stamp == stamp:
            return cached
        samples: dict[str, dict[str, Member]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:  # uncompressed only: members must be seekable
                for info in tar:
                    if info.isfile():
                        k, ext = split_key(info.name)
                        samples.setdefault(k, {})[ext] = Member(info.offset_data, info.size)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path} is not a readable uncompressed tar file ({e})") from None
        index = _cache[key] = ShardIndex(stamp, samples)
        return index


def read_member(tar: Path, member: Member) -> bytes:
    with open(tar, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise DataError(f"{tar} is truncated: a member ends past the end of the file")
    return data


def split_sample_path(path: Path) -> tuple[Path, str] | None:
    """(tar file, key) when ``path`` is ``<...>.tar/<key>`` with an existing tar file, else None."""
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].endswith(TAR_SUFFIX):
            tar = Path(*parts[:i])
            if tar.is_file():
                return tar, "/".join(parts[i:])
            return None
    return None


def read_image_member(path: Path, image_exts: tuple[str, ...] = ()) -> bytes | None:
    """The image bytes of sample ``<...>.tar/<key>``; None when ``path`` does not name one.

    The image is the member of that key whose extension is an image type (``image_exts``, by
    default any but ``cls``); :class:`DataError` when the shard has no such member.
    """
    found = split_sample_path(path)
    if found is None:
        return None
    tar, key = found
    members = shard_index(tar).samples.get(key, {})
    images = [ext for ext in members if (ext in image_exts if image_exts else ext != LABEL_EXT)]
    if not images:
        raise DataError(f"{tar} has no image member for key {key!r}")
    return read_member(tar, members[sorted(images)[0]])


def list_shard(root: Path, tar: Path, image_exts: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({sample path: label text}, {sample path: reason skipped}) for one shard."""
    rel = tar.relative_to(root).as_posix()
    labels: dict[str, str] = {}
    bad: dict[str, str] = {}
    index = shard_index(tar)
    for key in sorted(index.samples):
        members = index.samples[key]
        sample = f"{rel}/{key}"
        if not any(ext in image_exts for ext in members):
            bad[sample] = f"no image member ({', '.join(sorted(members))} only)"
        elif LABEL_EXT not in members:
            bad[sample] = f"no {key}.{LABEL_EXT} label member"
        else:
            labels[sample] = read_member(tar, members[LABEL_EXT]).decode("utf-8", "replace").strip()
    return labels, bad


def tar_aligned_range(paths: list[str], shard: int, num_shards: int) -> tuple[int, int] | None:
    """Items ``[start, stop)`` of export task ``shard`` when whole tar shards go to array tasks.

    ``paths`` are the split's sample paths; when they are WebDataset samples grouped by tar file
    (val/test splits are ordered by path), the even cut points ``k * n / num_shards`` move to the
    nearest tar boundary, so each task reads whole tar files.  None when the paths are not such
    samples (the even split applies).
    """
    tars = [p.split(".tar/", 1)[0] if ".tar/" in p else None for p in paths]
    if not tars or None in tars:
        return None
    starts = [i for i in range(len(tars)) if i == 0 or tars[i] != tars[i - 1]]
    if len(starts) != len(set(tars)):  # a tar appears in two places: not grouped
        return None
    bounds = [*starts, len(tars)]

    def cut(k: int) -> int:
        even = k * len(tars) // num_shards
        return min(bounds, key=lambda b: (abs(b - even), b))

    return cut(shard), cut(shard + 1)


def find_shards(folder: Path) -> list[Path]:
    """The ``*.tar`` files of ``folder`` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix == TAR_SUFFIX and p.is_file())
