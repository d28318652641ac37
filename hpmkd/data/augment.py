"""Batch augmentations on already-normalised image tensors ``[B, C, H, W]``, vectorised and driven by a
``torch.Generator`` so a run is reproducible.

* ``none``: the batch unchanged.
* ``flip``: each image mirrored left-right with probability 1/2 (torchvision ``RandomHorizontalFlip``).
* ``crop_flip``: the standard CIFAR augmentation (He et al., 2016, "Deep Residual Learning", §4.2; torchvision
  ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``): pad 4 pixels of zeros on each side, crop an ``H×W``
  window at a uniformly random offset in ``{0..8}²`` per image, then flip. The zeros are added after normalisation,
  i.e. the padding has the data set's mean colour rather than black (our choice, so no de-normalisation is needed).

Random numbers are drawn on the generator's device and moved to the batch's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpmkd.registry import ConfigError, Registry

#: Name -> augmentation ``(x [B, C, H, W], generator) -> x'`` (same shape).
AUGMENTATIONS: Registry[Tensor] = Registry("augmentation")

CROP_PADDING = 4


def require_images(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ConfigError(
            f"data.augment: augmentation {name!r} needs image batches [B, C, H, W], got shape {tuple(x.shape)}; "
            "use data.augment: none for tabular data sets."
        )


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right where ``u_b < 1/2``, ``u_b ~ U[0, 1)`` from ``generator``."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """``out[b, c, i, j] = pad(x)[b, c, i + dy_b, j + dx_b]`` with ``dy_b, dx_b`` uniform in ``{0..2·padding}``."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=generator.device).to(x.device)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


@AUGMENTATIONS.register("none")
def no_augmentation(x: Tensor, generator: torch.Generator) -> Tensor:
    return x


@AUGMENTATIONS.register("flip")
def flip(x: Tensor, generator: torch.Generator) -> Tensor:
    require_images("flip", x)
    return random_flip(x, generator)


@AUGMENTATIONS.register("crop_flip")
def crop_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    require_images("crop_flip", x)
    return random_flip(random_crop(x, generator), generator)


def augment(name: str, x: Tensor, generator: torch.Generator) -> Tensor:
    """Apply the augmentation registered as ``name`` to the batch ``x``."""
    return AUGMENTATIONS.get(name, "data.augment")(x, generator)
