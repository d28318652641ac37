"""``image_folder``: the user's own images, one sub-folder per class, decoded from disk while training.

Layouts of ``data.root`` (a local folder, or a file-system URI on shared storage whose files every node reads,
:mod:`hpmkd.data.storage`: then each file is named by its URI; class folders hold image files, any depth below them;
the extensions of :data:`IMAGE_EXTENSIONS`):

* ``train/<class>/…``, with ``val/<class>/…`` and ``test/<class>/…`` where the user has fixed those splits: a split
  without its folder is drawn from ``train`` (the test split first, ``test_fraction``, then the validation split,
  ``data.val_fraction``), stratified and fixed by the seed, as for every data set without official splits;
* ``<class>/…`` directly under the root: one folder, split the same way.

Class names are the sorted folder names of ``train`` (or of the root); a ``val`` or ``test`` class must be one of
them. Bad folders are rejected before anything trains, by name: no class folder, a class folder without images, a
file that is not a readable image, images of different sizes without ``resize`` (or smaller than ``crop``).

Preprocessing (:class:`Preprocess`, done per image in ``DataLoader`` worker processes): decode, convert to RGB
(``channels: 3``) or grey (``channels: 1``), resize (``resize: N``: the shorter side to ``N``, keeping the aspect
ratio, as torchvision's ``Resize(N)``; ``resize: [H, W]``: exactly), centre-crop (``crop``), scale to [0, 1] and
normalise per channel with ``mean`` / ``std`` (given; or ``preprocessing: <model name>``, the model's own settings:
timm's pretrained config or torchvision's weights transforms; otherwise estimated on up to ``stats_images`` training
images, our choice as for every data set without published constants). Random augmentation is ``data.augment``,
applied to each training batch on the fly.

Splits are streamed :class:`FolderSplit` sources: they hold file paths and labels, never the images; each epoch's
batches (:func:`hpmkd.data.batching.epoch_order`, as every source) are decoded by ``workers`` processes. The
fingerprint covers the files: the sha256 of every file's bytes (``fingerprint: content``, the default; the same
images in another folder give the same fingerprint) or of its path, size and modification time (``fingerprint:
stat``, for very large folders), with the labels, the split indices and the preprocessing. File hashes and headers
are read once per process.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hpmkd.data import storage
from hpmkd.data.base import DATASETS, DataSplits
from hpmkd.data.batching import epoch_order
from hpmkd.data.fingerprint import fingerprint as data_fingerprint
from hpmkd.data.splits import stratified_take, stream_rng, subset, training_rows
from hpmkd.data.storage import UriPath
from hpmkd.registry import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
#: ``rows`` of at most this many images decode in the calling process (starting workers costs more)
IN_PROCESS_ROWS = 64
SCAN_THREADS = 8


class UnreadableImageError(ValueError):
    """An image file could not be decoded; the message names it."""


@dataclass(frozen=True)
class FileInfo:
    """What a scan learns of one file: its digest (content or stat), its size ``(width, height)``."""

    digest: str
    size: tuple[int, int]


#: (path, bytes, mtime_ns, fingerprint mode) -> FileInfo: each file is hashed and its header read once per process
SCANNED: dict[tuple[str, int, int, str], FileInfo] = {}


def scan_file(path: str, mode: str) -> FileInfo:
    """Hash ``path`` (``content``: its bytes; ``stat``: path, size, mtime) and read its header; an
    :class:`UnreadableImageError` naming it when it is not an image PIL can open and verify."""
    from PIL import Image

    size, mtime_ns = storage.stat(path)
    key = (path, size, mtime_ns, mode)
    if key in SCANNED:
        return SCANNED[key]
    try:
        if mode == "content":
            data = storage.read_bytes(path)
            digest = hashlib.sha256(data).hexdigest()
            source: Any = io.BytesIO(data)
        else:
            digest = hashlib.sha256(f"{path}:{size}:{mtime_ns}".encode()).hexdigest()
            source = storage.readable(path)
        with Image.open(source) as image:
            size = image.size
            image.verify()
    except Exception as err:  # PIL raises many types for a broken file
        raise UnreadableImageError(f"data.root: {path} is not a readable image ({type(err).__name__}: {err}). "
                                   f"Remove or replace the file.") from None
    SCANNED[key] = FileInfo(digest, size)
    return SCANNED[key]


def image_files(folder: Path | UriPath) -> list[str]:
    """The image files under ``folder`` (any depth; local paths or URIs), sorted."""
    return sorted(f for f in storage.walk_files(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


@dataclass
class FolderPart:
    """One folder's files and their class ids."""

    files: list[str]
    labels: np.ndarray


def class_folders(folder: Path | UriPath) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_part(folder: Path | UriPath, classes: list[str]) -> FolderPart:
    """The files of ``folder``'s class sub-folders; every sub-folder must be one of ``classes`` and hold images."""
    files, labels = [], []
    for name in class_folders(folder):
        if name not in classes:
            raise ConfigError(f"data.root: {folder / name} is a class the training folder does not have (classes: "
                              f"{', '.join(classes)}).")
        found = image_files(folder / name)
        if not found:
            raise ConfigError(f"data.root: class folder {folder / name} holds no image ({', '.join(IMAGE_EXTENSIONS)})."
                              f" Add images or remove the folder.")
        files += found
        labels += [classes.index(name)] * len(found)
    if not files:
        raise ConfigError(f"data.root: {folder} has no class folder with images; expected {folder}/<class>/<image>.")
    return FolderPart(files, np.asarray(labels, dtype=np.int64))


def read_layout(root: Path | UriPath) -> tuple[list[str], dict[str, FolderPart]]:
    """Class names and the parts found (``train``, and ``val`` / ``test`` when their folders exist)."""
    if not root.is_dir():
        raise ConfigError(f"data.root: {str(root)!r} is not a folder. image_folder reads <root>/<class>/<image> or "
                          f"<root>/train/<class>/<image> (with val/ and test/ optional).")
    split_layout = (root / "train").is_dir()
    if not split_layout and any((root / s).is_dir() for s in ("val", "test")):
        raise ConfigError(f"data.root: {root} has val/ or test/ but no train/ folder.")
    base = root / "train" if split_layout else root
    classes = class_folders(base)
    if not classes:
        raise ConfigError(f"data.root: {base} has no class folders; expected {base}/<class>/<image>.")
    parts = {"train": read_part(base, classes)}
    for name in ("val", "test"):
        if split_layout and (root / name).is_dir():
            parts[name] = read_part(root / name, classes)
    return classes, parts


@dataclass(frozen=True)
class Preprocess:
    """Decode one file into a normalised ``[C, H, W]`` float32 tensor (module docstring)."""

    channels: int
    resize: tuple[int, ...] | None
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, path: str) -> np.ndarray:
        """``[C, H, W]`` in [0, 1], resized and cropped, not normalised."""
        from PIL import Image

        resample = getattr(Image.Resampling, self.interpolation.upper())
        try:
            with Image.open(storage.readable(path)) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
                if self.resize is not None:
                    image = image.resize(resized(image.size, self.resize), resample)
                if self.crop is not None:
                    image = centre_crop(image, self.crop, path)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError) as err:
            raise UnreadableImageError(f"{path}: could not be decoded ({type(err).__name__}: {err}).") from None
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def __call__(self, path: str) -> Tensor:
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray((self.pixels(path) - mean) / std))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` of an image of ``size = (width, height)`` after resizing and cropping."""
        width, height = resized(size, self.resize) if self.resize is not None else size
        return tuple(self.crop) if self.crop is not None else (height, width)


def resized(size: tuple[int, int], resize: tuple[int, ...]) -> tuple[int, int]:
    """PIL ``(width, height)`` after ``resize``: one number sets the shorter side (aspect kept), two are ``(H, W)``."""
    width, height = size
    if len(resize) == 2:
        return resize[1], resize[0]
    short = resize[0]
    if width <= height:
        return short, max(1, round(height * short / width))
    return max(1, round(width * short / height)), short


def centre_crop(image: Any, crop: tuple[int, int], path: str) -> Any:
    width, height = image.size
    h, w = crop
    if h > height or w > width:
        raise UnreadableImageError(f"{path}: {width}x{height} after resizing is smaller than crop {w}x{h}; set "
                                   f"data.options.resize to at least the crop.")
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


class DecodedFiles(Dataset):
    """``(image, position)`` for the files of a split (what ``DataLoader`` workers run)."""

    def __init__(self, files: Sequence[str], preprocess: Preprocess):
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.preprocess(self.files[i]), i


class FolderSplit:
    """A streamed :class:`~hpmkd.data.source.BatchSource` over image files: paths and labels in memory, images
    decoded on demand by ``workers`` ``DataLoader`` processes."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, preprocess: Preprocess, workers: int):
        self.files = list(files)
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.preprocess = preprocess
        self.workers = workers

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, chunks: list[list[int]], workers: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, positions)`` per chunk of positions, in order."""
        loader = DataLoader(DecodedFiles(self.files, self.preprocess), batch_sampler=chunks, num_workers=workers)
        yield from loader

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        index = index.long()
        if len(index) <= IN_PROCESS_ROWS or self.workers == 0:
            x = torch.stack([self.preprocess(self.files[int(i)]) for i in index])
        else:
            per_worker = -(-len(index) // self.workers)
            chunks = [index[s:s + per_worker].tolist() for s in range(0, len(index), per_worker)]
            x = torch.cat([images for images, _ in self.decode(chunks, self.workers)])
        return x, self.y[index]

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        order = epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        chunks = [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        for images, positions in self.decode(chunks, self.workers):
            yield images, self.y[positions], positions


def as_size(value: int | Sequence[int] | None, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int) else tuple(value)
    if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"data.options.{key}: a size in pixels, N or [H, W]; got {value!r}.")
    return values


def model_preprocessing(name: str) -> dict[str, Any]:
    """A model's own input preprocessing (``resize``, ``crop``, ``interpolation``, ``mean``, ``std``): timm's
    pretrained config, or torchvision's default weights' transforms."""
    from hpmkd.models.factory import timm_models, torchvision_models

    if name in torchvision_models():
        import torchvision

        transform = torchvision.models.get_model_weights(torchvision_models()[name]).DEFAULT.transforms()
        return {"resize": tuple(transform.resize_size), "crop": (transform.crop_size[0],) * 2,
                "interpolation": transform.interpolation.value, "mean": tuple(transform.mean),
                "std": tuple(transform.std)}
    if name in timm_models():
        import timm

        cfg = timm.models.get_pretrained_cfg(timm_models()[name])
        height, width = cfg.input_size[1:]
        return {"resize": (int(height / cfg.crop_pct),), "crop": (height, width), "interpolation": cfg.interpolation,
                "mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    raise ConfigError(f"data.options.preprocessing: {name!r} is not a torchvision or timm model with its own "
                      f"preprocessing; give resize, crop, mean and std instead.")


@dataclass
class ImageFolderData:
    """A scanned folder, ready to be split (what the ``image_folder`` factory returns instead of ``RawData``)."""

    root: Path | UriPath
    classes: list[str]
    parts: dict[str, FolderPart]
    infos: dict[str, FileInfo]
    preprocess: Preprocess
    estimate_stats: bool
    workers: int
    test_fraction: float
    stats_images: int
    options: dict[str, Any]

    def shape(self) -> tuple[int, tuple[int, ...]]:
        """``(number of classes, one input's shape)``."""
        first = self.infos[self.parts["train"].files[0]]
        return len(self.classes), (self.preprocess.channels, *self.preprocess.output_size(first.size))

    def indices(self, seed: int, val_fraction: float, max_train: int | None, max_val: int | None,
                max_test: int | None, reserve_train: int | None = None) -> dict[str, tuple[str, np.ndarray]]:
        """Per split, the part it comes from and its row positions there (module docstring)."""
        labels = self.parts["train"].labels
        pool = np.arange(len(labels), dtype=np.int64)
        out: dict[str, tuple[str, np.ndarray]] = {}
        for split, fraction in (("test", self.test_fraction), ("val", val_fraction)):
            if split in self.parts:
                out[split] = (split, np.arange(len(self.parts[split].labels), dtype=np.int64))
                continue
            n = min(max(round(fraction * len(pool)), 1), len(pool) - 1)
            if n < 1:
                raise ConfigError(f"data.root: {len(labels)} training images are too few to draw a {split} split.")
            taken, pool = stratified_take(pool, labels[pool], n, stream_rng(seed, split))
            out[split] = ("train", taken)
        limits = {"val": max_val, "test": max_test}
        chosen = {split: (part, subset(rows, self.parts[part].labels[rows], limits[split],
                                       stream_rng(seed, f"max_{split}")))
                  for split, (part, rows) in out.items()}
        train = training_rows(pool, labels, seed=seed, max_train=max_train, reserve_train=reserve_train)
        return {**chosen, "train": ("train", train)}

    def load_splits(self, name: str, *, seed: int, val_fraction: float, max_train: int | None, max_val: int | None,
                    max_test: int | None, reserve_train: int | None = None) -> DataSplits:
        chosen = self.indices(seed, val_fraction, max_train, max_val, max_test, reserve_train)
        files = {s: [self.parts[p].files[i] for i in rows] for s, (p, rows) in chosen.items()}
        labels = {s: self.parts[p].labels[rows] for s, (p, rows) in chosen.items()}
        preprocess = self.preprocess
        if self.estimate_stats:
            mean, std = pixel_statistics(files["train"], preprocess, self.stats_images, self.workers)
            preprocess = Preprocess(**{**asdict(preprocess), "mean": mean, "std": std})
        splits = {s: FolderSplit(files[s], labels[s], preprocess, self.workers) for s in ("train", "val", "test")}
        arrays = {**{f"files_{s}": file_digests([self.infos[f] for f in files[s]]) for s in files},
                  **{f"labels_{s}": labels[s] for s in files}}
        params = {"seed": seed, "val_fraction": val_fraction, "test_fraction": self.test_fraction,
                  "max_train": max_train, "max_val": max_val, "max_test": max_test, "classes": self.classes,
                  "preprocessing": json.dumps(asdict(preprocess)), "options": self.options,
                  **({"reserve_train": reserve_train} if reserve_train is not None else {})}
        num_classes, shape = self.shape()
        return DataSplits(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                          num_classes=num_classes, input_shape=shape, class_names=list(self.classes),
                          fingerprint=data_fingerprint(name, arrays, params), source=str(self.root))


def file_digests(infos: list[FileInfo]) -> np.ndarray:
    """``[N, 32]`` uint8: each file's sha256, in split order."""
    return np.frombuffer(b"".join(bytes.fromhex(i.digest) for i in infos), dtype=np.uint8).reshape(len(infos), 32)


#: (files, preprocessing, count) -> per-channel (mean, std), once per process
STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def pixel_statistics(files: list[str], preprocess: Preprocess, count: int,
                     workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of the pixels of up to ``count`` training images, evenly spaced over
    the split; a zero std becomes 1."""
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    key = hashlib.sha256(json.dumps([[files[i] for i in picks], asdict(preprocess)]).encode()).hexdigest()
    if key not in STATISTICS:
        raw = Preprocess(**{**asdict(preprocess), "mean": (0.0,) * preprocess.channels,
                            "std": (1.0,) * preprocess.channels})
        x, _ = FolderSplit([files[i] for i in picks], np.zeros(len(picks)), raw, workers).rows(torch.arange(len(picks)))
        mean = x.double().mean((0, 2, 3))
        std = x.double().std((0, 2, 3), unbiased=False)
        STATISTICS[key] = (tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std))
    return STATISTICS[key]


def check_sizes(parts: dict[str, FolderPart], infos: dict[str, FileInfo], preprocess: Preprocess) -> None:
    """Every image must reach the crop once resized, and come out at one size; name the files that do not."""
    files = [f for part in parts.values() for f in part.files]
    if preprocess.crop is not None:
        for f in files:
            width, height = resized(infos[f].size, preprocess.resize) if preprocess.resize else infos[f].size
            if height < preprocess.crop[0] or width < preprocess.crop[1]:
                raise ConfigError(f"data.options.crop: {f} is {width}x{height} after resizing, smaller than the crop "
                                  f"{preprocess.crop[1]}x{preprocess.crop[0]}; set (or raise) data.options.resize.")
    first = files[0]
    size = preprocess.output_size(infos[first].size)
    other = next((f for f in files if preprocess.output_size(infos[f].size) != size), None)
    if other is not None:
        sizes = ", ".join(f"{f}: {infos[f].size[0]}x{infos[f].size[1]}" for f in (first, other))
        raise ConfigError(f"data.options.resize: the images have different sizes ({sizes}) and the preprocessing does "
                          f"not make them one size; set resize: [H, W], or resize: N with crop: N.")


@DATASETS.register("image_folder")
def image_folder(root: str | None = None, resize: int | list[int] | None = None, crop: int | list[int] | None = None,
                 channels: int = 3, mean: list[float] | None = None, std: list[float] | None = None,
                 preprocessing: str | None = None, interpolation: str = "bilinear", workers: int = 2,
                 fingerprint: Literal["content", "stat"] = "content", test_fraction: float = 0.2,
                 stats_images: int = 512) -> ImageFolderData:
    """Scan ``root`` (``data.root``) and check it; see the module docstring for the options (``data.options``)."""
    options = dict(resize=resize, crop=crop, channels=channels, mean=mean, std=std, preprocessing=preprocessing,
                   interpolation=interpolation, fingerprint=fingerprint, test_fraction=test_fraction,
                   stats_images=stats_images)  # what defines the inputs (the fingerprint's); not workers
    if root is None:
        raise ConfigError("data.root: image_folder needs the folder of images (data.root: /path/to/images).")
    if channels not in (1, 3):
        raise ConfigError(f"data.options.channels: 1 (grey) or 3 (RGB), got {channels!r}.")
    if fingerprint not in ("content", "stat"):
        raise ConfigError(f"data.options.fingerprint: 'content' or 'stat', got {fingerprint!r}.")
    if not 0 < test_fraction < 1 or workers < 0 or stats_images < 1:
        raise ConfigError(f"data.options: test_fraction in (0, 1), workers >= 0 and stats_images >= 1; got "
                          f"{test_fraction}, {workers}, {stats_images}.")
    own = model_preprocessing(preprocessing) if preprocessing is not None else {}
    interpolation = own.get("interpolation", interpolation) if preprocessing is not None else interpolation
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.options.interpolation: one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}.")
    size = as_size(resize, "resize") or own.get("resize")
    cut = as_size(crop, "crop") or own.get("crop")
    cut = None if cut is None else (cut[0], cut[-1])
    mean, std = (mean or own.get("mean")), (std or own.get("std"))
    if (mean is None) != (std is None) or (mean is not None and (len(mean) != channels or len(std) != channels)):
        raise ConfigError(f"data.options.mean / std: give both, {channels} value(s) each; got {mean}, {std}.")
    if std is not None and any(s <= 0 for s in std):
        raise ConfigError(f"data.options.std: every value must be > 0, got {std}.")
    folder = storage.data_path(root)
    folder = folder if isinstance(folder, UriPath) else folder.resolve()
    classes, parts = read_layout(folder)
    files = [f for part in parts.values() for f in part.files]
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        infos = dict(zip(files, pool.map(lambda f: scan_file(f, fingerprint), files)))
    preprocess = Preprocess(channels, size, cut, interpolation, tuple(mean or (0.0,) * channels),
                            tuple(std or (1.0,) * channels))
    check_sizes(parts, infos, preprocess)
    return ImageFolderData(folder, classes, parts, infos, preprocess, mean is None,
                           workers, test_fraction, stats_images, {k: v for k, v in options.items() if v is not None})
