"""The data-source seam: where the training loop takes a split's batches from.

The loop (:func:`hpmkd.training.train_stage`) and evaluation read a split only through :class:`BatchSource`: its
length, its batches for an epoch (with each row's index in the split, which stored teacher outputs are looked up
by) and rows by index. :class:`hpmkd.data.base.Split` is the in-memory source (tensors indexed in place); a
streamed source (files decoded by ``DataLoader`` worker processes, or Ray Data shards) implements the same three
methods, and a data set whose splits are such sources needs no change to the loop. Every source also holds its
labels in memory as ``y`` (int64, ``[N]``: small, and what stratified subsets and task statistics read).
:class:`RowSubset` is a source made of some rows of another (a held-out part, :mod:`hpmkd.data.holdout`).
"""

from __future__ import annotations

from typing import Iterator, Protocol

from torch import Tensor


class BatchSource(Protocol):
    y: Tensor

    def __len__(self) -> int:
        """The number of rows."""

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(x, y, index)`` batches of rank ``rank``'s share for one epoch, in the order of
        :func:`hpmkd.data.batching.epoch_order` (a permutation fixed by ``(seed, epoch)`` when shuffling)."""

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of the rows ``index``."""


class RowSubset:
    """The rows ``index`` (positions in ``source``, int64) of another source, as a source of their own: position
    ``i`` here is row ``index[i]`` there. Batches follow :func:`hpmkd.data.batching.epoch_order` over the subset."""

    def __init__(self, source: BatchSource, index: Tensor):
        self.source = source
        self.index = index.long()

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def y(self) -> Tensor:
        """The labels of the subset's rows (the parent source's labels, which every source holds in memory)."""
        return self.source.y[self.index]

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.source.rows(self.index[index])

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        from hpmkd.data.batching import iterate_batches

        return iterate_batches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size)
