"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018, arXiv 1810.03292), batched.

**Model-parameter randomisation.**  A map that explains the model must change when the model's
parameters are replaced by random ones.  The model's parameterised modules are grouped into
*units* and ordered from the top (the last to run, the classifier) to the bottom (the first
convolution); then, in

* ``cascading`` mode, step ``l`` re-initialises units ``0..l`` (cumulative, top down);
* ``independent`` mode, step ``l`` re-initialises unit ``l`` alone (the others keep their
  trained values).

What is randomised, exactly:

* a unit is a module with parameters of its own (``Conv*``, ``Linear``, ...), in the order in
  which a forward pass runs them (a probe forward, :func:`cnncam.cam.layers.probe_model`);
  a normalisation module (``BatchNorm*``, ``GroupNorm``, ``LayerNorm``, ``InstanceNorm*``) joins
  the unit that ran just before it (conv -> BN is one unit); a normalisation module with no
  unit before it is a unit of its own;
* convolution and linear weights and biases are drawn from PyTorch's default initialisation,
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``), on the CPU from a
  generator seeded with ``seed * 1_000_003 + l`` (``l`` = the unit's position from the top), so
  unit ``l`` gets the same random weights in both modes and on any device;
* normalisation modules are reset to their state before training: affine weight 1, bias 0,
  running mean 0, running variance 1 (``reset_parameters()``), as Quantus' MPRT does;
* any other module with parameters of its own is reset with its ``reset_parameters()`` under
  the same seed (global RNG, forked); one without ``reset_parameters()`` is refused.

The model stays in eval mode; the original is never modified (a deep copy is randomised).

**Similarity**, per image, between the original map and the randomised model's map, both
computed as *signed* maps (the methods' weighted sums without the final ReLU, ``relu=False``)
for a class fixed by the original model (``targets``), upsampled to the input size:
Spearman rank correlation of the absolute maps and of the signed maps, and SSIM of the maps as
displayed (ReLU, then min-max to [0, 1]).  See :mod:`cnncam.cam.similarity`.

**Data randomisation** (:func:`data_randomisation`) compares the maps of a model trained on
permuted labels with the original model's maps, on the same images and classes.

Maps come from *map functions* ``(model, images, targets) -> {(method, layer): (N, h, w)}``:
:func:`cam_maps` wraps the CAM engine; a test can pass any function (an edge detector that never
looks at the model is the textbook method that fails).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnncam.cam.engine import compute_cams
from cnncam.cam.layers import frozen_eval, model_device, probe_model
from cnncam.cam.similarity import spearman, ssim
from cnncam.cam.viz import normalize, upsample
from cnncam.errors import CamError

Key = tuple[str, str]  # (method, layer)
MapFn = Callable[[nn.Module, Tensor, Tensor], Mapping[Key, Tensor]]
Mode = Literal["cascading", "independent"]
MODES: tuple[Mode, ...] = ("cascading", "independent")
SIMILARITIES = ("spearman_abs", "spearman", "ssim")
SEED_STRIDE = 1_000_003
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Unit:
    """One randomisation step: ``modules`` (names) re-initialised together; ``name`` = the first."""

    modules: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.modules[0]

    @property
    def label(self) -> str:
        return " + ".join(self.modules)


@dataclass
class Similarity:
    """Per-image similarities, each (..., N) float32 (NaN where undefined)."""

    spearman_abs: Tensor
    spearman: Tensor
    ssim: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in SIMILARITIES}


@dataclass
class ModeResult:
    """One mode's results for one (method, layer): similarities (L, N), example maps (L, E, h, w)."""

    similarity: Similarity
    examples: Tensor


@dataclass
class SanityResult:
    """Output of :func:`model_randomisation`.

    ``original``: (method, layer) -> signed maps (N, h, w) of the untouched model;
    ``modes``: mode -> (method, layer) -> :class:`ModeResult`; ``units`` top first.
    """

    units: list[Unit]
    original: dict[Key, Tensor]
    modes: dict[str, dict[Key, ModeResult]] = field(default_factory=dict)

    def mean_curve(self, mode: str, key: Key, name: str = "spearman_abs") -> Tensor:
        """(L,) mean similarity over images at each step (NaN-aware)."""
        return torch.nanmean(getattr(self.modes[mode][key].similarity, name), dim=1)


# ----------------------------------------------------------------------------------------------
# Units and their re-initialisation


def randomisation_units(model: nn.Module, example: Tensor) -> list[Unit]:
    """The model's units, top (last to run) first; ``example`` (1, C, H, W) drives a probe forward."""
    with frozen_eval(model):
        probe = probe_model(model, example[:1].to(model_device(model, example.device)))
    ran = sorted(
        (info for info in probe.layers if any(True for _ in info.module.parameters(recurse=False))),
        key=lambda info: info.order,
    )
    groups: list[list[str]] = []
    for info in ran:
        if isinstance(info.module, _NORMS) and groups:
            groups[-1].append(info.name)
        else:
            groups.append([info.name])
    if not groups:
        raise CamError("the model has no parameters that run in a forward pass: nothing to randomise")
    return [Unit(tuple(g)) for g in reversed(groups)]


def unit_seed(seed: int, position: int) -> int:
    """Seed of the unit ``position`` places from the top."""
    return seed * SEED_STRIDE + position


@torch.no_grad()
def randomise_unit(model: nn.Module, unit: Unit, seed: int) -> None:
    """Re-initialise every module of ``unit`` in place (see the module doc), seeded by ``seed``."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for name in unit.modules:
        module = modules[name]
        if isinstance(module, _NORMS):
            module.reset_parameters()  # type: ignore[operator]
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            fan_in = module.weight[0].numel()  # in_channels/groups * kernel size, or in_features
            bound = 1.0 / max(fan_in, 1) ** 0.5
            for p in module.parameters(recurse=False):
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
        elif callable(getattr(module, "reset_parameters", None)):
            with torch.random.fork_rng(devices=[p.device for p in module.parameters() if p.is_cuda][:1]):
                torch.manual_seed(seed)
                module.reset_parameters()  # type: ignore[operator]
        else:
            raise CamError(
                f"cannot randomise module {name!r} ({type(module).__name__}): it has parameters but "
                "no reset_parameters(); the sanity check re-initialises Conv, Linear and normalisation layers"
            )


@contextlib.contextmanager
def restored(model: nn.Module, unit: Unit) -> Iterator[None]:
    """Put the unit's parameters and buffers back on exit (independent mode)."""
    modules = dict(model.named_modules())
    saved = {n: {k: v.detach().clone() for k, v in modules[n].state_dict().items()} for n in unit.modules}
    try:
        yield
    finally:
        for name, state in saved.items():
            modules[name].load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Map functions


def cam_maps(
    methods: Sequence[str], layers: Sequence[str] = ("auto",), precision: str = "fp32", batch_size: int = 64
) -> MapFn:
    """A :data:`MapFn` computing the signed maps (``relu=False``) of CAM ``methods`` at ``layers``
    with the CAM engine, ``batch_size`` images per engine call."""

    def maps(model: nn.Module, images: Tensor, targets: Tensor) -> dict[Key, Tensor]:
        parts: dict[Key, list[Tensor]] = {}
        with _quiet_engine():  # one engine per step: its per-engine info lines would repeat 2L times
            for start in range(0, images.shape[0], batch_size):
                sl = slice(start, start + batch_size)
                out = compute_cams(
                    model, images[sl], methods, layers, targets[sl], precision=precision, relu=False
                )
                for key, m in out.maps.items():
                    parts.setdefault(key, []).append(m[:, 0])
        return {key: torch.cat(ms) for key, ms in parts.items()}

    return maps


@contextlib.contextmanager
def _quiet_engine() -> Iterator[None]:
    logger = logging.getLogger("cnncam.cam")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _all_maps(
    map_fns: Sequence[MapFn], model: nn.Module, images: Tensor, targets: Tensor
) -> dict[Key, Tensor]:
    out: dict[Key, Tensor] = {}
    for fn in map_fns:
        for key, m in fn(model, images, targets).items():
            if key in out:
                raise CamError(f"two map functions return {key[0]}/{key[1]}; give each method a unique name")
            m = m[:, 0] if m.dim() == 4 and m.shape[1] == 1 else m
            if m.dim() != 3 or m.shape[0] != images.shape[0]:
                raise CamError(f"maps of {key[0]}/{key[1]} must have shape (N, h, w), got {tuple(m.shape)}")
            out[key] = m.detach().float()
    return out


def compare(reference: Tensor, maps: Tensor, size: tuple[int, int]) -> Similarity:
    """Similarity (N,) of signed maps ``maps`` to ``reference`` (N, h, w), both upsampled to ``size``."""
    ref, new = upsample(reference, size), upsample(maps, size)
    shown_ref, shown_new = normalize(F.relu(ref)), normalize(F.relu(new))
    return Similarity(spearman(ref.abs(), new.abs()), spearman(ref, new), ssim(shown_ref, shown_new))


# ----------------------------------------------------------------------------------------------
# The two tests


def model_randomisation(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    map_fns: Sequence[MapFn],
    modes: Sequence[str] = MODES,
    seed: int = 0,
    examples: int = 4,
    units: Sequence[Unit] | None = None,
) -> SanityResult:
    """Model-parameter randomisation test (see the module doc) on ``images`` (N, C, H, W).

    ``targets`` (N,) are the classes explained, fixed for every randomised model; ``examples``
    = how many of the first images keep their maps at every step (for the report).
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise CamError(f"unknown sanity mode(s) {bad or modes!r}. Valid choices: {', '.join(MODES)}")
    device = model_device(model, images.device)
    images, targets = images.to(device), targets.to(device).long().reshape(-1)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    units = list(units) if units is not None else randomisation_units(model, images)
    original = _all_maps(map_fns, model, images, targets)
    result = SanityResult(units, original)
    for mode in modes:
        sims: dict[Key, list[Similarity]] = {k: [] for k in original}
        kept: dict[Key, list[Tensor]] = {k: [] for k in original}
        for maps in _randomised_maps(model, units, mode, seed, map_fns, images, targets):
            for key, ref in original.items():
                sims[key].append(compare(ref, maps[key], size))
                kept[key].append(maps[key][:examples].cpu())
        result.modes[mode] = {
            key: ModeResult(
                Similarity(*(torch.stack([getattr(s, n) for s in sims[key]]).cpu() for n in SIMILARITIES)),
                torch.stack(kept[key]),
            )
            for key in original
        }
    return result


def _randomised_maps(
    model: nn.Module,
    units: Sequence[Unit],
    mode: str,
    seed: int,
    map_fns: Sequence[MapFn],
    images: Tensor,
    targets: Tensor,
) -> Iterator[dict[Key, Tensor]]:
    """Maps of the randomised copy after each step of ``mode``."""
    work = copy.deepcopy(model)
    for position, unit in enumerate(units):
        if mode == "cascading":
            randomise_unit(work, unit, unit_seed(seed, position))
            yield _all_maps(map_fns, work, images, targets)
        else:
            with restored(work, unit):
                randomise_unit(work, unit, unit_seed(seed, position))
                yield _all_maps(map_fns, work, images, targets)


def data_randomisation(
    model: nn.Module, permuted: nn.Module, images: Tensor, targets: Tensor, map_fns: Sequence[MapFn]
) -> tuple[dict[Key, Similarity], dict[Key, Tensor]]:
    """Similarity (N,) per (method, layer) of ``permuted``'s maps to ``model``'s on the same images and
    classes, and the permuted model's signed maps (N, h, w)."""
    device = model_device(model, images.device)
    images, targets = images.to(device), targets.to(device).long().reshape(-1)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    ref = _all_maps(map_fns, model, images, targets)
    other = _all_maps(map_fns, permuted.to(device), images, targets)
    return {key: compare(ref[key], other[key], size) for key in ref}, other
