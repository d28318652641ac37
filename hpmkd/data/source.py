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

from hpmkd.data.batching import epoch_order


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
    """The rows ``positions`` of another source, as a source: its batches (in :func:`epoch_order` over the subset)
    carry the parent's row indices, which stored teacher outputs are keyed by, and ``rows`` takes them. A search
    trial's reduced training set (:attr:`hpmkd.training.StageSpec.train_fraction`)."""

    def __init__(self, parent: BatchSource, positions: Tensor):
        self.parent = parent
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def y(self) -> Tensor:
        """The labels of the subset's rows (the parent source's labels, which every source holds in memory)."""
        return self.parent.y[self.positions]

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        for start in range(0, len(order), batch_size):
            index = self.positions[order[start : start + batch_size]]
            yield *self.parent.rows(index), index

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.parent.rows(index)
