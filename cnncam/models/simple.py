"""``simple_cnn``: the conv-BN-ReLU-pool network every cats-vs-dogs tutorial writes by hand.

The seeds (Keras/PyTorch blog posts) stack 3-4 blocks of ``Conv 3x3 -> BN -> ReLU ->
MaxPool 2`` and then ``Flatten -> Linear(C*h*w, ...)`` with ``h*w`` hard-coded for one
input size (``nn.Linear(256 * 8 * 8, 512)`` for 128 px).  Two heads:

* ``gap`` (default): global average pooling, so the same network runs at any input size and
  the last block's output is a CAM-friendly ``conv -> GAP -> linear`` head (Zhou et al., CVPR
  2016, arXiv 1512.04150: with a GAP head, Grad-CAM equals the original CAM, and the CAM engine
  takes its no-backward fast path).  A GAP head only averages what each position sees, so the
  blocks' receptive field (:func:`receptive_field`) should cover the image: with one conv per
  block, three blocks see 22 px, far less than a 64-150 px input; two convs per block and
  enough blocks fix that (the trainer warns when they do not).
* ``flatten``: the seeds' spatial head.  The last feature map is average-pooled to a fixed
  ``flatten_grid x flatten_grid`` (the identity when it already has that size, e.g. 64 px
  after 4 blocks with grid 4), flattened and fed to the dense layers, so the classifier knows
  *where* each feature is and the network still runs at any input size.

Module names (stable, they appear in configs, HDF5 group names and reports)::

    features.block1.{conv1,bn1,relu1,...,pool}   ... features.blockN.*  (no pool: model.last_pool false)
    pool     AdaptiveAvgPool2d(1) (gap) or GridPool(flatten_grid) (flatten)
    flatten
    hidden   Linear-ReLU-Dropout when ``hidden > 0``, else Identity
    dropout
    fc       the classifier (``ModelSpec.head``)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cnncam.config import ModelConfig


def conv_block(in_channels: int, out_channels: int, convs: int, pool: bool = True) -> nn.Sequential:
    """``convs`` x (Conv 3x3 pad 1 -> BN -> ReLU), then MaxPool 2 when ``pool``.

    (B, Cin, H, W) -> (B, Cout, H//2, W//2), or (B, Cout, H, W) without the pool.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i in range(1, convs + 1):
        # bias=False: BatchNorm's shift makes a conv bias redundant (torchvision does the same).
        layers[f"conv{i}"] = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(out_channels)
        # In-place like torchvision; the CAM engine reads hooked outputs before they are reused.
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        channels = out_channels
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def receptive_field(blocks: int, convs_per_block: int, last_pool: bool = True) -> int:
    """Side in pixels of the input window one output position of the last block sees.

    Each 3x3 conv widens the window by 2 x the current stride, each 2x2 max-pool by 1 x the
    stride and then doubles the stride (Araujo et al., Distill 2019, "Computing receptive fields").
    """
    size, stride = 1, 1
    for b in range(blocks):
        size += 2 * stride * convs_per_block
        if last_pool or b < blocks - 1:
            size += stride
            stride *= 2
    return size


class GridPool(nn.AdaptiveAvgPool2d):
    """Average-pool (B, C, H, W) to (B, C, grid, grid); the identity when H == W == grid.

    An ``AdaptiveAvgPool2d`` (so CAM layer discovery treats it as the head's pool, not a feature
    layer) that skips the op in the identity case on purpose: that is the seeds' exact
    Flatten -> Dense, and CUDA's adaptive-pool backward has no deterministic kernel
    (``train.deterministic``).
    """

    def __init__(self, grid: int) -> None:
        super().__init__(grid)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.grid, self.grid):
            return x
        return super().forward(x)


class SimpleCNN(nn.Module):
    """Blocks of conv-BN-ReLU-pool, a GAP or flatten head, optional hidden layer, linear classifier.

    Parameters
    ----------
    num_classes:
        Output logits per image.
    channels:
        Output channels of each block, e.g. ``(32, 64, 128)``; each block halves H and W.
    convs_per_block:
        Conv-BN-ReLU triples per block before its max-pool.
    hidden:
        Units of an extra Linear-ReLU-Dropout before ``fc`` (0 = none).
    dropout:
        Dropout probability before ``fc`` (and inside ``hidden``).
    in_channels:
        Input image channels (3: grayscale X-rays are loaded as RGB).
    head:
        ``gap`` (global average pooling) or ``flatten`` (pool to ``flatten_grid`` squared cells,
        flatten: the classifier sees the spatial layout).
    flatten_grid:
        Cells per side of the flatten head's grid.
    last_pool:
        Max-pool after the last block too.  Without it the last block keeps its resolution: CAM
        maps twice as fine (8x8 instead of 4x4 at 64 px after 4 blocks) for the same compute.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128),
        convs_per_block: int = 1,
        hidden: int = 0,
        dropout: float = 0.3,
        in_channels: int = 3,
        head: str = "gap",
        flatten_grid: int = 4,
        last_pool: bool = True,
    ) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_channels
        for i, out in enumerate(channels, 1):
            blocks[f"block{i}"] = conv_block(prev, out, convs_per_block, pool=last_pool or i < len(channels))
            prev = out
        self.features = nn.Sequential(blocks)
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
        if head == "flatten":
            self.pool = GridPool(flatten_grid)
            prev *= flatten_grid * flatten_grid
        self.flatten = nn.Flatten(1)
        self.hidden: nn.Module = nn.Identity()
        if hidden > 0:
            self.hidden = nn.Sequential(
                OrderedDict(
                    linear=nn.Linear(prev, hidden), relu=nn.ReLU(inplace=True), dropout=nn.Dropout(dropout)
                )
            )
            prev = hidden
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming (He et al., ICCV 2015, arXiv 1502.01852) for ReLU convs, as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Small classifier weights start the logits near zero (uniform softmax, loss ~ log K).
        nn.init.normal_(self.fc.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes); any H, W >= 2 ** (number of pools)."""
        x = self.features(x)
        x = self.flatten(self.pool(x))
        x = self.hidden(x)
        return self.fc(self.dropout(x))


def build_simple_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``simple_cnn`` from ``model.channels``, ``convs_per_block``, ``head``, ``hidden`` and ``dropout``."""
    return SimpleCNN(
        num_classes,
        channels=cfg.channels,
        convs_per_block=cfg.convs_per_block,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        head=cfg.head,
        flatten_grid=cfg.flatten_grid,
        last_pool=cfg.last_pool,
    )
