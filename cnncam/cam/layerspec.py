"""A layer spec = a module name plus one declared reshape step to (N, C, h, w).

CAM methods work on maps ``(N, C, h, w)``.  Convolutional layers give that directly; vision
transformers do not, so a layer is named together with the step that turns its output into a
map (the role of pytorch-grad-cam's ``reshape_transform``)::

    layer4                    (N, C, h, w) as it is
    blocks.11.norm1:tokens    (N, P + h*w, C) tokens -> drop the P class/register tokens, patch grid
    layers.3:nhwc             (N, h, w, C) channels-last (timm Swin stages) -> (N, C, h, w)

The spec string is the layer's one name: in ``cam.layers``, HDF5 group names and the report.
A :class:`Reshape` maps the hooked output to the map (``to_map``) and the map back to the
output's layout (``restore``), so the CAM engine can make the *map* the autograd leaf and hand
the restored tensor downstream: gradients w.r.t. the map are then exactly the reshaped gradients
w.r.t. the patch tokens, which is what pytorch-grad-cam computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cnncam.errors import CamError, choice_message

RESHAPES = ("tokens", "nhwc")
_OUT_DIMS = {None: 4, "tokens": 3, "nhwc": 4}
MAX_PREFIX_TOKENS = 16  # class + register tokens tried when the model does not declare them


@dataclass(frozen=True)
class LayerSpec:
    """``module`` (dotted name) and ``reshape`` (None, ``tokens`` or ``nhwc``)."""

    module: str
    reshape: str | None = None

    @property
    def name(self) -> str:
        return self.module if self.reshape is None else f"{self.module}:{self.reshape}"

    @property
    def out_dims(self) -> int:
        """Dimensions of the module output this reshape expects."""
        return _OUT_DIMS[self.reshape]

    @classmethod
    def parse(cls, text: str) -> LayerSpec:
        """``"blocks.11.norm1:tokens"`` -> LayerSpec("blocks.11.norm1", "tokens")."""
        module, sep, step = text.rpartition(":")
        if not sep:
            return cls(text)
        if step not in RESHAPES or not module:
            raise CamError(
                f"layer {text!r}: "
                + choice_message("reshape step", step, RESHAPES)
                + " (as in 'module:tokens')"
            )
        return cls(module, step)


@dataclass(frozen=True)
class Reshape:
    """A resolved reshape step: ``kind`` with the facts it needs (prefix tokens, patch grid)."""

    kind: str | None = None
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    def to_map(self, out: Tensor) -> Tensor:
        """Module output -> (N, C, h, w), contiguous."""
        if self.kind == "tokens":
            if out.dim() != 3 or out.shape[1] != self.prefix + self.grid[0] * self.grid[1]:
                raise CamError(
                    f"expected (N, {self.prefix} + {self.grid[0]}*{self.grid[1]}, C) tokens, "
                    f"got {tuple(out.shape)} (is the input size the one the layer was resolved for?)"
                )
            patches = out[:, self.prefix :]
            return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], *self.grid).contiguous()
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2).contiguous()
        return out

    def restore(self, act: Tensor, out: Tensor) -> Tensor:
        """The map ``act`` back in ``out``'s layout, as a new tensor (prefix tokens taken from ``out``)."""
        if self.kind == "tokens":
            tokens = act.flatten(2).transpose(1, 2)
            return torch.cat([out[:, : self.prefix].to(act.dtype), tokens], dim=1)
        if self.kind == "nhwc":
            return act.permute(0, 2, 3, 1).contiguous(memory_format=torch.contiguous_format).clone()
        return act.clone()

    def map_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, C, h, w) of the map for a module output of ``shape``."""
        if self.kind == "tokens":
            return (shape[0], shape[2], *self.grid)
        if self.kind == "nhwc":
            return (shape[0], shape[3], shape[1], shape[2])
        return shape


def token_layout(tokens: int, input_hw: tuple[int, int], declared: int | None) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, patch grid) of a (N, tokens, C) output for an input of ``input_hw``.

    ``declared`` is the model's own count of class/register tokens (timm's ``num_prefix_tokens``);
    otherwise the smallest prefix whose remaining tokens form a grid of the input's aspect ratio.
    """
    h, w = input_hw
    prefixes = [declared] if declared is not None else range(min(tokens, MAX_PREFIX_TOKENS + 1))
    for prefix in prefixes:
        n = tokens - prefix
        if n <= 0:
            continue
        gh = round(math.sqrt(n * h / w))
        if gh > 0 and n % gh == 0 and gh * w == (n // gh) * h:
            return prefix, (gh, n // gh)
    how = (
        f"after the model's {declared} prefix tokens" if declared is not None else "after 0-16 prefix tokens"
    )
    raise CamError(
        f"{tokens} tokens do not form a patch grid of the input's {h}x{w} aspect {how}; "
        "this layer cannot be shown as a map"
    )
