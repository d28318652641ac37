"""A held-out part of the training split: rows a stage does not train on, so that a later stage can fit on outputs
of data its inputs never saw (the Meta-MLP ensemble teacher, fitted on the base teachers' outputs on these rows).

The part is a stratified ``fraction`` of the training split drawn from its own random stream
(:data:`hpmkd.data.splits.STREAMS` ``holdout``) of ``seed``; it depends only on the split's labels, the fraction
and the seed, so every stage that names the same :class:`HoldOut` holds out the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpmkd.data.source import BatchSource, RowSubset
from hpmkd.data.splits import stratified_take, stream_rng


@dataclass(frozen=True)
class HoldOut:
    """A stratified ``fraction`` (in ``(0, 1)``) of the training split, fixed by ``seed``."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"a held-out fraction is in (0, 1), got {self.fraction}.")

    def split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, held)`` row positions (int64, ascending): ``held`` is ``round(fraction · N)`` rows (at least 1,
        leaving at least 1), stratified by ``labels``."""
        y = labels.cpu().numpy().astype(np.int64)
        n_held = min(max(round(self.fraction * len(y)), 1), len(y) - 1)
        held, kept = stratified_take(np.arange(len(y)), y, n_held, stream_rng(self.seed, "holdout"))
        return torch.from_numpy(kept), torch.from_numpy(held)

    def kept(self, source: BatchSource) -> RowSubset:
        """The rows a stage trains on."""
        return RowSubset(source, self.split(source.y)[0])

    def held(self, source: BatchSource) -> RowSubset:
        """The held-out rows."""
        return RowSubset(source, self.split(source.y)[1])
