"""A plain convolutional network with smooth width and depth knobs (our design, for small experiments).

Layout: a 3×3 conv-BN-ReLU stem with ``width`` channels, then ``min(stages, depth)`` stages of 3×3 conv-BN-ReLU
blocks. Stage ``i`` (1-based) has ``width · 2^(i-1)`` channels and starts with a stride-2 block (except stage 1), so
a 28×28 input gives 28, 14, 7 maps. The ``depth`` blocks are spread over the stages as evenly as possible, the
shallow stages taking the remainder (cheap blocks first, so the parameter count grows in small steps with ``depth``).
Then global average pooling (``pool``), optional dropout and a linear head (``fc``).

Presets (parameter counts for a 1×28×28 input and 10 classes): ``cnn_tiny`` 10,560, ``cnn_small`` 103,466,
``cnn_medium`` 667,354, ``cnn_large`` 1,849,530.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (no bias) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def blocks_per_stage(depth: int, stages: int) -> list[int]:
    """``depth`` blocks over ``min(stages, depth)`` stages, as even as possible, extra blocks in the shallow stages."""
    n = min(stages, depth)
    return [depth // n + (1 if i < depth % n else 0) for i in range(n)]


@MODELS.register("cnn")
class SimpleCNN(nn.Module):
    """A conv-BN-ReLU network: ``width`` stem channels (doubling per stage), ``depth`` blocks over ``stages``
    stages (see the module docstring). ``stem_stride=2`` halves the resolution at the stem: the same parameters
    at about a quarter of the compute (how the default config keeps a CNN teacher fast on a CPU).
    Taps: ``stage1``..``stageN`` (maps), ``pool`` (embedding), ``fc`` (classifier)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: int = 32,
        depth: int = 3,
        stages: int = 3,
        dropout: float = 0.0,
        stem_stride: int = 1,
    ):
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth, stages=stages,
                       stem_stride=stem_stride)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.stem = conv_bn_relu(in_channels, width, stride=stem_stride)
        channels = width
        names = []
        for i, blocks in enumerate(blocks_per_stage(depth, stages)):
            out = width * 2**i
            layers = [conv_bn_relu(channels, out, stride=1 if i == 0 else 2)]
            layers += [conv_bn_relu(out, out) for _ in range(blocks - 1)]
            names.append(f"stage{i + 1}")
            self.add_module(names[-1], nn.Sequential(*layers))
            channels = out
        self.stage_names = tuple(names)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.taps = ModelTaps(feature_taps=self.stage_names, embedding_tap="pool", classifier_tap="fc")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def cnn_preset(name: str, default_width: int, default_depth: int) -> None:
    """Register ``name`` as ``cnn`` (:class:`SimpleCNN`) with its own ``width``/``depth`` defaults (still overridable)."""
    build = functools.partial(SimpleCNN, width=default_width, depth=default_depth)
    build.__doc__ = f"``cnn`` with width={default_width}, depth={default_depth}."
    MODELS.register(name)(build)


cnn_preset("cnn_tiny", 10, 3)
cnn_preset("cnn_small", 32, 3)
cnn_preset("cnn_medium", 48, 6)
cnn_preset("cnn_large", 80, 6)
