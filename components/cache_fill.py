"""How the missing entries of the teacher-output cache are computed (``ray.cache_fill``).

=============  ======================================================================================================
fill           what computes the entries
=============  ======================================================================================================
``tasks``      (default) Ray tasks (:func:`teacher_chunks`) on Ray's pooled worker processes: per teacher, the chunks
               to compute are cut into runs of consecutive chunks (as many as the fill's replicas, at most
               :data:`MAX_RUN` chunks each); a task builds the teacher from the object store once, renders and runs
               its chunks, and returns their outputs; the driver writes each entry when its last run is in. The
               processes stay in Ray's pool with torch and the model code imported, so the stage's training task,
               which Ray places on one of them, starts warm
``actors``     the teacher actors of :mod:`hpmkd.components.teacher_service` (``ray.teacher_replicas`` per
               teacher), driven by the hand-made loop of :func:`hpmkd.components.logit_cache.fill`: the driver
               renders every chunk, sends it to every teacher and writes each entry
``ray_data``   Ray Data batch inference: a dataset of chunk descriptors ``(view, start)`` flows through one
               ``map_batches`` stage per teacher, each over a fixed-size actor pool of that teacher
               (``compute=ActorPoolStrategy(size=ray.teacher_replicas)``, ``num_cpus=ray.teacher_cpus``,
               ``num_gpus=ray.teacher_gpus``); each actor reads and renders its chunks itself and writes the chunk's
               outputs to the cache root as a *shard*; the driver only counts finished chunks and assembles a view's
               entries from their shards once the view's last chunk has passed every teacher
``auto``       ``ray_data`` when the Ray cluster has more than one alive node, ``tasks`` on one node
=============  ======================================================================================================

A shard is an ordinary cache entry (:func:`hpmkd.logit_cache.write_entry`: written atomically, CRC-checked when
read, so a worker on another node never reads half a file) holding the float32 outputs of rows ``[start, stop)``,
keyed like its entry with the row range in the split (``train[1024:2048]``), float32 and no top-k. The entry is
then written from the verified shards exactly as the actor fill writes it (the same chunks of
:data:`~hpmkd.components.logit_cache.BATCH` rows, the same forward pass, the same float32 outputs converted once),
so its content is identical whichever fill wrote it; the shards are deleted once it is in place. A fill that is
interrupted leaves its finished shards, and the next fill reuses them instead of recomputing those chunks.

Every fill starts only when an entry is missing (:class:`FillOnDemand`), with as many actors (or task runs) per
teacher as the CPUs free at that moment hold (:func:`fill_replicas`; each computes whole chunks on its own threads
with :func:`chunk_outputs`, so the entries depend neither on the count nor on the fill).

Teacher weights are read in the driver by the teacher's provider (``torch.load(weights_only=True)`` for a torch
teacher), checked by building the teacher once, and reach the actors through the object store, as for the actor
fill; the training split reaches them the same way (one copy in the object store, fetched once per node).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
import ray
import torch

from hpmkd.components.logit_cache import BATCH, EntryBuffer, fill
from hpmkd.components.teacher_service import TeacherPool, put_checked_weights, release, start_teacher_actors
from hpmkd.config import RayConfig
from hpmkd.data.source import BatchSource
from hpmkd.data.views import ViewBank
from hpmkd.logit_cache import CacheEntryError, CachedLogits, CacheKey, entry_path, lookup, write_entry
from hpmkd.registry import Registry
from hpmkd.teachers import TeacherSpec, provider_for


class CacheFill(Protocol):
    """Computes the ``(view, teacher)`` entries ``todo`` of ``source`` under ``keys[view][teacher]``; ``kind`` is
    its ``ray.cache_fill`` name, recorded with the stage."""

    kind: ClassVar[str]

    def __call__(self, source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
                 keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None: ...

    def release(self) -> None: ...


@dataclass
class ActorFill:
    """The actor fill: the teacher pools started for it, ended by :meth:`release`."""

    pools: list[TeacherPool]
    kind: ClassVar[str] = "actors"

    def __call__(self, source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
                 keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None:
        fill(self.pools, source, views, todo, keys, root, dtype, taps)

    def release(self) -> None:
        release(self.pools)
        self.pools = []


def shard_key(key: CacheKey, start: int, stop: int) -> CacheKey:
    """The key of the shard holding rows ``[start, stop)`` of ``key``'s entry (float32 logits, no top-k)."""
    return replace(key, split=f"{key.split}[{start}:{stop}]", dtype="float32", top_k=None)


def chunk_bounds(rows: int) -> list[tuple[int, int]]:
    """The chunks both fills cut a split into: ``[start, stop)`` of :data:`BATCH` rows."""
    return [(start, min(rows, start + BATCH)) for start in range(0, rows, BATCH)]


def fill_device() -> torch.device:
    """The device of a fill's process: its GPU when Ray gave it one."""
    return torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")


def chunk_outputs(teacher: Any, device: torch.device, source: BatchSource, views: ViewBank, view: int, start: int,
                  taps: Sequence[str]) -> dict[str, Any]:
    """The teacher's outputs on the chunk of :data:`BATCH` rows at ``start`` in view ``view``, computed as the
    teacher actors compute a chunk sent to them (the view rendered, made a contiguous array, one forward pass)."""
    index = torch.arange(start, min(len(source), start + BATCH))
    x, _ = source.rows(index)
    chunk = np.ascontiguousarray(views.render(x, index, view).numpy())
    logits, feats = teacher.forward(torch.from_numpy(chunk).to(device), list(taps))
    return {"logits": logits.float().cpu().numpy(),
            "features": {tap: value.float().cpu().numpy() for tap, value in feats.items()}}


class TeacherShards:
    """One Ray Data actor of one teacher: for each chunk descriptor ``(view, start)`` of a view it was asked for,
    renders the chunk, runs the teacher once and writes the outputs as a shard (kept when one exists already).
    Passes the descriptors on unchanged, so the next teacher's stage sees them."""

    def __init__(self, spec: TeacherSpec, weights: list[ray.ObjectRef], source: list[ray.ObjectRef], views: ViewBank,
                 keys: dict[int, CacheKey], root: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = fill_device()
        self.teacher = provider_for(spec.model).build(spec, ray.get(weights[0])).to(self.device)
        self.source: BatchSource = ray.get(source[0])
        self.views = views
        self.keys = keys
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for view, start in zip(batch["view"].tolist(), batch["start"].tolist()):
            if view in self.keys:
                self.write_shard(view, start)
        return batch

    def write_shard(self, view: int, start: int) -> None:
        key = self.keys[view]
        shard = shard_key(key, start, min(len(self.source), start + BATCH))
        if lookup(self.root, shard) is not None:
            return
        out = chunk_outputs(self.teacher, self.device, self.source, self.views, view, start, key.taps)
        write_entry(self.root, shard, out["logits"], out["features"])


def assemble(root: str, key: CacheKey, rows: int) -> None:
    """Write ``key``'s entry from its verified shards (exactly what the actor fill writes), then delete them. A
    fill running beside this one (another stage with the same teacher) may have assembled it and removed the
    shards first: then its entry is taken."""
    try:
        shards = [CachedLogits(entry_path(root, shard_key(key, start, stop))) for start, stop in chunk_bounds(rows)]
    except CacheEntryError:
        if lookup(root, key) is not None:
            return
        raise
    logits = np.concatenate([s.values for s in shards])
    features = {tap: np.concatenate([s.feature_values[tap] for s in shards]) for tap in key.taps}
    write_entry(root, key, logits, features)
    for shard in shards:
        shard.path.unlink(missing_ok=True)


@dataclass
class StoredWeightsFill:
    """What the task and Ray Data fills share: ``specs`` and their ``weights`` files, read, checked and put in the
    object store when the fill is made (``refs``); ``replicas`` workers per teacher, each of ``cpus`` CPUs and
    ``gpus`` GPUs."""

    specs: list[TeacherSpec]
    weights: list[str]
    cpus: float
    gpus: float
    replicas: int = 1
    refs: list[ray.ObjectRef] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.refs = [put_checked_weights(spec, path) for spec, path in zip(self.specs, self.weights)]

    def release(self) -> None:
        self.refs = []


@dataclass
class RayDataFill(StoredWeightsFill):
    """The Ray Data fill (module docstring): ``replicas`` actors per teacher, each with ``cpus`` CPUs and ``gpus``
    GPUs."""

    kind: ClassVar[str] = "ray_data"

    def __call__(self, source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
                 keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None:
        rows = len(source)
        chunks = chunk_bounds(rows)
        todo_views = sorted({v for v, _ in todo})
        descriptors = [{"view": v, "start": start} for v in todo_views for start, _ in chunks]
        data = ray.data.from_items(descriptors, override_num_blocks=len(descriptors))
        source_ref = [ray.put(source)]
        for i in sorted({i for _, i in todo}):
            data = data.map_batches(
                TeacherShards, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.replicas), num_cpus=self.cpus, num_gpus=self.gpus,
                fn_constructor_kwargs=dict(spec=self.specs[i], weights=[self.refs[i]], source=source_ref, views=views,
                                           keys={v: keys[v][i] for v, j in todo if j == i}, root=root,
                                           threads=max(1, int(self.cpus))))
        data.context.enable_progress_bars = False  # a stage's log is not a progress display
        data.context.print_on_execution_start = False
        finished: Counter[int] = Counter()
        for done in data.iter_rows():
            view = int(done["view"])
            finished[view] += 1
            if finished[view] == len(chunks):
                for v, i in todo:
                    if v == view:
                        assemble(root, keys[v][i], rows)


@ray.remote
def teacher_chunks(spec: TeacherSpec, weights: list[ray.ObjectRef], source: list[ray.ObjectRef], views: ViewBank,
                   chunks: list[tuple[int, int]], taps: Sequence[str], threads: int) -> list[dict[str, Any]]:
    """One task of the task fill: the teacher built once, then its outputs on each ``(view, start)`` chunk of the
    source, in order (:func:`chunk_outputs`). The teacher goes with the task; the process stays in Ray's pool."""
    torch.set_num_threads(max(1, threads))
    device = fill_device()
    teacher = provider_for(spec.model).build(spec, ray.get(weights[0])).to(device)
    rows: BatchSource = ray.get(source[0])
    return [chunk_outputs(teacher, device, rows, views, view, start, taps) for view, start in chunks]


#: the most chunks one task of the task fill computes (what its result holds at once)
MAX_RUN = 8


@dataclass
class TaskFill(StoredWeightsFill):
    """The task fill (module docstring): per teacher, the chunks to compute split into runs of consecutive chunks,
    ``replicas`` of them or more (at most :data:`MAX_RUN` chunks each), each one Ray task of ``cpus`` CPUs and
    ``gpus`` GPUs."""

    kind: ClassVar[str] = "tasks"

    def __call__(self, source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
                 keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None:
        rows, source_ref = len(source), [ray.put(source)]
        chunks = [(v, start) for v in sorted({v for v, _ in todo}) for start, _ in chunk_bounds(rows)]
        task = teacher_chunks.options(num_cpus=self.cpus, num_gpus=self.gpus)
        runs = {}
        for i in sorted({i for _, i in todo}):
            mine = [(v, start) for v, start in chunks if (v, i) in todo]
            tasks = min(len(mine), max(self.replicas, -(-len(mine) // MAX_RUN)))
            for run in np.array_split(np.arange(len(mine)), tasks):
                part = [mine[k] for k in run]
                runs[task.remote(self.specs[i], [self.refs[i]], source_ref, views, part, taps[i],
                                 max(1, int(self.cpus)))] = (i, part)
        buffers = {job: EntryBuffer(rows, len(chunk_bounds(rows)), dtype) for job in todo}
        pending = list(runs)
        while pending:
            [done], pending = ray.wait(pending, num_returns=1)
            i, part = runs[done]
            for (view, start), out in zip(part, ray.get(done)):
                if buffers[(view, i)].put(start, out):
                    finished = buffers.pop((view, i))
                    write_entry(root, keys[view][i], finished.logits, finished.features)


#: ``ray.cache_fill`` -> ``(ray config, specs, weights) -> CacheFill`` (the names are :data:`hpmkd.config.CACHE_FILLS`)
FILLS: Registry[CacheFill] = Registry("cache fill")


def fill_replicas(ray_cfg: RayConfig, teachers: int, chunks: int) -> int:
    """Actors per teacher for a fill of ``chunks`` chunks: as many as the CPUs (and GPUs) Ray has free as the fill
    starts hold, each using what ``ray.teacher_cpus`` gives it (at least one thread), never more than there are
    chunks, and at least ``ray.teacher_replicas``. The stage waiting for the fill holds CPUs whose workers start only
    once it is done, so they are among the free ones; CPUs that running stages hold are not. Each actor computes on
    its own thread(s), so an entry is the same whatever the count (a chunk's forward pass does not depend on it)."""
    free = ray.available_resources()
    fits = free.get("CPU", 0.0) // (teachers * max(1.0, ray_cfg.teacher_cpus))
    if ray_cfg.teacher_gpus:
        fits = min(fits, free.get("GPU", 0.0) // (teachers * ray_cfg.teacher_gpus))
    return max(ray_cfg.teacher_replicas, min(int(fits), chunks))


@FILLS.register("actors")
def actor_fill(ray_cfg: RayConfig, specs: list[TeacherSpec], weights: list[str]) -> ActorFill:
    return ActorFill(start_teacher_actors(specs, weights, ray_cfg.teacher_cpus, ray_cfg.teacher_gpus,
                                          ray_cfg.teacher_replicas))


@FILLS.register("tasks")
def task_fill(ray_cfg: RayConfig, specs: list[TeacherSpec], weights: list[str]) -> TaskFill:
    return TaskFill(specs, weights, ray_cfg.teacher_cpus, ray_cfg.teacher_gpus, ray_cfg.teacher_replicas)


@FILLS.register("ray_data")
def ray_data_fill(ray_cfg: RayConfig, specs: list[TeacherSpec], weights: list[str]) -> RayDataFill:
    return RayDataFill(specs, weights, ray_cfg.teacher_cpus, ray_cfg.teacher_gpus, ray_cfg.teacher_replicas)


def resolved_fill(ray_cfg: RayConfig) -> str:
    """``ray.cache_fill`` with ``auto`` resolved: ``ray_data`` when the cluster has more than one alive node, else
    ``tasks``."""
    if ray_cfg.cache_fill != "auto":
        return ray_cfg.cache_fill
    return "ray_data" if sum(1 for node in ray.nodes() if node["Alive"]) > 1 else "tasks"


@FILLS.register("auto")
def auto_fill(ray_cfg: RayConfig, specs: list[TeacherSpec], weights: list[str]) -> CacheFill:
    return FILLS.get(resolved_fill(ray_cfg))(ray_cfg, specs, weights)


def start_fill(ray_cfg: RayConfig, specs: list[TeacherSpec], weights: Sequence[str]) -> CacheFill:
    """The fill ``ray.cache_fill`` names, ready to compute (actors started, or weights in the object store)."""
    return FILLS.get(ray_cfg.cache_fill, "ray.cache_fill")(ray_cfg, specs, list(weights))


@dataclass
class FillOnDemand:
    """The fill ``ray.cache_fill`` names, started when the first missing entry is to be computed (:func:`start_fill`,
    with :func:`fill_replicas` actors per teacher) and ended by :meth:`release`: a stage whose entries are all cached
    starts no actor and reads no weights (the entries' keys hold the weights' digest). ``kind`` is the fill's name,
    ``auto`` resolved, started or not."""

    ray_cfg: RayConfig
    specs: list[TeacherSpec]
    weights: list[str]
    started: CacheFill | None = None

    @property
    def kind(self) -> str:
        return self.started.kind if self.started is not None else resolved_fill(self.ray_cfg)

    def __call__(self, source: BatchSource, views: ViewBank, todo: list[tuple[int, int]],
                 keys: list[list[CacheKey]], root: str, dtype: str, taps: list[tuple[str, ...]]) -> None:
        if self.started is None:
            chunks = len(chunk_bounds(len(source))) * len({v for v, _ in todo})
            sized = replace(self.ray_cfg, teacher_replicas=fill_replicas(self.ray_cfg, len(self.specs), chunks))
            self.started = start_fill(sized, self.specs, self.weights)
        self.started(source, views, todo, keys, root, dtype, taps)

    def release(self) -> None:
        if self.started is not None:
            self.started.release()
            self.started = None
