"""Filling the teacher-output cache with the teacher actors, and serving training workers from it.

:func:`ensure_cached` looks every (view, teacher) entry up and computes only the missing ones. The split is cut into
chunks of :data:`BATCH` rows; each chunk's view (the stored tensors, or one view of a view bank, see
:mod:`hpmkd.data.views`) is rendered once, put in the object store once and sent to every teacher that misses it,
each request to the teacher's next replica. At most :data:`IN_FLIGHT` requests per replica are outstanding, so
memory stays bounded whatever the split's size; results go into preallocated arrays, and each entry is written
(atomically) as soon as its last chunk is in.

A teacher whose stage stored its own outputs on the training rows (an estimator teacher's out-of-fold outputs,
``ModelArtifact.train_outputs``: each row scored by the fold model that never saw it) is not asked: its entry is
written from that file, keyed like any other with the view naming the fold plan and the file's digest
(``plain|oof:folds=5:seed=0:<sha256 prefix>``), so in-sample and out-of-fold outputs never share an entry.

:class:`CachedTeachers` is the :class:`hpmkd.teachers.TeacherSource` a worker uses when the teachers' outputs are
stored: it memory-maps the entries (opened lazily, in the worker's own process) and answers each batch by row index
from the entries of the view it is told (``view`` = the epoch's view of a view bank; 0 for the plain cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch

from hpmkd.components.teacher_service import TeacherPool
from hpmkd.checkpoint import file_digest
from hpmkd.data.source import BatchSource
from hpmkd.data.views import PLAIN, ViewBank
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.logit_cache import DTYPES, CachedLogits, CacheKey, entry_path, lookup, write_entry
from hpmkd.oof import FoldOutputs
from hpmkd.teachers import Pending, TeacherSpec

BATCH = 1024  # rows per actor call while filling: large enough that the RPC cost (~1-5 ms) is negligible
IN_FLIGHT = 2  # outstanding requests per replica while filling: one computing, one queued behind it


@dataclass
class CacheUse:
    """Which entry a teacher's outputs on one view come from, and whether it already existed."""

    teacher: str
    view: str
    path: str
    digest: str
    hit: bool


def teacher_key(spec: TeacherSpec, weights_path: str, fingerprint: str, split: str, view: str, dtype: str,
                top_k: int | None, taps: Sequence[str] = ()) -> CacheKey:
    return CacheKey(file_digest(weights_path), spec.model.identity(spec.shape), fingerprint, split, view, dtype, top_k,
                    tuple(sorted(taps)))


class EntryBuffer:
    """One entry's outputs for all ``rows``, filled chunk by chunk (logits float32, features in the entry's dtype)."""

    def __init__(self, rows: int, chunks: int, dtype: str):
        self.rows = rows
        self.missing = chunks
        self.dtype = DTYPES[dtype][0]
        self.logits: np.ndarray | None = None
        self.features: dict[str, np.ndarray] = {}

    def put(self, start: int, out: dict[str, Any]) -> bool:
        """Store one chunk's outputs at row ``start``; True when every chunk is in."""
        if self.logits is None:
            self.logits = np.empty((self.rows, *out["logits"].shape[1:]), np.float32)
            self.features = {t: np.empty((self.rows, *v.shape[1:]), self.dtype) for t, v in out["features"].items()}
        stop = start + len(out["logits"])
        self.logits[start:stop] = out["logits"]
        for tap, value in out["features"].items():
            self.features[tap][start:stop] = value
        self.missing -= 1
        return self.missing == 0


def ensure_cached(
    filler: list[TeacherPool] | Callable[..., None],
    specs: list[TeacherSpec],
    weights: list[str],
    source: BatchSource,
    *,
    root: str,
    fingerprint: str,
    split: str = "train",
    views: ViewBank = PLAIN,
    dtype: str = "float16",
    top_k: int | None = None,
    taps: Sequence[Sequence[str]] = (),
    stored: Sequence[str | None] = (),
) -> list[list[CacheUse]]:
    """Make sure every teacher has an entry for every view of ``source`` (a split's rows, in order); compute the
    missing ones. ``taps[i]``: the feature taps stored with teacher ``i``'s logits; ``stored[i]``: teacher ``i``'s
    own stored outputs on these rows (module docstring), written as its entry instead. ``filler`` computes the
    missing entries: the teachers' pools (:func:`fill`, the actor fill) or any
    :class:`hpmkd.components.cache_fill.CacheFill`. Returns ``uses[view][teacher]``."""
    taps = [tuple(sorted(t)) for t in taps] if taps else [() for _ in specs]
    stored = list(stored) or [None] * len(specs)
    base = [teacher_key(s, w, fingerprint, split, "", dtype, top_k, taps[i]) for i, (s, w) in enumerate(zip(specs, weights))]
    keys = [[replace(k, view=views.name(v) + stored_view(stored[i], views)) for i, k in enumerate(base)]
            for v in range(views.views)]
    missing = {(v, i) for v in range(views.views) for i in range(len(specs)) if lookup(root, keys[v][i]) is None}
    for v, i in sorted(missing):
        if stored[i] is not None:
            write_stored(root, keys[v][i], stored[i], len(source), specs[i].name)
    missing_computed = sorted((v, i) for v, i in missing if stored[i] is None)
    if missing_computed:
        if callable(filler):
            filler(source, views, missing_computed, keys, root, dtype, taps)
        else:
            fill(filler, source, views, missing_computed, keys, root, dtype, taps)
    return [[CacheUse(specs[i].name, views.name(v), str(entry_path(root, keys[v][i])), keys[v][i].digest,
                      (v, i) not in missing) for i in range(len(specs))] for v in range(views.views)]


def stored_view(path: str | None, views: ViewBank) -> str:
    """What a teacher's stored training outputs add to its entries' view: the fold plan and the file's digest."""
    if path is None:
        return ""
    if views is not PLAIN:
        raise ValueError("stored (out-of-fold) teacher outputs score the rows as they are; they cannot serve the "
                         "augmented views of a view bank (set data.augment: none).")
    return f"|{FoldOutputs.load(path).plan.name}:{file_digest(path)[:16]}"


def write_stored(root: str, key: CacheKey, path: str, rows: int, teacher: str) -> None:
    """Teacher ``teacher``'s entry from its stored outputs (:class:`hpmkd.oof.FoldOutputs`)."""
    outputs = FoldOutputs.load(path)
    if len(outputs.log_probs) != rows:
        raise ValueError(f"teacher {teacher!r}: its stored outputs ({path}) have {len(outputs.log_probs)} rows, the "
                         f"training split {rows}; they were made for other data.")
    write_entry(root, key, outputs.log_probs)


def fill(pools: list[TeacherPool], source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
         keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None:
    """Compute the ``(view, teacher)`` entries ``todo`` (see the module docstring)."""
    n = len(source)
    starts = range(0, n, BATCH)
    buffers = {job: EntryBuffer(n, len(starts), dtype) for job in todo}
    window = IN_FLIGHT * sum(len(p.replicas) for p in pools)
    pending: deque[tuple[tuple[int, int], int, ray.ObjectRef]] = deque()

    def collect() -> None:
        job, start, ref = pending.popleft()
        if buffers[job].put(start, ray.get(ref)):
            done = buffers.pop(job)
            write_entry(root, keys[job[0]][job[1]], done.logits, done.features)

    for view in sorted({v for v, _ in todo}):
        teachers = [i for v, i in todo if v == view]
        for start in starts:
            index = torch.arange(start, min(n, start + BATCH))
            x, _ = source.rows(index)
            chunk = ray.put(views.render(x, index, view).numpy())  # shared by every teacher
            for i in teachers:
                pending.append(((view, i), start, pools[i].submit(chunk, taps[i])))
            while len(pending) > window:
                collect()
    while pending:
        collect()


class CachedTeachers:
    """A :class:`hpmkd.teachers.TeacherSource` reading memory-mapped cache entries by row index.

    ``paths[view][teacher]``: one list of entries per view (one view for the plain cache).
    """

    def __init__(self, names: list[str], paths: list[list[str]]):
        self.names = names
        self.paths = paths
        self._entries: dict[int, list[CachedLogits]] = {}

    def request(self, x: torch.Tensor, index: torch.Tensor, taps: Sequence[Sequence[str]], view: int = 0) -> Pending:
        if view not in self._entries:
            self._entries[view] = [CachedLogits(p) for p in self.paths[view]]
        entries = self._entries[view]
        result = TeacherOutputs(torch.stack([e.rows(index) for e in entries]),
                                [e.features(index, taps[i] if taps else ()) for i, e in enumerate(entries)])
        return lambda: result
