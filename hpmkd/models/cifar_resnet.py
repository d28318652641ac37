"""CIFAR ResNets as in RepDistiller / mdistiller (``models/resnet.py``; He et al. 2016, section 4.2).

A 3×3 conv-BN-ReLU stem with ``w0`` channels, three stages of ``n = (depth − 2) / 6`` BasicBlocks with ``w1, w2,
w3`` channels (stride 2 at stages 2 and 3; a 1×1 conv + BN shortcut where the shape changes), global average pooling
and a linear head. ``resnetD`` uses widths (16, 16, 32, 64); ``resnet8x4`` / ``resnet32x4`` use (32, 64, 128, 256).
Module and parameter names equal RepDistiller's, so its checkpoints load.

Differences from RepDistiller, all without parameters: ``nn.AdaptiveAvgPool2d(1)`` replaces ``nn.AvgPool2d(8)`` (the
same on 32×32 inputs; it also works on 28×28), the first conv takes ``in_channels``, and the blocks return only their
output (features are read with forward hooks instead of ``is_feat``). ``width_mult`` (ours) scales all widths.

Parameter counts with 100 classes: resnet8 83,892; resnet14 181,108; resnet20 278,324; resnet32 472,756;
resnet44 667,188; resnet56 861,620; resnet110 1,736,564; resnet8x4 1,233,540; resnet32x4 7,433,860.
"""

from __future__ import annotations

from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive, scaled

CIFAR_WIDTHS = (16, 16, 32, 64)
CIFAR_X4_WIDTHS = (32, 64, 128, 256)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` (RepDistiller ``BasicBlock``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return (out + residual).relu()


class CifarResNet(nn.Module):
    """Taps: ``layer1``..``layer3`` (maps), ``avgpool`` (embedding), ``fc`` (classifier)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet's depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, ...), got {depth}.")
        check_positive(num_classes=num_classes, in_channels=in_channels)
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self.taps = ModelTaps(feature_taps=("layer1", "layer2", "layer3"), embedding_tap="avgpool", classifier_tap="fc")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@MODELS.register("cifar_resnet")
def cifar_resnet(
    num_classes: int,
    in_channels: int,
    depth: int = 20,
    width_mult: float = 1.0,
    widths: tuple[int, int, int, int] = CIFAR_WIDTHS,
) -> CifarResNet:
    """A CIFAR ResNet of ``depth`` = 6n+2 layers with stem/stage ``widths`` scaled by ``width_mult``."""
    check_positive(width_mult=width_mult)
    if len(widths) != 4:
        raise ValueError(f"widths lists the stem and three stage widths (4 numbers), got {list(widths)}.")
    return CifarResNet(depth, tuple(scaled(w, width_mult) for w in widths), num_classes, in_channels)


def resnet_preset(name: str, default_depth: int, widths: tuple[int, int, int, int]) -> None:
    """Register ``name`` as :func:`cifar_resnet` with its own ``depth`` default and ``widths``."""

    def build(num_classes: int, in_channels: int, depth: int = default_depth, width_mult: float = 1.0) -> CifarResNet:
        return cifar_resnet(num_classes, in_channels, depth=depth, width_mult=width_mult, widths=widths)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"RepDistiller's {name}: CIFAR ResNet, depth {default_depth}, widths {widths}."
    MODELS.register(name)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    resnet_preset(f"resnet{_depth}", _depth, CIFAR_WIDTHS)
resnet_preset("resnet8x4", 8, CIFAR_X4_WIDTHS)
resnet_preset("resnet32x4", 32, CIFAR_X4_WIDTHS)
