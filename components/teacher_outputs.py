"""Where a distill stage's teacher outputs come from (``distill.teacher_outputs``), prepared before training starts.

=========  =========================================================================================================
source     what happens
=========  =========================================================================================================
``online`` the teacher actors (``ray.teacher_replicas`` per teacher) answer every batch the workers train on
``cache``  the actors compute every teacher's outputs on the split's stored tensors once into the Arrow cache, are
           released, and the workers read the entries memory-mapped
``bank``   the same for ``distill.bank_views`` views of a view bank (:mod:`hpmkd.data.views`); epoch ``e`` renders
           view ``e mod bank_views`` and reads that view's entries
=========  =========================================================================================================

:func:`choose_source` resolves ``auto`` to the fastest source that is exact. Stored outputs (``cache``, ``bank``)
skip the teachers' forward passes during training, so they win whenever they serve exactly the view the student
sees: ``cache`` when the input is not randomly augmented; ``bank`` when it is and the user asked for a bank
(``bank_views``: replaying N views changes the training distribution, so it is never imposed); ``online``
otherwise. A method that reads teacher features can be served from storage only where ``distill.cache_features``
asks for it (feature maps can be large: ``rows × prod(feature shape) × 2`` bytes per teacher and view in float16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from components.logit_cache import CacheUse, ensure_cached
from components.teacher_service import TeacherPool, TeacherSpec, release, start_teacher_actors
from hpmkd.config import DistillConfig, ExperimentConfig
from hpmkd.data import DataSplits
from hpmkd.data.views import PLAIN, ViewBank
from hpmkd.registry import ConfigError, Registry


@dataclass
class TeacherOutputPlan:
    """What the training workers get: live actors (``online``) or stored entries ``cache[view][teacher]``."""

    source: str
    pools: list[TeacherPool] = field(default_factory=list)
    cache: list[list[str]] = field(default_factory=list)
    uses: list[list[CacheUse]] = field(default_factory=list)
    view_bank: ViewBank | None = None

    def release(self) -> None:
        release(self.pools)
        self.pools = []

    def cache_params(self) -> dict[str, str]:
        """``cache.<teacher>``: the digests of the entries it is served from, in view order."""
        teachers = [u.teacher for u in self.uses[0]] if self.uses else []
        return {f"cache.{t}": ",".join(per_view[i].digest for per_view in self.uses) for i, t in enumerate(teachers)}

    def cache_metrics(self) -> dict[str, float]:
        entries = [u for per_view in self.uses for u in per_view]
        return {"cache_hits": float(sum(u.hit for u in entries)), "cache_entries": float(len(entries))} if entries else {}


def choose_source(distill: DistillConfig, augment: str, needs_features: bool) -> str:
    """``distill.teacher_outputs`` resolved (see the module docstring for the ``auto`` rule)."""
    choice = distill.teacher_outputs
    storable = not needs_features or distill.cache_features
    if choice in ("cache", "bank") and not storable:
        raise ConfigError(f"distill.teacher_outputs: {choice!r} stores logits only, but a method in distill.methods "
                          "reads teacher features. Set distill.cache_features: true to store them too, or use "
                          "teacher_outputs: online (or auto).")
    if choice != "auto":
        return choice
    if not storable:
        return "online"
    if augment == "none":
        return "cache"
    return "bank" if distill.bank_views else "online"


#: source name -> ``(cfg, splits, specs, weights, taps, pools) -> TeacherOutputPlan``
SOURCES: Registry[TeacherOutputPlan] = Registry("teacher output source")


@SOURCES.register("online")
def online(cfg: ExperimentConfig, splits: DataSplits, specs: list[TeacherSpec], weights: list[str],
           taps: Sequence[Sequence[str]], pools: list[TeacherPool]) -> TeacherOutputPlan:
    return TeacherOutputPlan("online", pools=pools)


def stored(source: str, views: ViewBank, cfg: ExperimentConfig, splits: DataSplits, specs: list[TeacherSpec],
           weights: list[str], taps: Sequence[Sequence[str]], pools: list[TeacherPool]) -> TeacherOutputPlan:
    """Fill the missing entries of every view with the actors, then release them."""
    uses = ensure_cached(pools, specs, weights, splits.train.x, root=str(cfg.cache_root()),
                         fingerprint=splits.fingerprint, views=views, dtype=cfg.distill.cache_dtype,
                         top_k=cfg.distill.cache_top_k, taps=taps)
    release(pools)
    return TeacherOutputPlan(source, cache=[[u.path for u in per_view] for per_view in uses], uses=uses,
                             view_bank=None if views is PLAIN else views)


@SOURCES.register("cache")
def cache(cfg: ExperimentConfig, splits: DataSplits, specs: list[TeacherSpec], weights: list[str],
          taps: Sequence[Sequence[str]], pools: list[TeacherPool]) -> TeacherOutputPlan:
    return stored("cache", PLAIN, cfg, splits, specs, weights, taps, pools)


@SOURCES.register("bank")
def bank(cfg: ExperimentConfig, splits: DataSplits, specs: list[TeacherSpec], weights: list[str],
         taps: Sequence[Sequence[str]], pools: list[TeacherPool]) -> TeacherOutputPlan:
    views = ViewBank(cfg.data.augment, cfg.seed, cfg.distill.bank_views)
    return stored("bank", views, cfg, splits, specs, weights, taps, pools)


def prepare_teacher_outputs(cfg: ExperimentConfig, splits: DataSplits, specs: list[TeacherSpec], weights: list[str],
                            taps: Sequence[Sequence[str]]) -> TeacherOutputPlan:
    """Start the teacher actors and prepare the stage's source (stored sources release the actors when filled)."""
    source = choose_source(cfg.distill, cfg.data.augment, any(taps))
    pools = start_teacher_actors(specs, weights, cfg.ray.teacher_cpus, cfg.ray.teacher_gpus, cfg.ray.teacher_replicas)
    try:
        return SOURCES.get(source, "distill.teacher_outputs")(cfg, splits, specs, weights, taps, pools)
    except BaseException:
        release(pools)
        raise
