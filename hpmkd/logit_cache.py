"""Teacher outputs computed once, stored as Arrow IPC files, read back memory-mapped.

Teachers are frozen, so their outputs on a fixed view of a fixed split never change. A cache entry holds one
teacher's logits (and, when asked, its features at named taps) for every row of one split, keyed by everything that
changes them:

    key = sha256(teacher weights hash, teacher architecture + options, data fingerprint, split, view, dtype, top-k, taps)

``view`` names the input pipeline: ``"plain"`` (the split's stored tensors) or one view of a view bank
(``"crop_flip:seed=0:view=3"``, regenerated bit for bit from its seed, see :mod:`hpmkd.data.views`). A view drawn
from a training generator is never cached: an entry is served only for the exact view it was computed on, so a stale
or foreign entry can never be read (``docs/cache.md``). Files are written to a temporary name and renamed, so a
crash never leaves a half-written file under a key; readers ignore temporary names.

File layout (one file per key, ``<key>.arrow``, one record batch): ``logits`` (``fixed_size_list<float16|float32>[C]``)
or, for top-k entries, ``topk_values`` and ``topk_indices``; one ``feature:<tap>`` column per tap (the feature
flattened, its shape in the schema metadata); the schema metadata also holds the key's fields as JSON, the format
marker :data:`FORMAT_KEY` and a CRC-32 per column of the values as written (``checksums``).

**Verified when opened.** :class:`CachedLogits` checks the marker, the row count and every column's CRC-32 over
the memory-mapped values (no copy; about 1.8 GB/s here, so a 1 MB logits entry costs about half a millisecond).
A truncated, bit-flipped or foreign file raises :class:`CacheEntryError` naming it. :func:`lookup` (the driver,
before a stage) moves such an entry aside (``.<key>.arrow.corrupt-<time>``, kept for inspection) and reports a
miss, so the entry is recomputed automatically.

**Only its own files.** :func:`list_entries` and :func:`clear` touch only files named as the cache names them
(``<24 hex>.arrow``, and the hidden temporary and moved-aside names) that start with the Arrow file magic and, when
readable, carry the cache's marker; anything else in the folder is left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

log = logging.getLogger("hpmkd")

SUFFIX = ".arrow"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
FEATURE_PREFIX = "feature:"
#: schema metadata key and value that mark a file as an entry of this cache (format 2: with checksums)
FORMAT_KEY, FORMAT = b"hpmkd_logit_cache", b"2"
ARROW_MAGIC = b"ARROW1"
ENTRY_NAME = re.compile(r"^[0-9a-f]{24}\.arrow$")
#: the hidden names the cache gives a file being written and an entry moved aside
TEMP_NAME = re.compile(r"^\.[0-9a-f]{24}\.arrow\.tmp-\d+$")
ASIDE_NAME = re.compile(r"^\.[0-9a-f]{24}\.arrow\.corrupt-\d+$")


class CacheEntryError(ValueError):
    """A cache file is truncated, corrupt or not a cache entry; the message names it."""


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes a teacher's logits on a split; :attr:`digest` names the file."""

    weights: str
    model: str
    data: str
    split: str
    view: str
    dtype: str = "float16"
    top_k: int | None = None
    taps: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    @classmethod
    def from_json(cls, text: str | bytes) -> "CacheKey":
        fields = json.loads(text)
        return cls(**{**fields, "taps": tuple(fields.get("taps", ()))})


@dataclass
class CacheEntry:
    """A file of the cache as listed: ``key`` is ``None`` and ``problem`` says why when it cannot be served."""

    key: CacheKey | None
    path: Path
    rows: int
    size_bytes: int
    created: float
    problem: str | None = None


def entry_path(root: str | os.PathLike, key: CacheKey) -> Path:
    return Path(root) / f"{key.digest}{SUFFIX}"


def checksum(values: np.ndarray) -> str:
    """CRC-32 of an array's bytes (C order), as stored per column: ``crc32:<8 hex>``."""
    return f"crc32:{zlib.crc32(memoryview(np.ascontiguousarray(values)).cast('B')):08x}"


def fixed_size_list(values: np.ndarray, np_dtype: type, pa_dtype: pa.DataType | None = None
                    ) -> tuple[pa.FixedSizeListArray, str]:
    """Rows of ``values [N, ...]`` as one ``fixed_size_list`` column (each row flattened), and its checksum."""
    flat = np.ascontiguousarray(values.reshape(len(values), -1), dtype=np_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa_dtype), flat.shape[1]), checksum(flat)


def write_entry(root: str | os.PathLike, key: CacheKey, logits: np.ndarray,
                features: dict[str, np.ndarray] | None = None) -> Path:
    """Store ``logits [N, C]`` (and ``features``: tap -> ``[N, ...]``, exactly ``key.taps``) under ``key``
    atomically (temporary file, then rename)."""
    if key.dtype not in DTYPES:
        raise ValueError(f"cache dtype {key.dtype!r} is not one of {sorted(DTYPES)}.")
    features = features or {}
    if tuple(sorted(features)) != tuple(sorted(key.taps)):
        raise ValueError(f"cache entry for taps {list(key.taps)} was given features {sorted(features)}.")
    np_dtype, pa_dtype = DTYPES[key.dtype]
    n, c = logits.shape
    if key.top_k:
        k = min(key.top_k, c)
        top = torch.topk(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), k, dim=1)
        columns = {
            "topk_values": fixed_size_list(top.values.numpy(), np_dtype, pa_dtype),
            "topk_indices": fixed_size_list(top.indices.numpy(), np.int32),
        }
    else:
        columns = {"logits": fixed_size_list(logits, np_dtype, pa_dtype)}
    columns.update({f"{FEATURE_PREFIX}{tap}": fixed_size_list(v, np_dtype, pa_dtype) for tap, v in features.items()})
    meta = {"key": json.dumps(asdict(key)), "num_classes": str(c), "rows": str(n), "created": str(time.time()),
            "feature_shapes": json.dumps({tap: list(v.shape[1:]) for tap, v in features.items()}),
            FORMAT_KEY: FORMAT, "checksums": json.dumps({name: digest for name, (_, digest) in columns.items()})}
    table = pa.table({name: column for name, (column, _) in columns.items()}).replace_schema_metadata(meta)
    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return path


class CachedLogits:
    """One cache entry, memory-mapped and verified (module docstring; :class:`CacheEntryError` otherwise);
    ``rows(index)`` gives float32 logits ``[len(index), C]`` and ``features(index, taps)`` the stored features
    (float32, ``[len(index), *shape]``) of those rows.

    Top-k entries are expanded to full logits: every class outside the stored top-k gets the row's smallest stored
    logit minus ``fill_margin`` (10; our choice), so a softmax gives those classes almost no mass.
    """

    fill_margin = 10.0

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
            meta = self.table.schema.metadata or {}
            if meta.get(FORMAT_KEY) != FORMAT:
                raise CacheEntryError(f"{self.path}: not an entry of this cache format (written by an earlier hpmkd "
                                      f"without checksums, or by something else).")
            self.key = CacheKey.from_json(meta[b"key"])
            self.num_classes = int(meta[b"num_classes"])
            if self.table.num_rows != int(meta[b"rows"]):
                raise CacheEntryError(f"{self.path}: holds {self.table.num_rows} rows, its header says "
                                      f"{meta[b'rows'].decode()}.")
            shapes = json.loads(meta.get(b"feature_shapes", b"{}"))
            self.feature_values = {  # tap -> [N, *shape] view of the mapped buffer
                tap: flat_values(self.table.column(f"{FEATURE_PREFIX}{tap}"), int(np.prod(shape))).reshape(-1, *shape)
                for tap, shape in shapes.items()
            }
            self.rows_count = self.table.num_rows
            if "logits" in self.table.column_names:
                self.values = flat_values(self.table.column("logits"), self.num_classes)
                self.indices = None
            else:
                k = self.table.schema.field("topk_values").type.list_size
                self.values = flat_values(self.table.column("topk_values"), k)
                self.indices = flat_values(self.table.column("topk_indices"), k)
            self.verify(json.loads(meta[b"checksums"]))
        except CacheEntryError:
            raise
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
            raise CacheEntryError(f"{self.path}: unreadable ({type(err).__name__}: {' '.join(str(err).split())}); "
                                  f"truncated or corrupt.") from None

    def verify(self, expected: dict[str, str]) -> None:
        """Every column's CRC-32 over the mapped values equals the one written with it."""
        if set(expected) != set(self.table.column_names):
            raise CacheEntryError(f"{self.path}: its checksums cover {sorted(expected)}, its columns are "
                                  f"{sorted(self.table.column_names)}.")
        for name in self.table.column_names:
            column = self.table.column(name)
            found = checksum(flat_values(column, column.type.list_size))
            if found != expected[name]:
                raise CacheEntryError(f"{self.path}: column {name!r} fails its checksum ({found}, written "
                                      f"{expected[name]}): the file changed after it was written.")

    def rows(self, index: Tensor) -> Tensor:
        idx = index.numpy()
        values = torch.from_numpy(self.values[idx].astype(np.float32))
        if self.indices is None:
            return values
        full = (values.min(1, keepdim=True).values - self.fill_margin).expand(len(idx), self.num_classes).clone()
        return full.scatter_(1, torch.from_numpy(self.indices[idx].astype(np.int64)), values)

    def features(self, index: Tensor, taps: Sequence[str]) -> dict[str, Tensor]:
        missing = [t for t in taps if t not in self.feature_values]
        if missing:
            raise KeyError(f"cache entry {self.path.name} holds teacher features {sorted(self.feature_values)}, not "
                           f"{missing}: set distill.cache_features: true (or distill.teacher_outputs: online).")
        idx = index.numpy()
        return {t: torch.from_numpy(self.feature_values[t][idx].astype(np.float32)) for t in taps}


def flat_values(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A ``fixed_size_list`` column as a ``[N, width]`` NumPy view of the mapped buffer (no copy for one chunk)."""
    chunks = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, width) for c in column.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def lookup(root: str | os.PathLike, key: CacheKey) -> CachedLogits | None:
    """The entry for ``key`` if a complete and intact one exists (temporary files are never read). An entry that
    fails verification is moved aside (:func:`move_aside`) and reported as a miss, so it is recomputed."""
    path = entry_path(root, key)
    if not path.is_file():
        return None
    try:
        return CachedLogits(path)
    except CacheEntryError as err:
        aside = move_aside(path)
        log.warning("logit cache: %s; moved aside to %s, the entry is recomputed", err, aside.name)
        return None


def move_aside(path: Path) -> Path:
    """Rename a failed entry to its hidden moved-aside name (``.<name>.corrupt-<unix time ns>``)."""
    aside = path.with_name(f".{path.name}.corrupt-{time.time_ns()}")
    os.replace(path, aside)
    return aside


def has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(ARROW_MAGIC)) == ARROW_MAGIC
    except OSError:
        return False


def own_files(folder: Path) -> Iterator[tuple[Path, str]]:
    """The files of ``folder`` this cache wrote, as ``(path, kind)``: ``entry`` (its name, with the Arrow magic),
    ``temporary`` (a write that never finished) or ``aside`` (an entry moved aside). Nothing else."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if not path.is_file() or path.is_symlink():
            continue
        if ENTRY_NAME.match(path.name) and has_magic(path):
            yield path, "entry"
        elif TEMP_NAME.match(path.name) and (path.stat().st_size == 0 or has_magic(path)):
            yield path, "temporary"
        elif ASIDE_NAME.match(path.name):
            yield path, "aside"


def list_entries(root: str | os.PathLike) -> Iterator[CacheEntry]:
    """Every entry under ``root``, oldest first; an entry that fails verification is listed with its ``problem``
    (key ``None``), files the cache did not write are not listed."""
    files = sorted((p for p, kind in own_files(Path(root)) if kind == "entry"), key=lambda p: p.stat().st_mtime)
    for path in files:
        stat = path.stat()
        try:
            entry = CachedLogits(path)
        except CacheEntryError as err:
            yield CacheEntry(None, path, 0, stat.st_size, stat.st_mtime, str(err).removeprefix(f"{path}: "))
            continue
        meta = entry.table.schema.metadata
        yield CacheEntry(entry.key, path, entry.rows_count, stat.st_size, float(meta[b"created"]))


def clear(root: str | os.PathLike, older_than_s: float | None = None) -> list[Path]:
    """Delete this cache's files (entries, leftover temporary files, entries moved aside; :func:`own_files`) older
    than ``older_than_s`` seconds (all when ``None``). An entry-named Arrow file that carries another marker is not
    the cache's and stays."""
    removed = []
    now = time.time()
    for path, kind in list(own_files(Path(root))):
        if kind == "entry" and foreign(path):
            continue
        if older_than_s is None or now - path.stat().st_mtime > older_than_s:
            path.unlink()
            removed.append(path)
    return removed


def foreign(path: Path) -> bool:
    """An Arrow file whose schema is readable but carries neither this cache's marker nor a key (not ours)."""
    try:
        meta = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.metadata or {}
    except (OSError, pa.ArrowException):
        return False  # an unreadable entry-named file with the magic is a damaged entry of ours
    return FORMAT_KEY not in meta and b"key" not in meta
