"""The gradient pass of the CAM engine: autograd per target column, or the verified GAP fast path.

Moved out of :mod:`cnncam.cam.engine` (whose docstring gives the recipe) to keep it short.
:class:`GradientPass` holds the :class:`~cnncam.cam.engine.CamEngine` methods that turn the hooked
activations into gradient maps: ``torch.autograd.grad`` w.r.t. the layer leaves, one target
column at a time, or - once checked against autograd on the first batch - the analytic GAP
gradients ``W[c] / (h*w)`` of the linear head, with no backward at all.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from cnncam.cam.layers import analytic_gradients
from cnncam.cam.methods import CamInputs, run_method
from cnncam.errors import CamError

log = logging.getLogger("cnncam.cam")
FastState = Literal["candidate", "verified", "off"]
# fp16 gradients of a logit w.r.t. activations can underflow (no GradScaler here), so the score is
# scaled before autograd and the gradients unscaled in float32, as torch.cuda.amp.GradScaler does.
FP16_GRAD_SCALE = 1024.0


class GradientPass:
    """Mixin of :class:`~cnncam.cam.engine.CamEngine`: gradient maps of the hooked target layers;
    uses the engine's attributes below."""

    relu: bool
    dtype: torch.dtype
    fast_reason: dict[str, str]
    _heads: dict[str, nn.Linear]
    _fast: dict[str, FastState]
    _acts: dict[str, Tensor]

    if TYPE_CHECKING:

        @property
        def layers(self) -> tuple[str, ...]: ...

    def _gradient_maps(
        self, logits: Tensor, tgt: Tensor, acts: dict[str, Tensor], methods: list[str]
    ) -> dict[tuple[str, str], Tensor]:
        scores = logits.gather(1, tgt)  # (N, K)
        candidates = [layer for layer in self.layers if self._fast[layer] == "candidate"]
        if candidates:
            self._verify_fast_path(candidates, scores, tgt, acts)
        maps: dict[tuple[str, str], Tensor] = {}
        slow = [layer for layer in self.layers if self._fast[layer] != "verified"]
        if slow:
            maps.update(self._autograd_maps(slow, methods, scores, tgt, acts))
        with torch.no_grad():
            for layer in self.layers:
                if self._fast[layer] == "verified":
                    grads = analytic_gradients(self._heads[layer], tgt, acts[layer])
                    for m in methods:
                        maps[(m, layer)] = run_method(m, CamInputs(acts[layer], tgt, grads), self.relu)
        return maps

    def _autograd_maps(
        self, layers: list[str], methods: list[str], scores: Tensor, tgt: Tensor, acts: dict[str, Tensor]
    ) -> dict[tuple[str, str], Tensor]:
        columns: dict[tuple[str, str], list[Tensor]] = {(m, layer): [] for m in methods for layer in layers}
        k_total = scores.shape[1]
        for k in range(k_total):
            grads = self._grads(scores[:, k], layers, retain=k < k_total - 1)
            with torch.no_grad():
                for layer, g in zip(layers, grads, strict=True):
                    inputs = CamInputs(acts[layer], tgt[:, k : k + 1], g[:, None])
                    for m in methods:
                        columns[(m, layer)].append(run_method(m, inputs, self.relu))
        return {key: torch.cat(cols, dim=1) for key, cols in columns.items()}

    def _grads(self, score: Tensor, layers: list[str], retain: bool) -> list[Tensor]:
        """d score.sum() / d A for each layer: (N, C, h, w) float32; no parameter .grad."""
        scale = FP16_GRAD_SCALE if self.dtype == torch.float16 else 1.0
        leaves = [self._acts[layer] for layer in layers]
        grads = torch.autograd.grad(score.sum() * scale, leaves, retain_graph=retain, allow_unused=True)
        out = []
        for layer, g in zip(layers, grads, strict=True):
            if g is None:
                raise CamError(f"the target scores do not depend on layer {layer!r}")
            out.append(g.float() / scale)
        return out

    def _verify_fast_path(
        self, layers: list[str], scores: Tensor, tgt: Tensor, acts: dict[str, Tensor]
    ) -> None:
        """Compare analytic and autograd gradients of target column 0 once (first batch)."""
        grads = self._grads(scores[:, 0], layers, retain=True)
        rtol = 1e-4 if self.dtype == torch.float32 else 2e-2
        for layer, g in zip(layers, grads, strict=True):
            ana = analytic_gradients(self._heads[layer], tgt[:, :1], acts[layer])[:, 0].expand_as(g)
            atol = rtol * float(ana.abs().amax()) + 1e-12
            if torch.allclose(g, ana, rtol=rtol, atol=atol):
                self._fast[layer] = "verified"
                log.info("GAP fast path on for layer %r (%s)", layer, self.fast_reason[layer])
            else:
                why = "analytic W[c]/(h*w) gradients differ from autograd (not a direct GAP input?)"
                log.warning("GAP fast path off for %r: %s", layer, why)
                self._fast[layer], self.fast_reason[layer] = "off", why
