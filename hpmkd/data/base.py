"""The data contract: the :class:`Split` / :class:`DataSplits` every stage reads, and what a data-set module returns.

A data-set module registers a factory in :data:`DATASETS`. The factory reads the *raw* source arrays (for instance the
uint8 Fashion-MNIST pixels) and returns a :class:`RawData`; :func:`hpmkd.data.loading.load_dataset` turns that into
seeded train/val/test splits of normalised float32 tensors with a content fingerprint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from torch import Tensor

from hpmkd.data.batching import iterate_batches
from hpmkd.data.storage import UriPath, check_location, data_path, is_uri
from hpmkd.models.ref import DataShape
from hpmkd.registry import Registry

#: Data-set name -> factory ``(root: str | None, download: bool, **options) -> RawData`` (a factory may take fewer
#: of the context keywords; its own options come from ``data.options``).
DATASETS: Registry["RawData"] = Registry("dataset", context=("root", "download"))

#: Environment variable naming a folder that holds data sets (searched after ``data.root``).
DATA_ENV = "HPMKD_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where hpmkd looked; the message lists the folders searched and the fixes."""


@dataclass
class Split:
    """One split held in memory, the in-memory :class:`~hpmkd.data.source.BatchSource`: ``x`` float32, already
    normalised (``[N, C, H, W]`` images, ``[N, D]`` tabular); ``y`` int64; ``true_probs``: each row's known class
    probabilities ``[N, C]`` when the data set knows them (a synthetic task), else ``None``."""

    x: Tensor
    y: Tensor
    true_probs: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return iterate_batches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size)


@dataclass
class DataSplits:
    """A data set split for one experiment.

    ``fingerprint`` is a sha256 prefix over the raw source arrays, the split indices and the preprocessing
    parameters (see :mod:`hpmkd.data.fingerprint`); ``source`` says where the raw data was read from.
    ``preprocessing``: the statistics a table's preprocessing fitted on the training split
    (:meth:`Preprocessing.record`), what turns raw rows into model inputs; ``None`` for data sets whose inputs need
    no record beyond their constants (images). ``meta``: the held-out part of the training split that a schedule
    learned from held-out data steps on (``None`` without one; :mod:`hpmkd.data.splits`).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    fingerprint: str
    source: str
    preprocessing: dict[str, Any] | None = None
    meta: Split | None = None

    @property
    def shape(self) -> DataShape:
        return DataShape(self.num_classes, tuple(self.input_shape))


@dataclass
class RawData:
    """The raw source arrays of a data set, as read from disk, and how to turn them into model inputs.

    ``to_model`` maps a slice of ``train_x`` / ``test_x`` to float32 in model layout (``[N, C, H, W]`` or ``[N, D]``)
    before normalisation, e.g. ``uint8 / 255`` reshaped. ``class_probs`` (synthetic data) maps raw rows to their
    true class probabilities ``p(y | x)`` ``[N, C]``, which the test split carries (:attr:`Split.true_probs`).
    ``mean`` / ``std`` are per-channel (axis 1) constants; when they are ``None`` they are computed on the training
    split. ``test_x is None`` means the data set has no official
    test split and ``test_fraction`` of it is held out, stratified and fixed by the seed. ``preprocessing`` is a short
    text describing ``to_model`` that enters the fingerprint.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]
    source: str
    to_model: Callable[[np.ndarray], np.ndarray]
    preprocessing: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    test_fraction: float = 0.2
    fit_preprocessing: Callable[[np.ndarray], "Preprocessing"] | None = None
    class_probs: Callable[[np.ndarray], np.ndarray] | None = None


class Preprocessing(Protocol):
    """Raw rows -> model inputs, with statistics fitted on the training split only."""

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """float32 model inputs of raw source rows."""

    def params(self) -> dict[str, Any]:
        """What enters the data fingerprint (the fitted statistics)."""

    def record(self) -> dict[str, Any] | None:
        """What a model exported with the run needs to encode raw rows itself (``None``: nothing beyond
        constants)."""


def search_dirs(root: str | None, *subdirs: str, system: str | None = None) -> list[Path | UriPath]:
    """Folders to look in: ``root`` and ``root/<subdir>`` when ``data.root`` is given, and nothing else (a given
    root that lacks the data is an error, never a silent switch to another copy); otherwise the same under
    ``$HPMKD_DATA``, then ``system``. A root may be a URI on shared storage (:mod:`hpmkd.data.storage`)."""
    bases = [root] if root is not None else [b for b in (os.environ.get(DATA_ENV),) if b]
    key = "data.root" if root is not None else f"${DATA_ENV}"
    dirs = [data_path(b, key) / s for b in bases for s in ("", *subdirs)]
    if system and root is None:
        dirs.append(Path(system))
    return list(dict.fromkeys(dirs))


def where_searched(root: str | None, dirs: list[Path | UriPath]) -> str:
    """One line saying where a data set was looked for (for not-found messages)."""
    given = f"data.root {root!r}" if root is not None else f"${DATA_ENV} and the system folder"
    return f"searched {given}: {', '.join(str(d) for d in dirs) or '(no folder: neither is set)'}"


def absolute_paths(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of data set ``name`` with its file-path options (the factory's ``path_options``) made absolute
    against the current folder, where the config is read (Ray workers run in other folders); a URI stays as it is."""
    keys = getattr(DATASETS.get(name, "data.name"), "path_options", ())
    return {k: (str(Path(v).expanduser().resolve()) if k in keys and isinstance(v, str) and not is_uri(v) else v)
            for k, v in options.items()}


def check_path_options(name: str, options: dict[str, Any]) -> None:
    """Before anything trains: every file-system URI among the data set's file-path options opens
    (:func:`hpmkd.data.storage.check_location`)."""
    for key in getattr(DATASETS.get(name, "data.name"), "path_options", ()):
        check_location(options.get(key), f"data.options.{key}")
