"""UCI optical hand-written digits as bundled with scikit-learn (``sklearn.datasets.load_digits``): 1 797 8×8 images
with values 0..16, 10 classes. There is no official test split, so 20 % is held out, stratified and fixed by the seed.

Pixels are scaled by 1/16 and standardised with the training split's mean and std (no published constants exist).
"""

from __future__ import annotations

import numpy as np

from hpmkd.data.base import DATASETS, RawData


@DATASETS.register("digits")
def digits() -> RawData:
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return RawData(
        train_x=np.asarray(bunch.data, dtype=np.float64),
        train_y=np.asarray(bunch.target, dtype=np.int64),
        test_x=None,
        test_y=None,
        class_names=[str(n) for n in bunch.target_names],
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
        to_model=to_model,
        preprocessing="float [N,64] / 16 -> [N,1,8,8]",
    )


def to_model(x: np.ndarray) -> np.ndarray:
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
