"""The ResNet-like MLP for tables of Gorishniy et al. (the other tabular students: :mod:`hpmkd.models.mlp` and
:mod:`hpmkd.models.linear`).

``tabular_resnet`` follows "Revisiting Deep Learning Models for Tabular Data" (Gorishniy, Rubachev, Khrulkov,
Babenko, NeurIPS 2021, section 3.2, reference code ``yandex-research/rtdl``)::

    ResNet(x)     = Prediction(ResNetBlock(... ResNetBlock(Linear(x))))
    ResNetBlock(x) = x + Dropout(Linear(Dropout(ReLU(Linear(Norm(x))))))
    Prediction(x)  = Linear(ReLU(Norm(x)))

with ``width`` = d, ``depth`` blocks, hidden size ``hidden_factor · d``, ``hidden_dropout`` and
``residual_dropout``. The paper's Norm is BatchNorm; ``norm: layer`` (our default) uses LayerNorm, which does not
fail on a training batch of one row (the last batch of an epoch can be one row).
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive
from hpmkd.registry import ConfigError


def features_of(model: str, input_shape: tuple[int, ...] | None) -> int:
    if input_shape is None:
        raise ConfigError(f"model {model!r} needs input_shape (one row's shape, e.g. (30,)) to size its first layer.")
    return math.prod(input_shape)


def norm_layer(kind: str, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if kind == "batch" else nn.LayerNorm(width)


class ResNetBlock(nn.Module):
    def __init__(self, width: int, hidden: int, hidden_dropout: float, residual_dropout: float, norm: str):
        super().__init__()
        self.body = nn.Sequential(norm_layer(norm, width), nn.Linear(width, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(hidden_dropout), nn.Linear(hidden, width), nn.Dropout(residual_dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TabularResNet(nn.Module):
    """Taps: ``block1``..``blockN`` (``[B, width]``), embedding ``head_act`` (after the head's norm and ReLU),
    classifier ``fc``."""

    def __init__(self, num_classes: int, in_features: int, width: int = 64, depth: int = 2,
                 hidden_factor: float = 2.0, hidden_dropout: float = 0.1, residual_dropout: float = 0.0,
                 norm: Literal["layer", "batch"] = "layer"):
        super().__init__()
        check_positive(num_classes=num_classes, in_features=in_features, width=width, hidden_factor=hidden_factor)
        if depth < 1:
            raise ValueError(f"depth (the number of residual blocks) must be >= 1, got {depth}.")
        if norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', got {norm!r}.")
        for name, p in (("hidden_dropout", hidden_dropout), ("residual_dropout", residual_dropout)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")
        self.flatten = nn.Flatten(1)
        self.stem = nn.Linear(in_features, width)
        self.block_names = tuple(f"block{i + 1}" for i in range(depth))
        hidden = max(1, round(hidden_factor * width))
        for name in self.block_names:
            self.add_module(name, ResNetBlock(width, hidden, hidden_dropout, residual_dropout, norm))
        self.head_norm = norm_layer(norm, width)
        self.head_act = nn.ReLU()
        self.fc = nn.Linear(width, num_classes)
        self.taps = ModelTaps(feature_taps=self.block_names, embedding_tap="head_act", classifier_tap="fc")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.flatten(x))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(self.head_act(self.head_norm(x)))


@MODELS.register("tabular_resnet")
def tabular_resnet(num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None, width: int = 64,
                   depth: int = 2, hidden_factor: float = 2.0, hidden_dropout: float = 0.1,
                   residual_dropout: float = 0.0, norm: Literal["layer", "batch"] = "layer") -> TabularResNet:
    """The ResNet-like MLP for tables (module docstring)."""
    return TabularResNet(num_classes, features_of("tabular_resnet", input_shape), width, depth, hidden_factor,
                         hidden_dropout, residual_dropout, norm)
