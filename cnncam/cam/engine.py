"""The batched CAM engine: one forward, gradients only after the hooked layers, maps on device.

Recipe (captum/torchcam take ``autograd.grad`` w.r.t. the layer output too; we also cut the graph):

* parameters are frozen for the duration of the ``with`` block, and the hooked layer's output is
  detached and made a leaf that requires grad, so autograd records only the part of the network
  *after* the target layer (memory ≈ inference) and no parameter ever gets a ``.grad``
  (pytorch-grad-cam runs ``loss.backward()`` into every parameter, base_cam.py:111-118);
* the hook hands a *clone* of the leaf downstream, so an in-place op after the layer (e.g.
  ``nn.ReLU(inplace=True)``) cannot modify the activations we keep, nor error on the leaf;
* gradients come from ``torch.autograd.grad(score[:, k].sum(), leaves)`` per target column ``k``;
  summing over the batch is valid because images are independent in eval mode;
* GAP fast path: when the layer feeds global average pooling and then an affine head,
  ``d logit_c / dA = W[c] / (h*w)`` everywhere, so every gradient method (and CAM) follows from
  the head weights with no backward at all.  It is checked on every batch (``linear(A.mean)``
  must reproduce the logits) and, on the first batch, against autograd; any failure falls back
  to autograd and is logged;
* nothing survives a call: no graph, no hook outputs (pytorch-grad-cam #78, #117, #483).

The gradient pass (autograd and the fast path) is :class:`cnncam.cam.gradients.GradientPass`,
which :class:`CamEngine` inherits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from cnncam.cam.gradients import FastState, GradientPass
from cnncam.cam.layers import (
    ModelProbe,
    autocast,
    check_precision,
    find_head_linear,
    frozen_eval,
    head_reproduces_logits,
    layer_reshape,
    model_device,
    probe_model,
    resolve_layers,
)
from cnncam.cam.layerspec import LayerSpec, Reshape
from cnncam.cam.methods import METHODS, CamInputs, get_method, run_method
from cnncam.cam.targets import TargetSpec, resolve_targets
from cnncam.config import CamConfig
from cnncam.errors import CamError

log = logging.getLogger("cnncam.cam")


@dataclass
class CamBatch:
    """CAMs of one batch; every tensor is detached and lives on the model's device.

    Attributes
    ----------
    logits : (N, classes) float32.
    targets : (N, K) long, the class explained by each map column.
    maps : ``(method, layer) -> (N, K, h, w)`` float32 raw maps (ReLU'd unless ``relu=False``).
    activations : ``layer -> (N, C, h, w)`` float32 for the layers in ``record_activations``.
    fast_path : ``layer -> bool``, whether the GAP fast path produced that layer's gradient maps.
    """

    logits: Tensor
    targets: Tensor
    maps: dict[tuple[str, str], Tensor]
    activations: dict[str, Tensor] = field(default_factory=dict)
    fast_path: dict[str, bool] = field(default_factory=dict)

    @property
    def probs(self) -> Tensor:
        """(N, classes) softmax probabilities."""
        return torch.softmax(self.logits, dim=1)

    @property
    def preds(self) -> Tensor:
        """(N,) arg-max classes."""
        return self.logits.argmax(1)

    @property
    def target_scores(self) -> Tensor:
        """(N, K) logits of the target classes."""
        return self.logits.gather(1, self.targets)


@contextlib.contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    # Callers may sit in no_grad() or inference_mode(); grad is enabled only where needed.
    with torch.inference_mode(False), torch.set_grad_enabled(enabled):
        yield


class CamEngine(GradientPass):
    """Batched CAMs for several methods and layers in one forward.

    Use as a context manager; hooks, eval mode and frozen parameters live exactly as long as the
    ``with`` block (restored on exit, also on exceptions)::

        with CamEngine(model, layers=("auto",), methods=("gradcam", "cam")) as engine:
            for images, labels in loader:
                batch = engine(images, targets="label", labels=labels)

    Layers are resolved (``auto``, name checks, linear head) with a one-image probe forward at
    :meth:`prepare`, which the first call runs if the caller did not.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] = ("auto",),
        methods: Sequence[str] = ("gradcam",),
        precision: str = "fp32",
        fast_path: bool = True,
        *,
        relu: bool = True,
        record_activations: Sequence[str] = (),
        scorecam_batch_size: int | None = None,
    ) -> None:
        if not methods:
            raise CamError("at least one CAM method is needed")
        self.model = model
        self.methods = tuple(dict.fromkeys(get_method(m).name for m in methods))
        # What the methods declare they need (never tested by name): the head's weights, extra forwards.
        self.head_methods = tuple(m for m in self.methods if METHODS[m].needs_head)
        self.requested_layers = tuple(layers) or ("auto",)
        self.precision = precision
        self.dtype = check_precision(precision)
        self.use_fast_path = fast_path
        self.relu = relu
        self.record_names = tuple(dict.fromkeys(record_activations))
        self.scorecam_batch_size = scorecam_batch_size
        self.fast_reason: dict[str, str] = {}
        self._state: Any = None  # the frozen_eval context while entered
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layers: tuple[str, ...] | None = None
        self._record_set: frozenset[str] = frozenset()
        self._heads: dict[str, nn.Linear] = {}
        self._fast: dict[str, FastState] = {}
        self._active = False
        self._graph = False
        self._acts: dict[str, Tensor] = {}
        self._records: dict[str, Tensor] = {}
        self._seen: set[str] = set()

    @classmethod
    def from_config(cls, model: nn.Module, cfg: CamConfig, **kwargs: Any) -> CamEngine:
        """Engine for ``cam.methods``, ``cam.layers``, ``cam.precision`` and ``cam.activations``."""
        return cls(
            model,
            cfg.layers,
            cfg.methods,
            cfg.precision,
            record_activations=kwargs.pop("record_activations", cfg.activations),
            **kwargs,
        )

    # ------------------------------------------------------------------ context management

    def __enter__(self) -> CamEngine:
        if self._state is not None:
            raise CamError("this CamEngine is already in use (it is not re-entrant)")
        self._state = frozen_eval(self.model)
        self._state.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            self._layers, self._record_set = None, frozenset()
            self._heads.clear()
            self._fast.clear()
            self.fast_reason.clear()
            self._clear()
            state, self._state = self._state, None
            if state is not None:
                state.__exit__(exc_type, exc, tb)

    @property
    def layers(self) -> tuple[str, ...]:
        """Resolved target layer names (after :meth:`prepare` or the first call)."""
        if self._layers is None:
            raise CamError("layers are resolved on the first batch; call engine.prepare(images) first")
        return self._layers

    def prepare(self, example: Tensor) -> tuple[str, ...]:
        """Probe the model with ``example[:1]``, resolve layers, find heads, register hooks."""
        if self._state is None:
            raise CamError("use the engine as a context manager: `with CamEngine(...) as engine:`")
        if self._layers is not None:
            return self._layers
        example = self._to_device(example)[:1]
        with _grad_mode(False), autocast(example.device, self.precision):
            probe = probe_model(self.model, example)
        layers = resolve_layers(probe, self.requested_layers)
        records = resolve_layers(probe, self.record_names) if self.record_names else ()
        self._setup_heads(probe, layers)
        self._record_set = frozenset(records)
        modules = dict(self.model.named_modules())
        # One hook per module: the target spec hooking it (if any) and the specs recorded from it.
        per_module: dict[str, tuple[list[str], list[str]]] = {}
        for name in dict.fromkeys(layers + records):
            targets, recorded = per_module.setdefault(LayerSpec.parse(name).module, ([], []))
            (targets if name in layers else recorded).append(name)
            if name in layers and name in records:
                recorded.append(name)
        for module, (targets, recorded) in per_module.items():
            target = targets[0] if targets else None
            steps = {n: layer_reshape(probe, n) for n in [*targets, *recorded]}
            hook = self._make_hook(module, target, [(n, steps[n]) for n in recorded], steps)
            self._handles.append(modules[module].register_forward_hook(hook))
        self._layers = layers
        return layers

    def _setup_heads(self, probe: ModelProbe, layers: tuple[str, ...]) -> None:
        for layer in layers:
            found = find_head_linear(probe, layer)
            if isinstance(found, str):
                self._fast[layer], self.fast_reason[layer] = "off", found
                if self.head_methods:
                    raise CamError(
                        f"method {self.head_methods[0]!r} needs global average pooling + a linear head after "
                        f"layer {layer!r} (Zhou et al. 2016): {found}. Use gradcam instead."
                    )
                continue
            self._heads[layer] = found[1]
            on = self.use_fast_path and any(METHODS[m].needs_grads for m in self.methods)
            self._fast[layer] = "candidate" if on else "off"
            self.fast_reason[layer] = f"head {found[0]!r}" + ("" if on else "; fast path not used")

    # ------------------------------------------------------------------ hooks

    def _make_hook(
        self, module: str, target: str | None, records: list[tuple[str, Reshape]], steps: dict[str, Reshape]
    ) -> Any:
        dims = LayerSpec.parse(target or records[0][0]).out_dims

        def hook(_module: nn.Module, _args: Any, out: Any) -> Tensor | None:
            if not self._active:
                return None
            if not isinstance(out, Tensor) or out.dim() != dims:
                raise CamError(
                    f"layer {module!r} must output a {dims}-D tensor; got {getattr(out, 'shape', out)!r}"
                )
            if module in self._seen:
                raise CamError(f"layer {module!r} ran twice in one forward; pick a module that runs once")
            self._seen.add(module)
            for name, step in records:
                self._records[name] = step.to_map(out.detach()).to(torch.float32, copy=True)
            if target is None:
                return None
            step = steps[target]
            # The map (N, C, h, w) is the autograd leaf and the restored layout goes downstream, so
            # gradients w.r.t. the map are the reshaped gradients w.r.t. the layer output.
            if self._graph and out.requires_grad:
                # Downstream of another hooked layer the output is already in the graph: keep it
                # there so that layer's gradients still flow.
                source, act = out, step.to_map(out)
            else:
                source = out.detach()
                act = step.to_map(source)
                act = act.requires_grad_(True) if self._graph else act
            self._acts[target] = act
            return step.restore(act, source)  # a new tensor: in-place ops downstream must not touch `act`

        return hook

    # ------------------------------------------------------------------ the call

    def __call__(
        self, images: Tensor, targets: TargetSpec = "pred", labels: Tensor | Sequence[int] | None = None
    ) -> CamBatch:
        """CAMs of ``images`` (N, 3, H, W) for ``targets`` (see :mod:`cnncam.cam.targets`)."""
        images = self._to_device(images)
        self.prepare(images)
        try:
            with torch.inference_mode(False):
                return self._run(images, targets, labels)
        finally:
            self._clear()

    def _run(self, images: Tensor, targets: TargetSpec, labels: Tensor | Sequence[int] | None) -> CamBatch:
        grad_methods = [m for m in self.methods if METHODS[m].needs_grads]
        for _attempt in range(2):
            graph = bool(grad_methods) and any(self._fast[layer] != "verified" for layer in self.layers)
            logits = self._forward(images, graph)
            tgt = resolve_targets(targets, logits.detach(), labels)
            if not self._check_heads(logits.detach(), graph):
                break
            self._clear()  # a verified fast path failed without a graph: redo with autograd
        acts = {layer: self._acts[layer].detach().float() for layer in self.layers}
        maps = self._gradient_maps(logits, tgt, acts, grad_methods) if grad_methods else {}
        with torch.no_grad():
            for layer in self.layers:
                for m in self.methods:
                    if not METHODS[m].needs_grads:
                        maps[(m, layer)] = run_method(
                            m, self._inputs(m, layer, acts[layer], tgt, images), self.relu
                        )
        ordered = {(m, layer): maps[(m, layer)] for layer in self.layers for m in self.methods}
        fast = {layer: self._fast[layer] == "verified" for layer in self.layers}
        return CamBatch(logits.detach(), tgt, ordered, dict(self._records), fast)

    def _forward(self, images: Tensor, graph: bool) -> Tensor:
        self._graph, self._active = graph, True
        try:
            with _grad_mode(graph), autocast(images.device, self.precision):
                logits = self.model(images)
        finally:
            self._active = False
        missing = [layer for layer in self.layers if layer not in self._acts]
        if missing:
            raise CamError(f"target layer(s) {missing} did not run in the forward pass")
        return logits.float()

    def _check_heads(self, logits: Tensor, graph: bool) -> bool:
        """Check ``linear(A.mean)`` == logits per head; True if the batch must be redone."""
        redo = False
        for layer, head in self._heads.items():
            if self._fast[layer] == "off" and not self.head_methods:
                continue
            if head_reproduces_logits(self._acts[layer], head, logits, self.dtype):
                continue
            why = f"linear(mean(A)) does not reproduce the logits at layer {layer!r}"
            if self.head_methods:
                raise CamError(
                    f"method {self.head_methods[0]!r} needs A -> global average pooling -> linear head: {why}"
                )
            if self._fast[layer] != "off":
                log.warning("GAP fast path off for %r: %s; using autograd", layer, why)
                redo = redo or (self._fast[layer] == "verified" and not graph)
                self._fast[layer], self.fast_reason[layer] = "off", why
        return redo

    # ------------------------------------------------------------------ gradients and maps

    def _inputs(self, method: str, layer: str, act: Tensor, tgt: Tensor, images: Tensor) -> CamInputs:
        """What ``method`` declares it needs, and nothing else."""
        spec = METHODS[method]
        weights = None
        if spec.needs_head and layer in self._heads:
            weights = self._heads[layer].weight.detach().float()[tgt]  # (N, K, C)
        if not spec.needs_forward:
            return CamInputs(act, tgt, class_weights=weights)
        forward, chunk = self._plain_forward, self.scorecam_batch_size
        return CamInputs(act, tgt, class_weights=weights, images=images, forward=forward, chunk_size=chunk)

    # ------------------------------------------------------------------ helpers

    def _plain_forward(self, x: Tensor) -> Tensor:
        """Logits (M, classes) float32 without CAM hooks (Score-CAM's masked forwards)."""
        with _grad_mode(False), autocast(x.device, self.precision):
            return self.model(x).float()

    def _to_device(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise CamError(f"images must be a non-empty tensor (N, C, H, W), got {shape}")
        device = model_device(self.model, images.device)
        with torch.inference_mode(False):
            # Inference tensors (made under inference_mode) cannot enter an autograd graph.
            images = images.detach().to(device, non_blocking=True)
            return images.clone() if images.is_inference() else images

    def _clear(self) -> None:
        self._acts.clear()
        self._records.clear()
        self._seen.clear()
        self._active = False


def compute_cams(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str] = ("gradcam",),
    layers: Sequence[str] = ("auto",),
    targets: TargetSpec = "pred",
    labels: Tensor | Sequence[int] | None = None,
    precision: str = "fp32",
    **kwargs: Any,
) -> CamBatch:
    """One-shot :class:`CamEngine` call: CAMs of ``images`` (N, 3, H, W) -> :class:`CamBatch`."""
    with CamEngine(model, layers, methods, precision, **kwargs) as engine:
        return engine(images, targets, labels)
