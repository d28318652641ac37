"""Augmented views that regenerate bit for bit, so teacher outputs on them can be stored: the view bank.

A :class:`ViewBank` defines ``views`` augmented views of every training sample and replays them: epoch ``e``
trains on view ``e mod views`` (:meth:`ViewBank.view_of`). The random numbers of view ``v`` of sample ``i`` are a
pure function of ``(seed, v, i)`` (:class:`KeyedDraws`), so a view is identical whichever batch, rank, process or
machine renders it. The teachers' outputs on each view are therefore computed once, in large batches, into the
Arrow cache (``components/logit_cache.py``, the view's :meth:`ViewBank.name` in the key), and training workers
render the same view on the fly and read those outputs by row index. Nothing but the seed is stored for a view.

Hash (our choice of a counter-based generator): SplitMix64's output function (Steele, Lea & Flood 2014, "Fast
splittable pseudorandom number generators", OOPSLA; the constants of Vigna's ``splitmix64.c`` and Java's
``SplittableRandom``), chained over the key's parts::

    h = mix(mix(mix(mix(mix(seed) ^ view) ^ index) ^ call) ^ j)

where ``call`` counts the augmentation's draws (crop offsets, then flips) and ``j`` the values one draw takes per
sample. Uniforms use the top 24 bits (exact in float32, in ``[0, 1)``); integers are ``h mod high`` (bias below
``high / 2^64``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hpmkd.data.augment import augment

#: Cache view name of the split's stored tensors (no augmentation): what the logit cache stores.
PLAIN_VIEW = "plain"

MASK64 = (1 << 64) - 1


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on ``uint64`` arrays (wrapping arithmetic, logical shifts)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class KeyedDraws:
    """A :class:`hpmkd.data.augment.Draws` whose values for sample ``index[b]`` depend only on ``(seed, view,
    index[b])`` and the order of the draws (see the module docstring)."""

    def __init__(self, seed: int, view: int, index: Tensor):
        key = mix(mix(np.full(1, seed & MASK64, np.uint64)) ^ np.uint64(view & MASK64))
        self.base = mix(key ^ index.cpu().numpy().astype(np.uint64))
        self.calls = 0

    def bits(self, k: int, n: int) -> np.ndarray:
        """``[k, n]`` uint64 for the next draw."""
        if n != len(self.base):
            raise ValueError(f"KeyedDraws was keyed for {len(self.base)} samples, asked for {n}.")
        h = mix(self.base ^ np.uint64(self.calls))
        self.calls += 1
        return mix(h[None, :] ^ np.arange(k, dtype=np.uint64)[:, None])

    def uniform(self, n: int) -> Tensor:
        return torch.from_numpy((self.bits(1, n)[0] >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))

    def integers(self, high: int, k: int, n: int) -> Tensor:
        return torch.from_numpy((self.bits(k, n) % np.uint64(high)).astype(np.int64))


@dataclass(frozen=True)
class ViewBank:
    """``views`` augmented views (``augment``, keyed by ``seed``) of every training sample, replayed per epoch."""

    augment: str
    seed: int
    views: int

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"a view bank needs at least one view, got {self.views}.")

    def view_of(self, epoch: int) -> int:
        """The view epoch ``epoch`` trains on."""
        return epoch % self.views

    def name(self, view: int) -> str:
        """The view's name in a cache key (everything that defines its pixels besides the data fingerprint)."""
        return PLAIN_VIEW if self.augment == "none" else f"{self.augment}:seed={self.seed}:view={view}"

    def names(self) -> list[str]:
        return [self.name(v) for v in range(self.views)]

    def render(self, x: Tensor, index: Tensor, view: int) -> Tensor:
        """View ``view`` of the samples ``x`` (rows ``index`` of the training split)."""
        return augment(self.augment, x, KeyedDraws(self.seed, view, index))


#: The split's stored tensors as a one-view bank: what the plain logit cache holds.
PLAIN = ViewBank("none", 0, 1)
