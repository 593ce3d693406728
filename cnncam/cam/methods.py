"""CAM methods: each one is only its channel-weight (or map) formula over shared inputs.

The engine (:mod:`cnncam.cam.engine`) runs the forward pass, takes gradients of the target
scores with respect to the hooked activations and hands every method the same
:class:`CamInputs`.  A method returns the *signed* weighted sum ``(N, K, h, w)`` float32;
:func:`run_method` applies the ReLU of the papers (``relu=False`` keeps the raw signed sum for
research use, like captum's default).  No per-image min-max here: that destroys cross-image
comparability (pytorch-grad-cam #267); :func:`cnncam.cam.viz.normalize` is a separate step.

Gradients come in one of two layouts:

* ``(N, K, C, h, w)`` from autograd, one slice per target column ``k``;
* ``(N, K, C, 1, 1)`` when they are constant over space (the GAP + linear fast path, where
  ``dy_c/dA = W[c] / (h*w)`` everywhere).  Formulas below broadcast over the 1x1 layout and
  sum over space with :func:`_spatial_sum`, so ``all``-class maps never materialise a
  ``(N, K, C, h, w)`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from cnncam.config import CamMethod
from cnncam.errors import CamError, choice_message

# pytorch-grad-cam's constants, kept so our maps match the library users compare against.
XGRADCAM_EPS = 1e-7
GRADCAM_PP_EPS = 1e-6
SCORECAM_EPS = 1e-8


@dataclass(frozen=True)
class CamInputs:
    """Everything a method may need for one layer and one batch.

    Attributes
    ----------
    activations : (N, C, h, w) float32, the hooked layer output A.
    targets : (N, K) long, target class per image and column.
    gradients : (N, K, C, h, w) or (N, K, C, 1, 1) float32, d score / d A; None if not needed.
    class_weights : (N, K, C) float32, rows ``W[target]`` of the linear head (CAM only).
    images : (N, 3, H, W) model inputs (Score-CAM only).
    forward : images -> float32 logits ``(M, classes)`` without CAM hooks (Score-CAM only).
    chunk_size : masked images per Score-CAM forward (default N, i.e. one batch's worth).
    """

    activations: Tensor
    targets: Tensor
    gradients: Tensor | None = None
    class_weights: Tensor | None = None
    images: Tensor | None = None
    forward: Callable[[Tensor], Tensor] | None = None
    chunk_size: int | None = None

    @property
    def num_targets(self) -> int:
        return int(self.targets.shape[1])

    def need_gradients(self, method: str) -> Tensor:
        if self.gradients is None:
            raise CamError(f"method {method!r} needs gradients but none were computed")
        return self.gradients


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its formula and what the engine must provide."""

    name: str
    fn: Callable[[CamInputs], Tensor]
    needs_grads: bool = False
    needs_head: bool = False  # rows of the linear head (GAP + Linear models only)
    needs_forward: bool = False  # extra masked forward passes
    paper: str = ""


def _weighted_sum(weights: Tensor, acts: Tensor) -> Tensor:
    """Channel weights (N, K, C) times A (N, C, h, w) summed over C -> (N, K, h, w)."""
    return torch.einsum("nkc,nchw->nkhw", weights, acts)


def _elementwise_sum(weights: Tensor, acts: Tensor) -> Tensor:
    """Element-wise weights (N, K, C, h, w) or (N, K, C, 1, 1) times A, summed over C."""
    if weights.shape[-2:] == (1, 1):
        return _weighted_sum(weights[..., 0, 0], acts)
    return torch.einsum("nkchw,nchw->nkhw", weights, acts)


def _spatial_sum(x: Tensor, hw: int) -> Tensor:
    """Sum over the last two dims; a (…, 1, 1) tensor stands for a constant h*w map."""
    if x.shape[-2:] == (1, 1):
        return x[..., 0, 0] * hw
    return x.sum((-2, -1))


def gradcam(inp: CamInputs) -> Tensor:
    """Grad-CAM: alpha_k = mean_ij g^k_ij; L = sum_k alpha_k A^k (N, K, h, w)."""
    # Selvaraju et al., ICCV 2017, arXiv 1610.02391, Eq. 1-2 (gradients of the pre-softmax score).
    alpha = inp.need_gradients("gradcam").mean((-2, -1))
    return _weighted_sum(alpha, inp.activations)


def hirescam(inp: CamInputs) -> Tensor:
    """HiResCAM: L = sum_k g^k * A^k element-wise, no spatial averaging (N, K, h, w)."""
    # Draelos & Carin, arXiv 2011.08891: provably faithful for conv -> flatten -> FC heads;
    # identical to Grad-CAM for GAP heads (constant gradients).
    return _elementwise_sum(inp.need_gradients("hirescam"), inp.activations)


def xgradcam(inp: CamInputs) -> Tensor:
    """XGrad-CAM: w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij (N, K, h, w)."""
    # Fu et al., BMVC 2020, arXiv 2008.02312, Eq. 9; eps as in pytorch-grad-cam.
    grads, acts = inp.need_gradients("xgradcam"), inp.activations
    total = acts.sum((2, 3))  # (N, C)
    if grads.shape[-2:] == (1, 1):
        weights = grads[..., 0, 0] * (total / (total + XGRADCAM_EPS))[:, None, :]
    else:
        share = acts / (total[:, :, None, None] + XGRADCAM_EPS)
        weights = torch.einsum("nkchw,nchw->nkc", grads, share)
    return _weighted_sum(weights, acts)


def gradcam_pp(inp: CamInputs) -> Tensor:
    """Grad-CAM++ with the exp-score closed form (N, K, h, w).

    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), w_k = sum_ij alpha_ij ReLU(g_ij).
    """
    # Chattopadhyay et al., WACV 2018, arXiv 1710.11063, Eq. 19 with y = exp(S): the second and
    # third derivatives become g^2 and g^3 (what pytorch-grad-cam and torchcam implement).
    grads, acts = inp.need_gradients("gradcam_pp"), inp.activations
    g2 = grads * grads
    g3 = g2 * grads
    total = acts.sum((2, 3))[:, None, :, None, None]  # (N, 1, C, 1, 1)
    alpha = g2 / (2 * g2 + total * g3 + GRADCAM_PP_EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = _spatial_sum(alpha * F.relu(grads), acts.shape[2] * acts.shape[3])
    return _weighted_sum(weights, acts)


def layercam(inp: CamInputs) -> Tensor:
    """LayerCAM: L = sum_k ReLU(g^k) * A^k element-wise (N, K, h, w)."""
    # Jiang et al., "LayerCAM", IEEE TIP 30:5875-5888, 2021, Eq. 5-6.
    return _elementwise_sum(F.relu(inp.need_gradients("layercam")), inp.activations)


def cam(inp: CamInputs) -> Tensor:
    """CAM: L = sum_k W[c, k] A^k with the linear head's weights (N, K, h, w)."""
    # Zhou et al., CVPR 2016, arXiv 1512.04150, Eq. 2 (bias omitted, as in the paper). Only valid
    # when A feeds global average pooling and then the linear layer; the engine checks that.
    if inp.class_weights is None:
        raise CamError("method 'cam' needs the linear head's weights (GAP + Linear models only)")
    return _weighted_sum(inp.class_weights, inp.activations)


def eigencam(inp: CamInputs) -> Tensor:
    """Eigen-CAM: projection of A on its first principal component (N, K, h, w), class-agnostic.

    Conventions: the (h*w, C) activation matrix is centred over space before the SVD (a true
    principal component, as pytorch-grad-cam does) and the sign of the component is chosen so
    that the map correlates positively with the channel-mean activation (SVD signs are
    arbitrary).  The same map is returned for every target column.
    """
    # Muhammad & Yeasin, IJCNN 2020, arXiv 2008.00299.
    acts = inp.activations
    n, _, h, w = acts.shape
    rows = acts.flatten(2).transpose(1, 2)  # (N, hw, C)
    rows = rows - rows.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    proj = (rows @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    mean_map = acts.mean(1).flatten(1)
    corr = ((proj - proj.mean(1, keepdim=True)) * (mean_map - mean_map.mean(1, keepdim=True))).sum(1)
    sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
    maps = (proj * sign[:, None]).reshape(n, 1, h, w)
    return maps.expand(n, inp.num_targets, h, w).contiguous()


def scorecam(inp: CamInputs) -> Tensor:
    """Score-CAM: w_k = softmax_k(score of X * norm(Up(A^k))) (N, K, h, w), gradient-free.

    For each image the C activation maps are upsampled (bilinear, ``align_corners=False``),
    min-max normalised to [0, 1] and multiplied into the input; the masked images run through
    the model in chunks of ``chunk_size`` (default: the batch size N), and the weights are the
    softmax over channels of the target-class logit.  The paper subtracts a baseline score
    ``f(X_b)`` first; it is the same for every channel, so the softmax cancels it and we skip that
    forward.  Logits (not probabilities) follow pytorch-grad-cam's ``ClassifierOutputTarget``.
    """
    # Wang et al., CVPRW 2020, arXiv 1910.01279, Eq. 4-6.
    if inp.images is None or inp.forward is None:
        raise CamError("method 'scorecam' needs the input images and a forward function")
    acts, images, targets = inp.activations, inp.images, inp.targets
    n, c, h, w = acts.shape
    flat = acts.reshape(n * c, 1, h, w)
    owner = torch.arange(n, device=acts.device).repeat_interleave(c)  # image of each mask
    scores = torch.empty(n * c, inp.num_targets, device=acts.device, dtype=torch.float32)
    chunk = max(1, inp.chunk_size or n)
    for start in range(0, n * c, chunk):
        sl = slice(start, start + chunk)
        up = F.interpolate(flat[sl], size=images.shape[-2:], mode="bilinear", align_corners=False)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + SCORECAM_EPS)
        logits = inp.forward(images[owner[sl]] * masks.to(images.dtype))
        scores[sl] = logits.float().gather(1, targets[owner[sl]])
    weights = torch.softmax(scores.view(n, c, -1), dim=1).transpose(1, 2)  # (N, K, C)
    return _weighted_sum(weights, acts)


METHODS: dict[str, MethodSpec] = {
    "gradcam": MethodSpec("gradcam", gradcam, needs_grads=True, paper="arXiv 1610.02391"),
    "gradcam_pp": MethodSpec("gradcam_pp", gradcam_pp, needs_grads=True, paper="arXiv 1710.11063"),
    "xgradcam": MethodSpec("xgradcam", xgradcam, needs_grads=True, paper="arXiv 2008.02312"),
    "layercam": MethodSpec("layercam", layercam, needs_grads=True, paper="IEEE TIP 2021"),
    "hirescam": MethodSpec("hirescam", hirescam, needs_grads=True, paper="arXiv 2011.08891"),
    "scorecam": MethodSpec("scorecam", scorecam, needs_forward=True, paper="arXiv 1910.01279"),
    "eigencam": MethodSpec("eigencam", eigencam, paper="arXiv 2008.00299"),
    "cam": MethodSpec("cam", cam, needs_head=True, paper="arXiv 1512.04150"),
}
# One name per thing: the registry must list exactly the config's CamMethod literal.
assert tuple(METHODS) == get_args(CamMethod), "METHODS and config.CamMethod disagree"


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; unknown names raise :class:`CamError` listing choices."""
    if name not in METHODS:
        # Other libraries spell them "gradcam++", "Grad-CAM", "ScoreCAM": suggest our name.
        alias = str(name).lower().replace("++", "_pp").replace("-", "").replace(" ", "")
        if alias in METHODS:
            raise CamError(
                f"unknown CAM method {name!r}; did you mean {alias!r}? Valid choices: {', '.join(METHODS)}"
            )
        raise CamError(choice_message("CAM method", name, METHODS))
    return METHODS[name]


def run_method(name: str, inputs: CamInputs, relu: bool = True) -> Tensor:
    """Raw map (N, K, h, w) float32 of method ``name``; ReLU'd unless ``relu=False``."""
    maps = get_method(name).fn(inputs).float()
    # Paper convention: keep only features with a positive influence on the class (Grad-CAM Eq. 2).
    return F.relu(maps) if relu else maps
