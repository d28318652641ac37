"""``create_model``: one entry point for hpmkd's models, torchvision's and timm's.

A name is looked up in that order: hpmkd's own (:data:`hpmkd.models.base.MODELS`), then torchvision's, then timm's.
A torchvision or timm name that an earlier source already uses is reached with a prefix (``torchvision.vgg13``,
``timm.resnet18``). torchvision and timm are imported only for names that are not ours (or, for timm, not
torchvision's either)."""

from __future__ import annotations

from typing import Any

from torch import nn

from hpmkd.models.base import MODELS
from hpmkd.models.timm_models import TIMM_PREFIX, TimmNet, timm_names
from hpmkd.models.tv import TorchvisionNet, torchvision_names
from hpmkd.registry import ConfigError, close_names, user_options

#: Prefix that names a torchvision model whose bare name one of ours already uses (``torchvision.vgg13``).
TORCHVISION_PREFIX = "torchvision."


def torchvision_models() -> dict[str, str]:
    """Public name -> torchvision name: the bare name, or ``torchvision.<name>`` where one of ours has that name."""
    return {(TORCHVISION_PREFIX + n if n in MODELS else n): n for n in torchvision_names()}


def timm_models() -> dict[str, str]:
    """Public name -> timm name: the bare name, or ``timm.<name>`` where ours or torchvision's has that name."""
    taken = set(MODELS.names()) | set(torchvision_models())
    return {(TIMM_PREFIX + n if n in taken else n): n for n in timm_names()}


def is_model(name: str) -> bool:
    """Whether :func:`create_model` builds ``name`` (torchvision and timm are imported only for names that are not
    ours)."""
    return name in MODELS or name in torchvision_models() or name in timm_models()


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts: ours, then torchvision's, then timm's."""
    return MODELS.names() + sorted(torchvision_models()) + sorted(timm_models())


def create_model(
    name: str, num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None = None, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and inputs with ``in_channels`` channels.

    ``input_shape`` is one sample's shape (``(1, 28, 28)``, or ``(30,)`` for tabular rows); models that take any
    shape (``mlp``) need it, image models check it is ``(C, H, W)``. ``kwargs`` are the model's own options (for
    torchvision models, ``pretrained=True`` loads ImageNet weights; the rest goes to the torchvision builder; timm
    models take timm's options, ``pretrained`` and ``checkpoint``, :mod:`hpmkd.models.timm_models`). The returned
    model has ``model.taps`` (:class:`hpmkd.distill_batch.ModelTaps`).
    """
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if not input_shape or input_shape[0] != in_channels:
            raise ConfigError(
                f"model {name!r}: input_shape {input_shape} does not start with in_channels={in_channels}."
            )
    if name in MODELS:
        takes_any_shape = "input_shape" in (user_options(MODELS.get(name), ()) or ())
        if input_shape is not None and not takes_any_shape:
            check_image_shape(name, input_shape)
        return MODELS.build(
            name, kwargs, num_classes=num_classes, in_channels=in_channels, input_shape=input_shape
        )
    tv_models = torchvision_models()  # imports torchvision (about a second): only for names that are not ours
    if name in tv_models:
        if input_shape is not None:
            check_image_shape(name, input_shape)
        try:
            return TorchvisionNet(tv_models[name], num_classes, in_channels, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model {name!r} (torchvision) rejected its options {kwargs}: {err}") from err
    timm_by_name = timm_models()
    if name in timm_by_name:
        if input_shape is not None:
            check_image_shape(name, input_shape)
        try:
            return TimmNet(timm_by_name[name], num_classes, in_channels, input_shape, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model {name!r} (timm) rejected its options {kwargs}: {err}") from err
    hits = [h for source in (MODELS.names(), tv_models, timm_by_name) for h in close_names(name, source, n=3)]
    hint = f" Did you mean {', '.join(repr(h) for h in dict.fromkeys(hits))}?" if hits else ""
    raise ConfigError(f"unknown model {name!r}.{hint} `hpmkd models` lists every name (hpmkd's, torchvision's and "
                      f"timm's).")


def check_image_shape(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model {name!r} is an image model and needs inputs of shape (C, H, W); got input_shape {input_shape}. "
            f"For tabular data use 'mlp'."
        )
