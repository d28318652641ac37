"""Batch augmentations on already-normalised image tensors ``[B, C, H, W]``, vectorised and driven by a
``torch.Generator`` so a run is reproducible.

* ``none``: the batch unchanged.
* ``flip``: each image mirrored left-right with probability 1/2 (torchvision ``RandomHorizontalFlip``).
* ``crop_flip``: the standard CIFAR augmentation (He et al., 2016, "Deep Residual Learning", §4.2; torchvision
  ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``): pad 4 pixels of zeros on each side, crop an ``H×W``
  window at a uniformly random offset in ``{0..8}²`` per image, then flip. The zeros are added after normalisation,
  i.e. the padding has the data set's mean colour rather than black (our choice, so no de-normalisation is needed).

Random numbers come from a :class:`Draws`: :class:`GeneratorDraws` (a ``torch.Generator``, drawn on its device and
moved to the batch's device; what training uses) or ``hpmkd.data.views.KeyedDraws`` (a pure function of
``(seed, view, sample index)``, so one sample's view is the same whatever batch it is in; what the view bank uses).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from hpmkd.registry import ConfigError, Registry

#: Name -> augmentation ``(x [B, C, H, W], draws: Draws) -> x'`` (same shape).
AUGMENTATIONS: Registry[Tensor] = Registry("augmentation")


class Draws(Protocol):
    """Where an augmentation's random numbers come from, one (or ``k``) per sample of the batch, in call order."""

    def uniform(self, n: int) -> Tensor:
        """``[n]`` float32 in ``[0, 1)``."""

    def integers(self, high: int, k: int, n: int) -> Tensor:
        """``[k, n]`` int64 in ``{0..high-1}``."""


class GeneratorDraws:
    """Draws from a ``torch.Generator`` (``torch.rand`` / ``torch.randint`` on the generator's device)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def uniform(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.generator, device=self.generator.device)

    def integers(self, high: int, k: int, n: int) -> Tensor:
        return torch.randint(0, high, (k, n), generator=self.generator, device=self.generator.device)

CROP_PADDING = 4


def require_images(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ConfigError(
            f"data.augment: augmentation {name!r} needs image batches [B, C, H, W], got shape {tuple(x.shape)}; "
            "use data.augment: none for tabular data sets."
        )


def random_flip(x: Tensor, draws: Draws) -> Tensor:
    """Mirror each image left-right where ``u_b < 1/2``, ``u_b ~ U[0, 1)`` from ``draws``."""
    flip = draws.uniform(x.shape[0]).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: Tensor, draws: Draws, padding: int = CROP_PADDING) -> Tensor:
    """``out[b, c, i, j] = pad(x)[b, c, i + dy_b, j + dx_b]`` with ``dy_b, dx_b`` uniform in ``{0..2·padding}``."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offsets = draws.integers(2 * padding + 1, 2, b).to(x.device)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


@AUGMENTATIONS.register("none")
def no_augmentation(x: Tensor, draws: Draws) -> Tensor:
    return x


@AUGMENTATIONS.register("flip")
def flip(x: Tensor, draws: Draws) -> Tensor:
    require_images("flip", x)
    return random_flip(x, draws)


@AUGMENTATIONS.register("crop_flip")
def crop_flip(x: Tensor, draws: Draws) -> Tensor:
    require_images("crop_flip", x)
    return random_flip(random_crop(x, draws), draws)


def augment(name: str, x: Tensor, generator: torch.Generator | Draws) -> Tensor:
    """Apply the augmentation registered as ``name`` to the batch ``x``, drawing from a generator or a :class:`Draws`."""
    draws = GeneratorDraws(generator) if isinstance(generator, torch.Generator) else generator
    return AUGMENTATIONS.get(name, "data.augment")(x, draws)
