"""Typed, frozen dataclasses <-> plain YAML mappings: the machinery behind ``cnncam.config``.

It knows nothing of cnncam's sections: given a dataclass type it checks every key against the
fields (unknown key -> the valid keys and the closest match), coerces each value to the field's
declared type (``int``, ``float``, ``bool``, ``str``, ``Literal`` choices, ``X | None``,
``tuple[...]``, nested dataclasses) and applies dotted ``a.b.c=value`` overrides.  Keeping it
apart leaves ``config.py`` as the readable schema itself.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cnncam.errors import ConfigError, choice_message, closest

# Values quoted in errors are cut short: a 400-byte YAML of nested aliases expands to megabytes.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 120, 120


def short(value: Any, limit: int = 300) -> str:
    """``repr(value)`` bounded in size, without building the full text first."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def apply_override(root: type, raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw config dict, checking the key path."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.epochs=5")
    parts = key.split(".")
    cls: Any = root
    node = raw
    for i, part in enumerate(parts):
        hints = _fields(cls)
        if part not in hints:
            _unknown_key(".".join(parts[: i + 1]), hints)
        ftype = hints[part]
        if i == len(parts) - 1:
            node[part] = _parse_override_value(text, ftype)
            return
        if not _is_dataclass_type(ftype):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key}")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, cls = child, ftype


def _parse_override_value(text: str, ftype: Any) -> Any:
    # YAML scalars give ints, floats, bools, null and [lists]; a str field keeps the raw
    # text so `--set name=no` or `--set data.root=007` are not turned into False / 7.
    if _accepts_str(ftype):
        stripped = text.strip()
        if stripped in ("null", "~", "None") and _accepts_none(ftype):
            return None
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a raw mapping, validating keys and value types."""
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}")
    if len(raw) > 1000:  # no section has that many keys; avoid listing them all
        raise ConfigError(f"{where} has {len(raw)} keys; valid keys: {', '.join(_fields(cls))}")
    hints = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            _unknown_key(prefix + str(key), hints)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {where}: {e}") from None


def _coerce(value: Any, ftype: Any, key: str) -> Any:
    origin = get_origin(ftype)
    if _is_dataclass_type(ftype):
        return from_dict(ftype, value, key + ".")
    if origin is Literal:
        choices = get_args(ftype)
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {short(value)}")
        if value not in choices:
            shown = value if len(str(value)) <= 100 else str(value)[:100] + "..."
            raise ConfigError(f"{key}: " + choice_message("value", shown, [str(c) for c in choices]))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(ftype)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {short(value)} matches none of {ftype}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {short(value)}")
        args = get_args(ftype)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must be a list of {len(args)} values, got {short(list(value))}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:  # a free-form mapping (model.kwargs): string keys, YAML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping with string keys, got {value!r}")
        return dict(value)
    if ftype is Any:
        return value
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {short(value)}")
        return value
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {short(value)}")
        return value
    if ftype is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; users write it that way.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {short(value)}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):  # NaN passes every `<= 0` check, inf trains to NaN
            raise ConfigError(f"{key} must be a finite number, got {short(value, 40)}")
        return number
    if ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported field type {ftype}")  # a schema bug, not user error


def _unknown_key(key: str, hints: dict[str, Any]) -> None:
    leaf = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    msg = f"unknown config key {short(key, 120)}"
    guess = closest(leaf, hints)
    if guess is not None:
        msg += f"; did you mean {section + guess!r}?"
    raise ConfigError(
        msg + f" Valid keys{' in ' + section.rstrip('.') if section else ''}: {', '.join(hints)}"
    )


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _accepts_str(t: Any) -> bool:
    return t is str or (get_origin(t) in (Union, types.UnionType) and str in get_args(t))


def _accepts_none(t: Any) -> bool:
    return get_origin(t) in (Union, types.UnionType) and type(None) in get_args(t)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (lists, not tuples) — safe for YAML, JSON, checkpoints and HDF5 attrs."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for ``--help`` and error messages."""
    keys: list[str] = []
    for name, ftype in _fields(cls).items():
        if _is_dataclass_type(ftype):
            keys.extend(valid_keys(ftype, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys
