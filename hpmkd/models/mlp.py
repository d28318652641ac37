"""A multi-layer perceptron for any input shape (tabular rows, or images flattened).

``flatten`` → ``depth`` × (Linear → ReLU → Dropout), named ``hidden1``..``hiddenN`` (``hidden`` units each) →
``fc``. ``depth=0`` is multinomial logistic regression.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive
from hpmkd.registry import ConfigError


class MLP(nn.Module):
    """Taps: ``hidden1``..``hiddenN`` (``[B, hidden]``), embedding = the last hidden layer (``flatten`` when
    ``depth=0``), classifier ``fc``."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 256, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        check_positive(num_classes=num_classes, in_features=in_features, hidden=hidden)
        if depth < 0:
            raise ValueError(f"depth (the number of hidden layers) must be >= 0, got {depth}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.flatten = nn.Flatten(1)
        names = []
        width = in_features
        for i in range(depth):
            names.append(f"hidden{i + 1}")
            layer = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
            self.add_module(names[-1], layer)
            width = hidden
        self.hidden_names = tuple(names)
        self.fc = nn.Linear(width, num_classes)
        self.taps = ModelTaps(
            feature_taps=self.hidden_names, embedding_tap=names[-1] if names else "flatten", classifier_tap="fc"
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for name in self.hidden_names:
            x = getattr(self, name)(x)
        return self.fc(x)


@MODELS.register("mlp")
def mlp(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    hidden: int = 256,
    depth: int = 2,
    dropout: float = 0.0,
) -> MLP:
    """An MLP over the flattened input: ``depth`` hidden layers of ``hidden`` units. ``input_shape`` is one
    sample's shape (``(30,)`` for 30 tabular features, ``(1, 28, 28)`` for MNIST); its first entry must be
    ``in_channels``."""
    if input_shape is None:
        raise ConfigError(
            "model 'mlp' needs input_shape (one sample's shape, e.g. (30,) or (1, 28, 28)) to size its first layer."
        )
    if input_shape[0] != in_channels:
        raise ConfigError(
            f"model 'mlp': input_shape {tuple(input_shape)} does not start with in_channels={in_channels}."
        )
    return MLP(num_classes, math.prod(input_shape), hidden=hidden, depth=depth, dropout=dropout)
