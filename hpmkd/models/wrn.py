"""Wide ResNets as in RepDistiller (``models/wrn.py``; Zagoruyko & Komodakis 2016).

``WRN-d-k``: a 3×3 conv stem with 16 channels, three groups (``block1``..``block3``) of ``n = (d − 4) / 6``
pre-activation BasicBlocks with ``16k, 32k, 64k`` channels (stride 2 at groups 2 and 3), BN-ReLU, global average
pooling and a linear head. Module and parameter names equal RepDistiller's, so its checkpoints load.

Differences from RepDistiller, all without parameters: an ``nn.AdaptiveAvgPool2d(1)`` module (``avgpool``) replaces
``F.avg_pool2d(out, 8)`` (same on 32×32 inputs; works on 28×28, and gives the embedding a module to tap), and the
first conv takes ``in_channels``. ``widen_factor`` may be fractional (ours; widths are rounded).

Parameter counts with 100 classes: wrn_16_1 180,916; wrn_16_2 703,284; wrn_40_1 569,780; wrn_40_2 2,255,156.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive, scaled


class BasicBlock(nn.Module):
    """Pre-activation block: ``conv2(drop(relu(bn2(conv1(relu(bn1(x))))))) + shortcut``, the shortcut a 1×1 conv of
    ``relu(bn1(x))`` when the width changes, ``x`` otherwise (RepDistiller ``wrn.BasicBlock``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """``nb_layers`` blocks; the first changes the width and applies ``stride``."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Taps: ``block1``..``block3`` (group outputs, pre-activation, as in the attention-transfer code), ``avgpool``
    (embedding), ``fc`` (classifier)."""

    def __init__(
        self, depth: int, num_classes: int, widen_factor: float = 1.0, drop_rate: float = 0.0, in_channels: int = 3
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"a WRN's depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}.")
        check_positive(num_classes=num_classes, in_channels=in_channels, widen_factor=widen_factor)
        if not 0 <= drop_rate < 1:
            raise ValueError(f"dropout must be in [0, 1), got {drop_rate}.")
        channels = [16] + [scaled(c, widen_factor) for c in (16, 32, 64)]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.taps = ModelTaps(feature_taps=("block1", "block2", "block3"), embedding_tap="avgpool", classifier_tap="fc")

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.avgpool(out).flatten(1))


@MODELS.register("wrn")
def wrn(
    num_classes: int, in_channels: int, depth: int = 16, widen_factor: float = 1.0, dropout: float = 0.0
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` (``depth`` = 6n+4) with dropout ``dropout`` inside the blocks."""
    return WideResNet(depth, num_classes, widen_factor=widen_factor, drop_rate=dropout, in_channels=in_channels)


def wrn_preset(default_depth: int, default_widen: int) -> None:
    """Register ``wrn_<depth>_<k>`` as :func:`wrn` with its own ``depth`` and ``widen_factor`` defaults."""
    name = f"wrn_{default_depth}_{default_widen}"

    def build(
        num_classes: int,
        in_channels: int,
        depth: int = default_depth,
        widen_factor: float = default_widen,
        dropout: float = 0.0,
    ) -> WideResNet:
        return wrn(num_classes, in_channels, depth=depth, widen_factor=widen_factor, dropout=dropout)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"RepDistiller's {name}: WRN-{default_depth}-{default_widen}."
    MODELS.register(name)(build)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    wrn_preset(_depth, _widen)
