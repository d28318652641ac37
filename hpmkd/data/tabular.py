"""Small tabular classification sets bundled with scikit-learn: ``breast_cancer`` (569 × 30, 2 classes), ``wine``
(178 × 13, 3 classes) and ``iris`` (150 × 4, 3 classes). Samples are ``[N, D]`` float32 vectors; each feature is
standardised with the training split's mean and std. There is no official test split, so 20 % is held out,
stratified and fixed by the seed.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from hpmkd.data.base import DATASETS, RawData


def load_tabular(loader_name: str) -> RawData:
    """Read ``sklearn.datasets.<loader_name>()`` into :class:`RawData`."""
    import sklearn
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader_name)()
    return RawData(
        train_x=np.asarray(bunch.data, dtype=np.float64),
        train_y=np.asarray(bunch.target, dtype=np.int64),
        test_x=None,
        test_y=None,
        class_names=[str(n) for n in bunch.target_names],
        source=f"sklearn.datasets.{loader_name} (scikit-learn {sklearn.__version__})",
        to_model=to_model,
        preprocessing="float [N,D]",
    )


def to_model(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


DATASETS.register("breast_cancer")(partial(load_tabular, "load_breast_cancer"))
DATASETS.register("wine")(partial(load_tabular, "load_wine"))
DATASETS.register("iris")(partial(load_tabular, "load_iris"))
