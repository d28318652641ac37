"""Multinomial logistic regression as a student: one linear layer on the flattened input (an MLP with no hidden
layer, :class:`hpmkd.models.mlp.MLP` with ``depth=0``). Its own family: the chain planner has no knob to scale."""

from __future__ import annotations

from hpmkd.models.base import MODELS
from hpmkd.models.mlp import MLP
from hpmkd.models.tabular import features_of


@MODELS.register("logistic_regression")
def logistic_regression(num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None) -> MLP:
    """``softmax(W x + b)``: taps ``flatten`` (embedding) and ``fc`` (classifier)."""
    return MLP(num_classes, features_of("logistic_regression", input_shape), depth=0)
