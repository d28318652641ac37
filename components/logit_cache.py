"""Filling the logit cache with the teacher actors, and serving training workers from it.

:func:`ensure_cached` looks every teacher's entry up and computes only the missing ones: the teacher actors run
over the split in large batches, all teachers at once (each batch is put in the object store once and shared).
:class:`CachedTeachers` is the :class:`hpmkd.teachers.TeacherSource` a worker uses when the view is cacheable: it
memory-maps the entries (opened lazily, in the worker's own process) and answers each batch by row index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from components.teacher_service import TeacherSpec
from hpmkd.config_schema import to_dict
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.checkpoint import file_digest
from hpmkd.logit_cache import CachedLogits, CacheKey, lookup, write_entry
from hpmkd.teachers import Pending

BATCH = 1024  # rows per actor call while filling: large enough that the RPC cost (~1-5 ms) is negligible


@dataclass
class CacheUse:
    """Which entry a teacher's outputs come from, and whether it already existed."""

    teacher: str
    path: str
    digest: str
    hit: bool


def teacher_key(spec: TeacherSpec, weights_path: str, fingerprint: str, split: str, view: str, dtype: str,
                top_k: int | None) -> CacheKey:
    model = f"{spec.model.model}:{sorted(to_dict(spec.model.options).items())}:{spec.num_classes}:{spec.input_shape}"
    return CacheKey(file_digest(weights_path), model, fingerprint, split, view, dtype, top_k)


def ensure_cached(
    actors: list[Any],
    specs: list[TeacherSpec],
    weights: list[str],
    x: torch.Tensor,
    *,
    root: str,
    fingerprint: str,
    split: str = "train",
    view: str = "plain",
    dtype: str = "float16",
    top_k: int | None = None,
) -> list[CacheUse]:
    """Make sure every teacher has an entry for ``x`` (the split's rows, in order); compute the missing ones."""
    keys = [teacher_key(s, w, fingerprint, split, view, dtype, top_k) for s, w in zip(specs, weights)]
    missing = [i for i, k in enumerate(keys) if lookup(root, k) is None]
    if missing:
        parts: dict[int, list[Any]] = {i: [] for i in missing}
        for start in range(0, len(x), BATCH):
            ref = ray.put(x[start : start + BATCH].numpy())
            for i in missing:
                parts[i].append(actors[i].forward.remote(ref, []))
        for i in missing:
            logits = np.concatenate([out["logits"] for out in ray.get(parts[i])])
            write_entry(root, keys[i], logits)
    return [CacheUse(s.name, str(Path(root) / f"{k.digest}.arrow"), k.digest, i not in missing)
            for i, (s, k) in enumerate(zip(specs, keys))]


class CachedTeachers:
    """A :class:`hpmkd.teachers.TeacherSource` reading memory-mapped cache entries by row index."""

    def __init__(self, names: list[str], paths: list[str]):
        self.names = names
        self.paths = paths
        self._entries: list[CachedLogits] | None = None

    def request(self, x: torch.Tensor, index: torch.Tensor, taps: Sequence[Sequence[str]]) -> Pending:
        if any(taps):
            raise ValueError("the logit cache holds logits only; a method asking for teacher features needs "
                             "distill.teacher_outputs: online")
        if self._entries is None:
            self._entries = [CachedLogits(p) for p in self.paths]
        result = TeacherOutputs(torch.stack([e.rows(index) for e in self._entries]), [{} for _ in self._entries])
        return lambda: result
