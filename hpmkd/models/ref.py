"""The one value that names a model everywhere: :class:`ModelRef` (a name and its options) and :class:`DataShape`.

The same :class:`ModelRef` is what the YAML holds (``model`` + ``options``), what a stage's params and artifact carry,
what the teacher actors build, what the logit cache keys on (:meth:`ModelRef.identity`) and what the feature-tap lookup
reads (:meth:`ModelRef.taps`). Architectures are built in one place, :meth:`ModelRef.build`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import count_params, model_taps
from hpmkd.models.factory import create_model


#: ``torch.nn.init`` functions skipped on meta tensors while a model is built on the meta device
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


def skipping_on_meta(init: Any) -> Any:
    @functools.wraps(init)
    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return skip


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device (shapes only) without running weight initialisers on them: their values do
    not exist, and running them imports torch's compiler stack (about a second). Initialisers on real tensors (other
    threads) run as usual."""
    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    for name, init in originals.items():
        setattr(torch.nn.init, name, skipping_on_meta(init))
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, init in originals.items():
            setattr(torch.nn.init, name, init)


@dataclass(frozen=True)
class DataShape:
    """What a model is sized for: the number of classes and one input's shape (``(C, H, W)``, or ``(D,)`` rows)."""

    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelRef:
    """A model from :func:`hpmkd.models.create_model` by ``model`` name, with its keyword ``options``."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, shape: DataShape) -> nn.Module:
        """The architecture (fresh weights) for ``shape``."""
        return create_model(self.model, num_classes=shape.num_classes, in_channels=shape.input_shape[0],
                            input_shape=shape.input_shape, **self.options)

    def taps(self, shape: DataShape) -> ModelTaps:
        """Where the model's features are (built on the meta device: no memory, no compute)."""
        with on_meta():
            return model_taps(self.build(shape))

    def count_params(self, shape: DataShape) -> int:
        """The number of parameters (counted on the meta device)."""
        with on_meta():
            return count_params(self.build(shape))

    def identity(self, shape: DataShape) -> str:
        """What identifies the architecture in a cache key: name, options and the shape it was built for."""
        return f"{self.model}:{sorted(self.options.items())}:{shape.num_classes}:{tuple(shape.input_shape)}"
