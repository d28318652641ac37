"""Seeded, stratified index selection: the split plan (train/val/test, the ``max_*`` subsets and the meta split).

Every selection draws from its own NumPy stream ``SeedSequence([seed, stream])`` so, for instance, changing
``max_train`` does not move the validation split.

The *meta* split is a held-out part of the training split for the outer objective of a schedule learned from held-out
data (HPM-KD's meta temperature, :class:`hpmkd.temperature.MetaTemperature`): it is carved from the final training
split (after ``max_train``), so the validation split, which selects epochs and scores search trials, is never a
training signal. It is empty unless asked for (``meta_fraction > 0``), and then the training split is smaller by it.
A search trial's reduced training set (:func:`trial_rows`) is a further stratified part of the training split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpmkd.registry import ConfigError

#: Random stream of each selection (our choice; only their distinctness matters).
STREAMS = {"test": 0, "val": 1, "max_train": 2, "max_val": 3, "max_test": 4, "meta": 5, "trial": 6, "holdout": 7}


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, STREAMS[stream]]))


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class quotas summing to ``n``, proportional to ``counts`` (largest remainder).

    ``q_c = n · counts_c / Σ counts``; each class gets ``floor(q_c)``, raised to 1 for non-empty classes when
    ``n`` is at least the number of non-empty classes (so small subsets still see every class), capped at
    ``counts_c``; the sum is then corrected one sample at a time, adding to the largest remainder
    ``q_c − quota_c`` and taking from the smallest (among quotas above 1). Ties go to the lower class id.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= n <= total:
        raise ValueError(f"cannot take {n} samples out of {total}")
    exact = n * counts / max(total, 1)
    quota = np.floor(exact).astype(np.int64)
    nonempty = counts > 0
    if n >= int(nonempty.sum()):
        quota = np.maximum(quota, nonempty.astype(np.int64))
    quota = np.minimum(quota, counts)
    while quota.sum() < n:
        room = np.where(quota < counts, exact - quota, -np.inf)
        quota[int(np.argmax(room))] += 1
    while quota.sum() > n:
        spare = np.where(quota > 1, exact - quota, np.inf)
        quota[int(np.argmin(spare))] -= 1
    return quota


def stratified_take(
    indices: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` (with class ``labels``) into ``n`` chosen and the rest, stratified; both sorted ascending.

    Within each class the chosen samples are the first ``quota_c`` of a uniformly random order drawn from ``rng``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    perm = rng.permutation(len(indices))
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within a class
    grouped = labels[order]
    counts = np.bincount(labels, minlength=int(labels.max(initial=-1)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[grouped]
    chosen = rank < allocate(counts, n)[grouped]
    return np.sort(indices[order[chosen]]), np.sort(indices[order[~chosen]])


def subset(indices: np.ndarray, labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``indices``, stratified by ``labels``; all of them when ``limit`` is ``None`` or larger."""
    if limit is None or limit >= len(indices):
        return indices
    return stratified_take(indices, labels, limit, rng)[0]


def training_rows(pool: np.ndarray, labels: np.ndarray, *, seed: int, max_train: int | None,
                  reserve_train: int | None = None) -> np.ndarray:
    """The training split drawn from ``pool`` (row indices into ``labels``, the source's label array).

    ``reserve_train``: the rows that ``max_train: reserve_train`` selects with the same ``seed`` (another experiment's
    training split, e.g. a data-starved student's labelled pool) are removed first, so that teachers trained with it
    never see a row of that split; then at most ``max_train`` of the rest are kept, stratified.
    """
    if reserve_train is not None:
        if reserve_train >= len(pool):
            raise ConfigError(f"data.reserve_train: {reserve_train} rows reserved, but the training split has only "
                              f"{len(pool)}; reserve fewer (the other experiment's data.max_train).")
        reserved = subset(pool, labels[pool], reserve_train, stream_rng(seed, "max_train"))
        pool = np.setdiff1d(pool, reserved)
    return subset(pool, labels[pool], max_train, stream_rng(seed, "max_train"))


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each split: ``train``/``val``/``meta`` into the source training array, ``test`` into the test
    array (the source training array itself when the test split is held out of it). ``meta`` is empty without a
    meta split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    meta: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def split_indices(
    train_y: np.ndarray,
    test_y: np.ndarray | None,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_train: int | None,
    max_val: int | None,
    max_test: int | None,
    meta_fraction: float = 0.0,
    reserve_train: int | None = None,
) -> SplitIndices:
    """The seeded, stratified splits.

    Without an official test split (``test_y is None``), ``round(test_fraction · N)`` samples are held out first.
    The validation split takes ``round(val_fraction · N_pool)`` of the remaining pool (at least 1, leaving at least
    one training sample); the ``max_*`` limits then take stratified subsets of each split (the training split less
    ``reserve_train``'s rows, :func:`training_rows`). With ``meta_fraction > 0``
    the meta split takes ``round(meta_fraction · N_train)`` of the final training split (at least 1, leaving at
    least one training sample), stratified, from its own stream.
    """
    pool = np.arange(len(train_y), dtype=np.int64)
    if test_y is None:
        n_test = min(max(round(test_fraction * len(pool)), 1), len(pool) - 2)
        test, pool = stratified_take(pool, train_y, n_test, stream_rng(seed, "test"))
        test_labels = train_y[test]
    else:
        test = np.arange(len(test_y), dtype=np.int64)
        test_labels = test_y
    n_val = min(max(round(val_fraction * len(pool)), 1), len(pool) - 1)
    val, train = stratified_take(pool, train_y[pool], n_val, stream_rng(seed, "val"))
    train = training_rows(train, train_y, seed=seed, max_train=max_train, reserve_train=reserve_train)
    meta = np.zeros(0, dtype=np.int64)
    if meta_fraction > 0:
        n_meta = min(max(round(meta_fraction * len(train)), 1), len(train) - 1)
        meta, train = stratified_take(train, train_y[train], n_meta, stream_rng(seed, "meta"))
    return SplitIndices(
        train=train,
        val=subset(val, train_y[val], max_val, stream_rng(seed, "max_val")),
        test=subset(test, test_labels, max_test, stream_rng(seed, "max_test")),
        meta=meta,
    )


def trial_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (sorted) of a stratified ``fraction`` of a training split with class ``labels``, fixed by ``seed``
    (at least one row): the reduced training set of a search trial (:attr:`hpmkd.training.StageSpec.train_fraction`).
    ``fraction >= 1`` keeps every row."""
    positions = np.arange(len(labels), dtype=np.int64)
    if fraction >= 1:
        return positions
    n = min(max(round(fraction * len(labels)), 1), len(labels))
    return stratified_take(positions, labels, n, stream_rng(seed, "trial"))[0]
