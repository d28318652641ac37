"""The model registry and the small helpers every model family shares.

:data:`MODELS` maps a name (``cnn_small``, ``resnet56``, ``wrn_40_2`` ...) to a factory. Every factory takes the
context keyword arguments ``num_classes`` and ``in_channels`` (``input_shape`` too when it declares it: only models
that accept inputs of any shape, such as ``mlp``, do) plus its own options, and returns an ``nn.Module`` whose
``taps`` attribute is a :class:`~hpmkd.distill_batch.ModelTaps`.

Scaling knobs: each family exposes its depth and width as explicit keyword arguments (``depth`` plus ``width`` /
``hidden`` / ``width_mult`` / ``widen_factor``), and every preset accepts the same knobs with its own values as the
defaults, so ``create_model("resnet56", ..., width_mult=0.5)`` is a half-width ResNet-56.
"""

from __future__ import annotations

from torch import nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model", context=("num_classes", "in_channels", "input_shape"))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters of ``model`` (shared parameters counted once); only those with
    ``requires_grad`` when ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_taps(model: nn.Module) -> ModelTaps:
    """The :class:`ModelTaps` of a model built by :func:`hpmkd.models.create_model` (its ``taps`` attribute)."""
    taps = getattr(model, "taps", None)
    if not isinstance(taps, ModelTaps):
        raise ValueError(
            f"{type(model).__name__} has no feature-tap metadata (model.taps). Build it with "
            f"hpmkd.models.create_model, or set model.taps = ModelTaps(feature_taps=(...), embedding_tap=..., "
            f"classifier_tap=...) with module names from model.named_modules()."
        )
    return taps


def scaled(channels: int, mult: float) -> int:
    """``max(1, round(channels · mult))``: a width after multiplying by ``mult`` (never zero channels)."""
    return max(1, int(round(channels * mult)))


def check_positive(**values: float) -> None:
    """A :class:`ValueError` naming the first keyword argument that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}.")
