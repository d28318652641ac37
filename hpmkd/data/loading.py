"""``load_dataset``: raw arrays -> seeded splits -> normalised float32 tensors -> fingerprint.

Normalisation is per channel (axis 1: image channels, or tabular features): ``x' = (x − μ_c) / σ_c`` with the data
set's published constants when it has them (Fashion-MNIST, CIFAR), otherwise ``μ_c``, ``σ_c`` (population std)
computed on the final training split only (our choice for data sets without published constants; a zero ``σ_c``
is replaced by 1). A table with its own preprocessing (``RawData.fit_preprocessing``: imputation, standardisation,
one-hot categories, :mod:`hpmkd.data.table`) has it fitted on the final training split's raw rows instead. Nothing
is cached on disk.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from hpmkd.data.base import DATASETS, DataSplits, Preprocessing, RawData, Split
from hpmkd.data.fingerprint import fingerprint
from hpmkd.data.splits import SplitIndices, split_indices
from hpmkd.registry import ConfigError, user_options


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    meta_fraction: float = 0.0,
    reserve_train: int | None = None,
    download: bool = False,
) -> DataSplits:
    """Load data set ``name`` (see :data:`DATASETS`) split into train/val/test, fixed by ``seed``.

    The validation split is a stratified ``val_fraction`` of the official training set; ``max_*`` keep stratified
    subsets of each split (every class present when the limit is at least the number of classes). Data sets without
    an official test split hold out a stratified test split first (20 %). ``options`` are the data set's own
    (``data.options``); they enter the fingerprint. ``meta_fraction > 0`` holds a stratified part of the training
    split out as the meta split (``DataSplits.meta``, :mod:`hpmkd.data.splits`); it enters the fingerprint only then,
    so every split plan without one keeps its fingerprint. ``reserve_train``: the rows ``max_train: reserve_train``
    would select are left out of the training split (:func:`hpmkd.data.splits.training_rows`); it enters the
    fingerprint only when given.
    """
    check_arguments(val_fraction, max_train=max_train, max_val=max_val, max_test=max_test,
                    reserve_train=reserve_train)
    check_meta_fraction(meta_fraction)
    raw = read_raw(name, root, download, options)
    if not isinstance(raw, RawData):  # a data set that splits itself: files streamed from disk (image_folder)
        return raw.load_splits(name, seed=seed, val_fraction=val_fraction, max_train=max_train, max_val=max_val,
                               max_test=max_test, reserve_train=reserve_train)
    check_labels(name, raw)
    idx = split_indices(
        raw.train_y,
        raw.test_y,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=raw.test_fraction,
        max_train=max_train,
        max_val=max_val,
        max_test=max_test,
        meta_fraction=meta_fraction,
        reserve_train=reserve_train,
    )
    test_x, test_y = (raw.train_x, raw.train_y) if raw.test_x is None else (raw.test_x, raw.test_y)
    prep = fit_preprocessing(raw, raw.train_x[idx.train])
    train = make_split(prep.transform(raw.train_x[idx.train]), raw.train_y[idx.train])
    val = make_split(prep.transform(raw.train_x[idx.val]), raw.train_y[idx.val])
    test = make_split(prep.transform(test_x[idx.test]), test_y[idx.test])
    meta = make_split(prep.transform(raw.train_x[idx.meta]), raw.train_y[idx.meta]) if len(idx.meta) else None
    if raw.class_probs is not None:
        test.true_probs = torch.from_numpy(np.asarray(raw.class_probs(test_x[idx.test]), dtype=np.float32))
    params = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": raw.test_fraction if raw.test_x is None else None,
        "max_train": max_train,
        "max_val": max_val,
        "max_test": max_test,
        **prep.params(),
        **({"options": options} if options else {}),  # absent when empty: the fingerprint of every earlier run stays
        **({"meta_fraction": meta_fraction} if meta is not None else {}),  # likewise
        **({"reserve_train": reserve_train} if reserve_train is not None else {}),  # likewise
    }
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        meta=meta,
        num_classes=len(raw.class_names),
        input_shape=tuple(int(d) for d in train.x.shape[1:]),
        class_names=list(raw.class_names),
        fingerprint=fingerprint(name, source_and_indices(raw, idx), params),
        source=raw.source,
        preprocessing=prep.record(),
    )


def read_raw(name: str, root: str | None, download: bool, options: dict[str, Any] | None = None) -> Any:
    """The raw arrays of data set ``name`` (its factory called with its ``options`` and the context it accepts): a
    :class:`RawData`, or an object that splits itself (``load_splits(name, seed=..., ...)`` and ``shape()``: a
    folder of files streamed from disk, :mod:`hpmkd.data.image_folder`)."""
    factory = DATASETS.get(name, "data.name")
    DATASETS.check_options(name, options or {}, "data.options")
    accepted = user_options(factory, ())
    context = {k: v for k, v in {"root": root, "download": download}.items() if accepted is None or k in accepted}
    return factory(**context, **(options or {}))


def data_shape(name: str, root: str | None = None, download: bool = False,
               options: dict[str, Any] | None = None) -> tuple[int, tuple[int, ...]]:
    """``(number of classes, one model input's shape)`` of data set ``name``, from its raw files without splitting
    or normalising: what sizing a model needs before the experiment loads its data."""
    return cached_shape(name, root, download, json.dumps(options or {}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def cached_shape(name: str, root: str | None, download: bool, options: str) -> tuple[int, tuple[int, ...]]:
    raw = read_raw(name, root, download, json.loads(options))
    if not isinstance(raw, RawData):
        return raw.shape()
    first = raw.train_x[:1]  # a model input's shape does not depend on the fitted statistics
    return len(raw.class_names), tuple(int(d) for d in fit_preprocessing(raw, first).transform(first).shape[1:])


class LabelError(ValueError):
    """A data set's labels are not class indices ``0 .. num_classes - 1``."""


def check_labels(name: str, raw: RawData) -> None:
    """Every label is an integer class index in ``[0, len(class_names))``: a label outside it would index past the
    logits (or silently train a class that has no name), so it fails here, before any stage starts."""
    classes = len(raw.class_names)
    if classes < 2:
        raise LabelError(f"data.name {name!r}: {classes} class name(s) ({raw.source}); classification needs at "
                         f"least 2.")
    for part, y in (("training", raw.train_y), ("test", raw.test_y)):
        if y is None:
            continue
        y = np.asarray(y)
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
            raise LabelError(f"data.name {name!r}: the {part} labels must be one integer class index per sample, got "
                             f"{y.dtype} of shape {y.shape} ({raw.source}).")
        bad = (y < 0) | (y >= classes)
        if bad.any():
            values = ", ".join(str(v) for v in np.unique(y[bad])[:5])
            raise LabelError(f"data.name {name!r}: {int(bad.sum())} {part} label(s) outside [0, {classes}) "
                             f"(values {values}) in {raw.source}; labels must be class indices 0..{classes - 1} "
                             f"matching the {classes} class names. Fix the labels or the data set's class list.")


def check_arguments(val_fraction: float, **limits: int | None) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be between 0 and 1 (exclusive), got {val_fraction}.")
    for key, value in limits.items():
        if value is not None and value <= 0:
            raise ConfigError(f"data.{key}: must be a positive number of samples (or null for all), got {value}.")


class ChannelNormalisation:
    """``to_model`` then ``(x − μ_c) / σ_c`` per channel (axis 1): the data set's constants, or the training
    split's (:func:`statistics`)."""

    def __init__(self, raw: RawData, train_rows: np.ndarray):
        self.raw = raw
        self.mean, self.std = statistics(raw, raw.to_model(train_rows))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        x = self.raw.to_model(rows)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.astype(np.float32).reshape(shape)) / self.std.astype(np.float32).reshape(shape)

    def params(self) -> dict[str, Any]:
        return {"preprocessing": self.raw.preprocessing, "mean": [float(m) for m in self.mean],
                "std": [float(s) for s in self.std]}

    def record(self) -> None:
        return None


def fit_preprocessing(raw: RawData, train_rows: np.ndarray) -> Preprocessing:
    """The data set's own preprocessing fitted on the training rows, or the per-channel normalisation."""
    if raw.fit_preprocessing is not None:
        return raw.fit_preprocessing(train_rows)
    return ChannelNormalisation(raw, train_rows)


def check_meta_fraction(meta_fraction: float) -> None:
    if not 0.0 <= meta_fraction < 1.0:
        raise ConfigError(f"data.meta_fraction: the share of the training split held out for a schedule learned from "
                          f"held-out data must be in [0, 1), got {meta_fraction}.")


def statistics(raw: RawData, train_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(μ, σ)``: the data set's constants, or the training split's (see module docstring)."""
    if raw.mean is not None and raw.std is not None:
        return np.asarray(raw.mean, dtype=np.float64), np.asarray(raw.std, dtype=np.float64)
    axes = tuple(a for a in range(train_x.ndim) if a != 1)
    mean = train_x.mean(axis=axes, dtype=np.float64)
    std = train_x.std(axis=axes, dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def make_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)))


def source_and_indices(raw: RawData, idx: SplitIndices) -> dict[str, np.ndarray | None]:
    meta = {"idx_meta": idx.meta} if len(idx.meta) else {}  # absent without a meta split (earlier fingerprints stay)
    return {
        **meta,
        "raw_train_x": raw.train_x,
        "raw_train_y": raw.train_y,
        "raw_test_x": raw.test_x,
        "raw_test_y": raw.test_y,
        "idx_train": idx.train,
        "idx_val": idx.val,
        "idx_test": idx.test,
    }
