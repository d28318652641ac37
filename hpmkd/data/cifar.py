"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny Images";
https://www.cs.toronto.edu/~kriz/cifar.html), read from the python-pickle folders that torchvision downloads:
``<root>/cifar-10-batches-py`` and ``<root>/cifar-100-python``. Each pickle holds ``data`` uint8 ``[N, 3072]``
(channel-major 3×32×32) and the labels.

Normalisation uses the published per-channel training-set statistics of ``x / 255``:
CIFAR-10 μ = (0.4914, 0.4822, 0.4465), σ = (0.2470, 0.2435, 0.2616);
CIFAR-100 μ = (0.5071, 0.4865, 0.4409), σ = (0.2673, 0.2564, 0.2762).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from hpmkd.data.base import DATA_ENV, DATASETS, DatasetNotFoundError, RawData, search_dirs


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and which pickle keys hold labels and class names."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    torchvision_class="CIFAR10",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    torchvision_class="CIFAR100",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def read_pickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def read_part(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batches = [read_pickle(folder / name) for name in files]
    x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return x, y


def is_complete(folder: Path, layout: CifarLayout) -> bool:
    names = (*layout.train_files, *layout.test_files, layout.meta_file)
    return all((folder / name).is_file() for name in names)


def find_folder(root: str | None, layout: CifarLayout) -> tuple[Path | None, list[Path]]:
    dirs = [d / layout.folder for d in search_dirs(root)]
    return next((d for d in dirs if is_complete(d, layout)), None), dirs


def download_files(root: str | None, layout: CifarLayout) -> None:
    """Download with torchvision into ``root`` (or ``$HPMKD_DATA``); it extracts ``layout.folder`` there."""
    target = root or os.environ.get(DATA_ENV)
    if not target:
        raise DatasetNotFoundError(
            f"{layout.name}: data.download is true but there is nowhere to download to: set data.root "
            f"(or ${DATA_ENV}) to a writable folder."
        )
    import torchvision.datasets

    getattr(torchvision.datasets, layout.torchvision_class)(target, train=True, download=True)


def not_found(layout: CifarLayout, dirs: list[Path]) -> DatasetNotFoundError:
    if not dirs:
        return DatasetNotFoundError(
            f"{layout.name}: no data folder is set. Set data.root (or ${DATA_ENV}) to the folder that contains "
            f"{layout.folder}/, or set data.root and data.download: true where the internet is reachable."
        )
    listed = "\n".join(f"  - {d}" for d in dirs)
    return DatasetNotFoundError(
        f"{layout.name}: the {layout.folder} files were not found (or are incomplete). Searched:\n{listed}\n"
        f"Fix it by pointing data.root (or ${DATA_ENV}) at the folder that contains {layout.folder}/, "
        "or set data.download: true where the internet is reachable."
    )


def load_cifar(layout: CifarLayout, root: str | None = None, download: bool = False) -> RawData:
    folder, dirs = find_folder(root, layout)
    if folder is None and download:
        download_files(root, layout)
        folder, dirs = find_folder(root, layout)
    if folder is None:
        raise not_found(layout, dirs)
    train_x, train_y = read_part(folder, layout.train_files, layout.label_key)
    test_x, test_y = read_part(folder, layout.test_files, layout.label_key)
    return RawData(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=[str(n) for n in read_pickle(folder / layout.meta_file)[layout.names_key]],
        source=str(folder),
        to_model=to_model,
        preprocessing="uint8 [N,3,32,32] / 255",
        mean=layout.mean,
        std=layout.std,
    )


def to_model(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


DATASETS.register(CIFAR10.name)(partial(load_cifar, CIFAR10))
DATASETS.register(CIFAR100.name)(partial(load_cifar, CIFAR100))
