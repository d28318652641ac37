"""Where a distill stage's teacher outputs come from (``distill.teacher_outputs``), prepared before training starts.

=========  =========================================================================================================
source     what happens
=========  =========================================================================================================
``online`` the teacher actors (``ray.teacher_replicas`` per teacher) answer every batch the workers train on
``cache``  every teacher's outputs on the split's stored tensors are computed once into the Arrow cache (by the
           teacher actors or Ray Data, ``ray.cache_fill``: :mod:`hpmkd.components.cache_fill`), and the workers
           read the entries memory-mapped
``bank``   the same for ``distill.bank_views`` views of a view bank (:mod:`hpmkd.data.views`); epoch ``e`` renders
           view ``e mod bank_views`` and reads that view's entries
=========  =========================================================================================================

:func:`hpmkd.teachers.choose_source` resolves ``auto`` to the fastest source that is exact. A teacher that stored
its own outputs on the training rows (an estimator's out-of-fold outputs) is served from them by the stored sources
(:func:`hpmkd.components.logit_cache.ensure_cached`); ``online`` cannot serve them and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from hpmkd.components.cache_fill import FillOnDemand
from hpmkd.components.logit_cache import CacheUse, ensure_cached
from hpmkd.components.teacher_service import TeacherPool, release, start_teacher_actors
from hpmkd.config import DistillConfig, ExperimentConfig
from hpmkd.data import DataSplits
from hpmkd.data.views import PLAIN, ViewBank
from hpmkd.registry import ConfigError, Registry
from hpmkd.teachers import TeacherSpec, choose_source


@dataclass
class TeacherOutputPlan:
    """What the training workers get: live actors (``online``) or stored entries ``cache[view][teacher]``."""

    source: str
    pools: list[TeacherPool] = field(default_factory=list)
    cache: list[list[str]] = field(default_factory=list)
    uses: list[list[CacheUse]] = field(default_factory=list)
    view_bank: ViewBank | None = None
    fill: str | None = None

    def release(self) -> None:
        release(self.pools)
        self.pools = []

    def cache_params(self) -> dict[str, str]:
        """``cache.<teacher>``: the digests of the entries it is served from, in view order; ``cache_fill``: what
        computes missing entries (``ray.cache_fill`` resolved)."""
        teachers = [u.teacher for u in self.uses[0]] if self.uses else []
        fill = {"cache_fill": self.fill} if self.fill else {}
        return fill | {f"cache.{t}": ",".join(per_view[i].digest for per_view in self.uses)
                       for i, t in enumerate(teachers)}

    def cache_metrics(self) -> dict[str, float]:
        entries = [u for per_view in self.uses for u in per_view]
        return {"cache_hits": float(sum(u.hit for u in entries)), "cache_entries": float(len(entries))} if entries else {}


@dataclass(frozen=True)
class OutputsRequest:
    """What a stage asks for: its teachers' outputs (``specs``, weights files ``weights``, feature ``taps`` per
    teacher) on ``splits`` for the recipe ``distill``, in experiment ``cfg`` (seed, augmentation, actors, cache).
    ``train_outputs[i]``: teacher ``i``'s own stored outputs on the training rows (out-of-fold, ``None``: computed
    by the teacher), which only the stored sources can serve."""

    cfg: ExperimentConfig
    distill: DistillConfig
    splits: DataSplits
    specs: list[TeacherSpec]
    weights: list[str]
    taps: Sequence[Sequence[str]]
    train_outputs: Sequence[str | None] = ()


#: source name -> ``request -> TeacherOutputPlan``
SOURCES: Registry[TeacherOutputPlan] = Registry("teacher output source")


@SOURCES.register("online")
def online(request: OutputsRequest) -> TeacherOutputPlan:
    """Start the teacher actors; the workers ask them for every batch."""
    stored = [s.name for s, path in zip(request.specs, request.train_outputs) if path is not None]
    if stored:
        raise ConfigError(f"distill.teacher_outputs: online asks the teachers for every training batch, but "
                          f"{', '.join(stored)} serve(s) stored out-of-fold outputs on the training rows; use "
                          f"teacher_outputs: cache (or auto), or tabular.teacher_fit: in_sample.")
    cfg = request.cfg
    return TeacherOutputPlan("online", pools=start_teacher_actors(request.specs, request.weights, cfg.ray.teacher_cpus,
                                                                  cfg.ray.teacher_gpus, cfg.ray.teacher_replicas))


def stored(source: str, views: ViewBank, request: OutputsRequest) -> TeacherOutputPlan:
    """Fill the missing entries of every view (``ray.cache_fill``, started only when one is missing), then release
    what filled them."""
    distill, splits = request.distill, request.splits
    filler = FillOnDemand(request.cfg.ray, request.specs, list(request.weights))
    try:
        uses = ensure_cached(filler, request.specs, request.weights, splits.train, root=str(request.cfg.cache_root()),
                             fingerprint=splits.fingerprint, views=views, dtype=distill.cache_dtype,
                             top_k=distill.cache_top_k, taps=request.taps, stored=request.train_outputs)
    finally:
        filler.release()
    return TeacherOutputPlan(source, cache=[[u.path for u in per_view] for per_view in uses], uses=uses,
                             view_bank=None if views is PLAIN else views, fill=filler.kind)


@SOURCES.register("cache")
def cache(request: OutputsRequest) -> TeacherOutputPlan:
    return stored("cache", PLAIN, request)


@SOURCES.register("bank")
def bank(request: OutputsRequest) -> TeacherOutputPlan:
    views = ViewBank(request.cfg.data.augment, request.cfg.seed, request.distill.bank_views)
    return stored("bank", views, request)


def prepare_teacher_outputs(request: OutputsRequest) -> TeacherOutputPlan:
    """Prepare the stage's source: the teacher actors (``online``), or the filled cache entries (the stored
    sources release what filled them)."""
    source = choose_source(request.distill, request.cfg.data.augment, any(request.taps))
    return SOURCES.get(source, "distill.teacher_outputs")(request)
