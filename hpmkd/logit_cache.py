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
flattened, its shape in the schema metadata); the schema metadata also holds the key's fields as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

SUFFIX = ".arrow"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
FEATURE_PREFIX = "feature:"


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
    key: CacheKey
    path: Path
    rows: int
    size_bytes: int
    created: float


def entry_path(root: str | os.PathLike, key: CacheKey) -> Path:
    return Path(root) / f"{key.digest}{SUFFIX}"


def fixed_size_list(values: np.ndarray, np_dtype: type, pa_dtype: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """Rows of ``values [N, ...]`` as one ``fixed_size_list`` column (each row flattened)."""
    flat = np.ascontiguousarray(values.reshape(len(values), -1), dtype=np_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa_dtype), flat.shape[1])


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
            "feature_shapes": json.dumps({tap: list(v.shape[1:]) for tap, v in features.items()})}
    table = pa.table(columns).replace_schema_metadata(meta)
    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return path


class CachedLogits:
    """One cache entry, memory-mapped; ``rows(index)`` gives float32 logits ``[len(index), C]`` and
    ``features(index, taps)`` the stored features (float32, ``[len(index), *shape]``) of those rows.

    Top-k entries are expanded to full logits: every class outside the stored top-k gets the row's smallest stored
    logit minus ``fill_margin`` (10; our choice), so a softmax gives those classes almost no mass.
    """

    fill_margin = 10.0

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
        meta = self.table.schema.metadata
        self.key = CacheKey.from_json(meta[b"key"])
        self.num_classes = int(meta[b"num_classes"])
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
    """The entry for ``key`` if a complete one exists (temporary files are never read)."""
    path = entry_path(root, key)
    return CachedLogits(path) if path.is_file() else None


def list_entries(root: str | os.PathLike) -> Iterator[CacheEntry]:
    """Every complete entry under ``root``, oldest first."""
    folder = Path(root)
    for path in sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        meta = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.metadata
        yield CacheEntry(CacheKey.from_json(meta[b"key"]), path, int(meta[b"rows"]), path.stat().st_size,
                         float(meta[b"created"]))


def clear(root: str | os.PathLike, older_than_s: float | None = None) -> list[Path]:
    """Delete entries (and leftover temporary files) older than ``older_than_s`` seconds (all when ``None``)."""
    removed = []
    now = time.time()
    folder = Path(root)
    if not folder.is_dir():
        return removed
    for path in list(folder.glob(f"*{SUFFIX}")) + list(folder.glob(f".*{SUFFIX}.tmp-*")):
        if older_than_s is None or now - path.stat().st_mtime > older_than_s:
            path.unlink()
            removed.append(path)
    return removed
