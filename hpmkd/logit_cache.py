"""Teacher logits computed once, stored as Arrow IPC files, read back memory-mapped.

Teachers are frozen, so their logits on a fixed view of a fixed split never change. A cache entry holds one
teacher's logits for every row of one split, keyed by everything that changes them:

    key = sha256(teacher weights hash, teacher architecture + options, data fingerprint, split, view, dtype, top-k)

``view`` names the input pipeline (``"plain"``: the split's stored tensors, no random augmentation). A randomly
augmented view is never cached (see ``docs/cache.md``): an entry is served only for the exact view it was computed
on, so a stale or foreign entry can never be read. Files are written to a temporary name and renamed, so a crash
never leaves a half-written file under a key; readers ignore temporary names.

File layout (one file per key, ``<key>.arrow``): columns ``logits`` (``fixed_size_list<float16|float32>[C]``) or,
for top-k entries, ``topk_values`` and ``topk_indices``; the schema metadata holds the key's fields as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

SUFFIX = ".arrow"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


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

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class CacheEntry:
    key: CacheKey
    path: Path
    rows: int
    size_bytes: int
    created: float


def entry_path(root: str | os.PathLike, key: CacheKey) -> Path:
    return Path(root) / f"{key.digest}{SUFFIX}"


def write_entry(root: str | os.PathLike, key: CacheKey, logits: np.ndarray) -> Path:
    """Store ``logits [N, C]`` under ``key`` atomically (temporary file, then rename)."""
    if key.dtype not in DTYPES:
        raise ValueError(f"cache dtype {key.dtype!r} is not one of {sorted(DTYPES)}.")
    np_dtype, pa_dtype = DTYPES[key.dtype]
    n, c = logits.shape
    if key.top_k:
        k = min(key.top_k, c)
        top = torch.topk(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), k, dim=1)
        columns = {
            "topk_values": pa.FixedSizeListArray.from_arrays(pa.array(top.values.numpy().astype(np_dtype).ravel(), pa_dtype), k),
            "topk_indices": pa.FixedSizeListArray.from_arrays(pa.array(top.indices.numpy().astype(np.int32).ravel()), k),
        }
    else:
        columns = {"logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.astype(np_dtype).ravel(), pa_dtype), c)}
    meta = {"key": json.dumps(asdict(key)), "num_classes": str(c), "rows": str(n), "created": str(time.time())}
    table = pa.table(columns).replace_schema_metadata(meta)
    path = entry_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return path


class CachedLogits:
    """One cache entry, memory-mapped; ``rows(index)`` gives float32 logits ``[len(index), C]``.

    Top-k entries are expanded to full logits: every class outside the stored top-k gets the row's smallest stored
    logit minus ``fill_margin`` (10; our choice), so a softmax gives those classes almost no mass.
    """

    fill_margin = 10.0

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
        meta = self.table.schema.metadata
        self.key = CacheKey(**json.loads(meta[b"key"]))
        self.num_classes = int(meta[b"num_classes"])
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
        yield CacheEntry(CacheKey(**json.loads(meta[b"key"])), path, int(meta[b"rows"]), path.stat().st_size,
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
