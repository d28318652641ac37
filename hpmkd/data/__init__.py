"""Data sets, seeded splits, mini-batches and batch augmentations.

* :func:`load_dataset` -> :class:`DataSplits` (train/val/test :class:`Split` tensors, class names, fingerprint);
* :data:`DATASETS`: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``digits``, ``breast_cancer``, ``wine``, ``iris``,
  ``table`` (a CSV or Parquet file), ``synthetic`` (``make_classification``);
  ``image_folder`` (the user's own images, streamed from disk: :mod:`hpmkd.data.image_folder`);
  ``gaussian_mixture`` (synthetic, with known class probabilities);
* :mod:`hpmkd.data.storage`: ``data.root`` (and a table's path) as a local folder or a file-system URI on shared
  storage (``file://``, ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``: pyarrow's file systems);
* :func:`iterate_batches`: DistributedSampler-style ``(x, y, index)`` batches by tensor indexing;
* :data:`AUGMENTATIONS` / :func:`augment`: ``none``, ``flip``, ``crop_flip``.
"""

from hpmkd.data import (cifar, digits, fashion_mnist, gaussian_mixture, image_folder,  # noqa: F401  (the data sets)
                        table, tabular)
from hpmkd.data.augment import AUGMENTATIONS, augment
from hpmkd.data.base import DATASETS, DataSplits, DatasetNotFoundError, RawData, Split
from hpmkd.data.batching import iterate_batches
from hpmkd.data.loading import load_dataset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "RawData",
    "Split",
    "augment",
    "iterate_batches",
    "load_dataset",
]
