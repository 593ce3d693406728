"""Reading weights files: ``.pt``/``.pth`` state dicts (``weights_only``) and ``.safetensors``.

Nothing here executes code from a file: ``torch.load(weights_only=True)`` refuses pickled
objects other than tensors and plain containers, and safetensors holds tensors only.  The
``safetensors`` package comes with timm (``pip install cnncam[timm]``); it is imported only
when a ``.safetensors`` file is read, so the core does not depend on it.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cnncam.errors import ModelError, first_items
from cnncam.runs import path_sha256

# Prefixes added by DistributedDataParallel/DataParallel and torch.compile to saved keys
# (nanoGPT's `unwanted_prefix = '_orig_mod.'` fix, generalised).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SAFETENSORS_SUFFIX = ".safetensors"


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelError(f"{what} file {str(path)!r} does not exist (weights are never downloaded)")
    return path


def read_weights_bytes(path: Path, what: str = "model.pretrained") -> bytes:
    """The file's bytes; :class:`ModelError` naming ``what`` when it is missing."""
    return _require(path, what).read_bytes()


def weights_sha256(path: Path, what: str = "model.weights") -> str:
    """SHA-256 of a weights file, streamed (no copy of a multi-GB file in memory just to hash it)."""
    return path_sha256(_require(path, what))


def read_state_dict(path: Path, what: str = "model.pretrained") -> OrderedDict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.pt``/``.pth`` (``weights_only``) or ``.safetensors`` file."""
    return parse_state_dict(read_weights_bytes(path, what), path)


def read_state_dict_and_sha256(path: Path, what: str) -> tuple[OrderedDict[str, torch.Tensor], str]:
    """The state dict and the SHA-256 of exactly the bytes it was read from."""
    data = read_weights_bytes(path, what)
    return parse_state_dict(data, path), hashlib.sha256(data).hexdigest()


def parse_state_dict(data: bytes, path: Path) -> OrderedDict[str, torch.Tensor]:
    """Decode a weights file's bytes; wrappers (``model``/``state_dict`` entries, DDP and compile
    prefixes) are unwrapped.  :class:`ModelError` when it holds no state dict."""
    obj: Any
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise ModelError(
                f"reading {str(path)!r} needs the safetensors package: pip install 'cnncam[timm]' "
                "(or pip install safetensors)"
            ) from None
        try:
            obj = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types on torn/foreign files
            raise ModelError(f"cannot read {str(path)!r} as safetensors ({type(e).__name__}: {e})") from None
    else:
        try:
            # weights_only: a .pt file is a pickle; never execute code from it (torch >= 2.6 default).
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(
                f"cannot read {str(path)!r} as a weights-only state dict ({type(e).__name__}: {e}). "
                "Save weights with torch.save(model.state_dict(), path) or as .safetensors."
            ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = (
            f"keys {first_items([str(k) for k in obj])}" if isinstance(obj, Mapping) else type(obj).__name__
        )
        raise ModelError(
            f"{str(path)!r} holds no state dict (found {found}); expected "
            "{name: tensor}, or a dict with a 'model' or 'state_dict' entry"
        )
    state: OrderedDict[str, torch.Tensor] = OrderedDict(obj)
    metadata = getattr(obj, "_metadata", None)  # per-module versions, used by BatchNorm's loader
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    for _ in range(4):  # nested wrappers, e.g. DDP(compile(model)) saves "module._orig_mod.layer1..."
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def load_final_weights(model: nn.Module, path: Path, head: str, num_classes: int) -> str:
    """Load the complete weights of a model trained elsewhere (export-only runs); returns their SHA-256.

    Unlike ``model.pretrained`` nothing may be left out: a missing key, an extra key or a head of
    another size (the file was trained for other classes) is a :class:`ModelError`.
    """
    state, digest = read_state_dict_and_sha256(path, "model.weights")
    own = model.state_dict()
    head_rows = [v.shape[0] for k, v in state.items() if k == f"{head}.weight"]
    if head_rows and head_rows[0] != num_classes:
        raise ModelError(
            f"model.weights {str(path)!r}: its classifier {head!r} has {head_rows[0]} outputs but the run "
            f"has {num_classes} classes (the classes file); give the class list the model was trained with"
        )
    wrong = [
        f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    problems = [f"{len(wrong)} tensors of the wrong shape: {first_items(wrong)}"] if wrong else []
    problems += [f"{len(missing)} missing keys: {first_items(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys: {first_items(unexpected)}"] if unexpected else []
    if problems:
        raise ModelError(
            f"model.weights {str(path)!r} does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Is it a state dict of the same architecture (and model.kwargs)?"
        )
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent: BN fills it in
    return digest
