"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; https://github.com/zalandoresearch/fashion-mnist): 60 000 training
and 10 000 test 28×28 grey images of 10 clothing classes, read from the four IDX files (plain or gzip).

Normalisation uses the training set's pixel mean 0.2860 and std 0.3530 (of ``x / 255``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hpmkd.data.base import DATA_ENV, DATASETS, DatasetNotFoundError, RawData, search_dirs, where_searched
from hpmkd.data.idx import read_idx
from hpmkd.data.storage import UriPath

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SUBDIRS = ("fashion-mnist", "FashionMNIST/raw")  # our folder name; torchvision's download layout
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = (0.2860,), (0.3530,)


def find_file(folder: Path | UriPath, stem: str) -> Path | UriPath | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_folder(dirs: list[Path | UriPath]) -> tuple[Path | UriPath, dict[str, Path | UriPath]] | None:
    """The first folder of ``dirs`` that holds all four files, with their paths."""
    for folder in dirs:
        paths = {key: find_file(folder, stem) for key, stem in FILES.items()}
        if all(paths.values()):
            return folder, paths  # type: ignore[return-value]
    return None


def download_files(root: str | None) -> None:
    """Download the IDX files with torchvision into ``root`` (or ``$HPMKD_DATA``): they land in ``FashionMNIST/raw``."""
    target = root or os.environ.get(DATA_ENV)
    if not target:
        raise DatasetNotFoundError(
            "fashion_mnist: data.download is true but there is nowhere to download to: set data.root "
            f"(or ${DATA_ENV}) to a writable folder."
        )
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(target, train=train, download=True)


def not_found(root: str | None, dirs: list[Path | UriPath]) -> DatasetNotFoundError:
    stems = ", ".join(f"{s}[.gz]" for s in FILES.values())
    fixes = ("point data.root at the folder that holds the four files, or set data.download: true to fetch them there"
             if root is not None else
             f"install them (sudo apt-get install dataset-fashion-mnist puts them in {SYSTEM_DIR}), set ${DATA_ENV} "
             "or data.root to the folder that holds the four files, or set data.download: true with data.root "
             "where the internet is reachable")
    return DatasetNotFoundError(f"fashion_mnist: the Fashion-MNIST IDX files ({stems}) were not found; "
                                f"{where_searched(root, dirs)}. Fix: {fixes}.")


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: str | None = None, download: bool = False) -> RawData:
    dirs = search_dirs(root, *SUBDIRS, system=SYSTEM_DIR)
    found = find_folder(dirs)
    if found is None and download:
        download_files(root)
        found = find_folder(dirs)
    if found is None:
        raise not_found(root, dirs)
    folder, paths = found
    arrays = {key: read_idx(path) for key, path in paths.items()}
    check_shapes(arrays, folder)
    return RawData(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        class_names=list(CLASS_NAMES),
        source=str(folder),
        to_model=to_model,
        preprocessing="uint8 [N,28,28] / 255 -> [N,1,28,28]",
        mean=MEAN,
        std=STD,
    )


def to_model(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[:, None, :, :]


def check_shapes(arrays: dict[str, np.ndarray], folder: Path | UriPath) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"{part}_x"], arrays[f"{part}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"fashion_mnist: in {folder}, the {part} images have shape {x.shape} and the labels {y.shape}; "
                "expected [N, H, W] images and N labels. The files are corrupt or mismatched; replace them."
            )
