"""One exception hierarchy for everything a user can get wrong.

Every message names the offending value and lists the valid choices (submitit's
habit), so a job that fails at submit time tells the user how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CnncamError(Exception):
    """Base class: any error caused by user input, files or the environment."""


class ConfigError(CnncamError):
    """A config key or value is invalid."""


class DataError(CnncamError):
    """The dataset on disk cannot be used (empty class, one class, no images...)."""


class ModelError(CnncamError):
    """Unknown model, bad weights file, unknown layer."""


class CheckpointError(CnncamError):
    """A checkpoint is missing, corrupt or from another run."""


class SchemaError(CnncamError):
    """An HDF5 file does not follow (this version of) the cnncam schema."""


class CamError(CnncamError):
    """Bad CAM request: unknown method, bad targets, unsupported layer."""


class LaunchError(CnncamError):
    """Job submission or cluster interaction failed."""


def closest(value: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``value``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def first_items(items: list[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined, with a count of the rest: error messages stay a few
    lines long whatever the input (1000 bad parts, 10^4 unexpected keys)."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def choice_message(what: str, value: object, choices: Iterable[str]) -> str:
    """``unknown model 'resnet81'; did you mean 'resnet18'? valid: a, b, c``."""
    choices = [str(c) for c in choices]
    msg = f"unknown {what} {value!r}"
    guess = closest(str(value), choices)
    if guess is not None:
        msg += f"; did you mean {guess!r}?"
    return msg + f" Valid choices: {', '.join(choices)}"
