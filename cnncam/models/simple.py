"""``simple_cnn``: the conv-BN-ReLU-pool network every cats-vs-dogs tutorial writes by hand.

The seeds (Keras/PyTorch blog posts) stack 3-4 blocks of ``Conv 3x3 -> BN -> ReLU ->
MaxPool 2`` and then ``Flatten -> Linear(C*h*w, ...)`` with ``h*w`` hard-coded for one
input size (``nn.Linear(256 * 8 * 8, 512)`` for 128 px).  We keep the blocks but end with
global average pooling, so the same network runs at 32, 64, 150 or 224 px and the last
block's output is a CAM-friendly ``conv -> GAP -> linear`` head (Zhou et al., CVPR 2016,
arXiv 1512.04150: with a GAP head, Grad-CAM equals the original CAM).

Module names (stable, they appear in configs, HDF5 group names and reports)::

    features.block1.{conv1,bn1,relu1,...,pool}   ... features.blockN.*
    pool     AdaptiveAvgPool2d(1)
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


def conv_block(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """``convs`` x (Conv 3x3 pad 1 -> BN -> ReLU), then MaxPool 2: (B, Cin, H, W) -> (B, Cout, H//2, W//2)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i in range(1, convs + 1):
        # bias=False: BatchNorm's shift makes a conv bias redundant (torchvision does the same).
        layers[f"conv{i}"] = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(out_channels)
        # In-place like torchvision; the CAM engine reads hooked outputs before they are reused.
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        channels = out_channels
    layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


class SimpleCNN(nn.Module):
    """Blocks of conv-BN-ReLU-pool, global average pooling, optional hidden layer, linear classifier.

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
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128),
        convs_per_block: int = 1,
        hidden: int = 0,
        dropout: float = 0.3,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_channels
        for i, out in enumerate(channels, 1):
            blocks[f"block{i}"] = conv_block(prev, out, convs_per_block)
            prev = out
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
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
        """(B, in_channels, H, W) -> logits (B, num_classes); any H, W >= 2**len(channels)."""
        x = self.features(x)
        x = self.flatten(self.pool(x))
        x = self.hidden(x)
        return self.fc(self.dropout(x))


def build_simple_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``simple_cnn`` from ``model.channels``, ``convs_per_block``, ``hidden`` and ``dropout``."""
    return SimpleCNN(
        num_classes,
        channels=cfg.channels,
        convs_per_block=cfg.convs_per_block,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
    )
