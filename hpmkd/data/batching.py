"""Mini-batches by row index (no DataLoader, no per-sample Python loop), from any :class:`~hpmkd.data.source.BatchSource`.

The order follows ``torch.utils.data.DistributedSampler``: one permutation of ``range(N)`` per ``(seed, epoch)``
(the identity when not shuffling), padded by repeating its head to a multiple of ``world_size``, and rank ``r`` keeps
positions ``r::world_size``; every rank therefore gets the same number of batches. The generator is seeded from the
pair ``SeedSequence([seed, epoch])`` rather than DistributedSampler's ``seed + epoch`` (our choice: ``(s, e + 1)``
and ``(s + 1, e)`` then give different orders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from hpmkd.data.source import BatchSource


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Positions (int64) that rank ``rank`` visits in this epoch, before batching."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}."
        )
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}.")
    if shuffle:
        state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(state))
    else:
        order = torch.arange(n)
    if n == 0:
        return order
    total = -(-n // world_size) * world_size
    if total > n:
        order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
    return order[rank::world_size]


def iterate_batches(
    split: BatchSource,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(x, y, index)`` batches of this rank's share of ``split`` for one epoch (its rows read with
    ``split.rows(index)``).

    ``index`` holds the positions in ``split`` (int64). ``drop_last`` drops this rank's last batch when it has fewer
    than ``batch_size`` samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = epoch_order(len(split), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield *split.rows(index), index
