"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny Images";
https://www.cs.toronto.edu/~kriz/cifar.html), read from the python-pickle folders that torchvision downloads:
``<root>/cifar-10-batches-py`` and ``<root>/cifar-100-python``. Each pickle holds ``data`` uint8 ``[N, 3072]``
(channel-major 3×32×32) and the labels. The pickles are read with a restricted unpickler (:class:`CifarUnpickler`)
that resolves only the NumPy array and dtype constructors the format uses: a crafted pickle in the data folder
cannot run code, it is reported as not a CIFAR batch.

Normalisation uses the published per-channel training-set statistics of ``x / 255``:
CIFAR-10 μ = (0.4914, 0.4822, 0.4465), σ = (0.2470, 0.2435, 0.2616);
CIFAR-100 μ = (0.5071, 0.4865, 0.4409), σ = (0.2673, 0.2564, 0.2762).
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpmkd.data.base import DATA_ENV, DATASETS, DatasetNotFoundError, RawData, search_dirs, where_searched
from hpmkd.data.storage import UriPath


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


class CifarFormatError(ValueError):
    """A CIFAR file is not what the format holds; the message names the file."""


def numpy_global(names: tuple[str, ...], attr: str) -> Callable[[], Any]:
    """The NumPy function ``attr`` of the first importable module of ``names`` (NumPy 2 moved ``numpy.core`` to
    ``numpy._core``; pickles name either)."""
    def find() -> Any:
        for name in names:
            try:
                return getattr(importlib.import_module(name), attr)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"numpy has no {attr}")
    return find


RECONSTRUCT = numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
FROMBUFFER = numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
SCALAR = numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
#: (module, name) a CIFAR pickle may refer to -> the object (NumPy arrays, scalars and dtypes, and bytes from
#: Python 3 protocol-2 pickles); everything else is refused, so no pickle can call a function of its choosing
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): SCALAR,
    ("numpy._core.multiarray", "scalar"): SCALAR,
    ("numpy.core.numeric", "_frombuffer"): FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): FROMBUFFER,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class CifarUnpickler(pickle.Unpickler):
    """A restricted unpickler (the Python docs' "Restricting Globals"): only :data:`ALLOWED_GLOBALS` resolve."""

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds")
        return found()


def read_pickle(path: Path | UriPath) -> dict:
    """The dict a CIFAR pickle holds, read without running code: arrays, lists, strings and numbers only."""
    try:
        with path.open("rb") as f:
            data = CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CifarFormatError(
            f"{path}: not a CIFAR batch ({err}). hpmkd reads CIFAR pickles with a restricted unpickler (arrays and "
            f"lists only) and never runs code from a data folder; replace the file with the original "
            f"(data.download: true fetches it).") from None
    if not isinstance(data, dict):
        raise CifarFormatError(f"{path}: holds a {type(data).__name__}, not a CIFAR batch (a dict); replace the file.")
    return data


def batch_arrays(batch: dict, path: Path | UriPath, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as uint8 ``[N, 3, 32, 32]`` and the labels as int64 ``[N]``, checked against the format."""
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CifarFormatError(f"{path}: 'data' must be a uint8 array [N, 3072], got "
                               f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}; "
                               f"replace the file with the original.")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        y = None
    if y is None or y.shape != (len(data),):
        raise CifarFormatError(f"{path}: {label_key!r} must be {len(data)} integer labels; replace the file.")
    return data.reshape(-1, 3, 32, 32), y


def read_part(folder: Path | UriPath, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [batch_arrays(read_pickle(folder / name), folder / name, label_key) for name in files]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def is_complete(folder: Path | UriPath, layout: CifarLayout) -> bool:
    names = (*layout.train_files, *layout.test_files, layout.meta_file)
    return all((folder / name).is_file() for name in names)


def find_folder(root: str | None, layout: CifarLayout) -> tuple[Path | UriPath | None, list[Path | UriPath]]:
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


def not_found(layout: CifarLayout, root: str | None, dirs: list[Path | UriPath]) -> DatasetNotFoundError:
    if not dirs:
        return DatasetNotFoundError(
            f"{layout.name}: no data folder is set. Set data.root (or ${DATA_ENV}) to the folder that contains "
            f"{layout.folder}/, or set data.root and data.download: true where the internet is reachable."
        )
    return DatasetNotFoundError(
        f"{layout.name}: the {layout.folder} files were not found (or are incomplete); {where_searched(root, dirs)}. "
        f"Fix: point data.root (or ${DATA_ENV}) at the folder that contains {layout.folder}/, or set "
        f"data.download: true where the internet is reachable."
    )


def load_cifar(layout: CifarLayout, root: str | None = None, download: bool = False) -> RawData:
    folder, dirs = find_folder(root, layout)
    if folder is None and download:
        download_files(root, layout)
        folder, dirs = find_folder(root, layout)
    if folder is None:
        raise not_found(layout, root, dirs)
    train_x, train_y = read_part(folder, layout.train_files, layout.label_key)
    test_x, test_y = read_part(folder, layout.test_files, layout.label_key)
    return RawData(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=class_names(folder / layout.meta_file, layout.names_key),
        source=str(folder),
        to_model=to_model,
        preprocessing="uint8 [N,3,32,32] / 255",
        mean=layout.mean,
        std=layout.std,
    )


def class_names(path: Path | UriPath, key: str) -> list[str]:
    names = read_pickle(path).get(key)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise CifarFormatError(f"{path}: {key!r} must be a list of class names; replace the file with the original.")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def to_model(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


DATASETS.register(CIFAR10.name)(partial(load_cifar, CIFAR10))
DATASETS.register(CIFAR100.name)(partial(load_cifar, CIFAR100))
