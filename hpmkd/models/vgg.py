"""CIFAR VGGs with BatchNorm as in RepDistiller (``models/vgg.py``, ``vgg8_bn`` / ``vgg13_bn``).

Five blocks ``block0``..``block4`` of ``depth`` 3×3 conv-BN(-ReLU) layers with (64, 128, 256, 512, 512) channels
(the last ReLU of a block is applied outside it), 2×2 max pooling after blocks 0-2 (and after block 3 for 64×64
inputs), global average pooling and one linear layer. ``vgg8`` has one conv per block (RepDistiller cfg ``S``),
``vgg13`` two (cfg ``B``). Module and parameter names equal RepDistiller's, so its checkpoints load.

Differences from RepDistiller, all without parameters: the post-block ReLUs are modules (``relu0``..``relu4``) so that
hooks can read them, and the first conv takes ``in_channels``. ``width_mult`` (ours) scales all widths.

Parameter counts with 100 classes: vgg8 3,965,028; vgg13 9,462,180.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive, scaled

VGG_WIDTHS = (64, 128, 256, 512, 512)


def make_block(width: int, depth: int, in_channels: int) -> nn.Sequential:
    """``depth`` × (conv3×3 → BN → ReLU), without the final ReLU (RepDistiller ``VGG._make_layers``)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Taps: ``relu0``..``relu4`` (activated block outputs), ``pool4`` (embedding), ``classifier``."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 1, widths: tuple[int, ...] = VGG_WIDTHS):
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, depth=depth)
        previous = in_channels
        for i, width in enumerate(widths):
            self.add_module(f"block{i}", make_block(width, depth, previous))
            previous = width
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        for i in range(5):
            self.add_module(f"relu{i}", nn.ReLU())
        self.classifier = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self.taps = ModelTaps(
            feature_taps=tuple(f"relu{i}" for i in range(5)), embedding_tap="pool4", classifier_tap="classifier"
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


@MODELS.register("vgg")
def vgg(num_classes: int, in_channels: int, depth: int = 1, width_mult: float = 1.0) -> VGG:
    """A CIFAR VGG with ``depth`` convs per block and widths (64, 128, 256, 512, 512) × ``width_mult``."""
    check_positive(width_mult=width_mult)
    return VGG(num_classes, in_channels, depth, tuple(scaled(w, width_mult) for w in VGG_WIDTHS))


def vgg_preset(name: str, default_depth: int) -> None:
    """Register ``name`` as :func:`vgg` with its own ``depth`` default."""

    def build(num_classes: int, in_channels: int, depth: int = default_depth, width_mult: float = 1.0) -> VGG:
        return vgg(num_classes, in_channels, depth=depth, width_mult=width_mult)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"RepDistiller's {name}_bn: {default_depth} conv(s) per block."
    MODELS.register(name)(build)


vgg_preset("vgg8", 1)
vgg_preset("vgg13", 2)
