"""Proposals: starting configurations for a new distillation task, from what similar past tasks learned.

HPM-KD's Adaptive Configuration Manager (Haase & Dourado da Silva, arXiv 2512.09886; authors' draft
``guhaase/papers-deepbridge`` ``01_HPM-KD_Framework/POR/sections/04-methodology.tex``) keeps a history
``H = {(m_j, c_j, perf_j)}`` of meta-features, configurations and outcomes; with ``|H| > 50`` a gradient-boosted
regressor predicts the configuration, otherwise the top-5 most similar past tasks' configurations are averaged.
:func:`propose` follows it, learning only from records of the same method set as the new task (a FitNet stage's
``kd_share`` and ``T`` say nothing about a KD recipe's):

* **no usable history** (no record with the same methods has every searched hyperparameter): the published defaults
  (:mod:`hpmkd.search_space`), source ``defaults``;
* **small history** (fewer than ``regressor_min_records`` records or ``regressor_min_tasks`` tasks), source
  ``memory:knn``: records are grouped by task; each task's meta-features are z-scored together with the new task's
  (per feature, over the tasks), and the distance is the root-mean-square difference plus 1 for a different student
  family (our choice: a categorical mismatch counts like one standard deviation). From the ``neighbours`` nearest
  tasks come: the inverse-distance weighted mean of their best configurations when there are several (on the
  unit scale of each dimension, log for log dimensions: HPM-KD averages uniformly; weighting is ours), then each
  task's best, second best, ... configurations, nearest task first;
* **large history**, source ``memory:regressor``: a gradient-boosted regressor (scikit-learn) learns validation
  retention from [z-scored meta-features, same student family, the configuration on the unit scale, log epochs, log
  share of the training split], and scores 512 random configurations plus the nearest-neighbour proposals and the
  published defaults for the new task at the trial's fidelity (epochs and share); the best-scored ones, each at
  least 0.1 apart (max-norm on the unit scale; our choice, for diversity), are proposed.

"Best" means highest validation retention (student / best teacher validation accuracy), so tasks with stronger or
weaker teachers compare fairly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hpmkd.meta_features import TaskFeatures
from hpmkd.search_space import SearchSpace

CATEGORY_WEIGHT = 1.0  # distance added by a different student family
WEIGHT_EPS = 0.05      # inverse-distance weights 1 / (d + eps): a task at distance 0 does not take all weight
DISTINCT = 1e-3        # two configurations closer than this (max-norm, unit scale) are the same proposal
DIVERSE = 0.1          # regressor proposals are at least this far apart (max-norm, unit scale)
CANDIDATES = 512


@dataclass(frozen=True)
class MemoryRecord:
    """One finished distillation (a ``distill`` stage or a Tune trial): task, configuration, outcome."""

    task: TaskFeatures
    config: dict[str, float]
    val_acc: float
    retention: float  # val_acc / best teacher val_acc
    epochs: int
    source: str  # "distill" or "trial"
    run_id: str = ""
    train_fraction: float = 1.0  # the share of the training split it trained on (a search trial's fidelity)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "task": self.task.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryRecord":
        return cls(**{**data, "task": TaskFeatures.from_dict(data["task"])})


@dataclass
class Proposal:
    """A starting configuration for the search, where it comes from and why."""

    config: dict[str, float]
    source: str  # "defaults", "memory:knn" or "memory:regressor"
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProposerSettings:
    count: int
    neighbours: int = 5
    regressor_min_records: int = 50
    regressor_min_tasks: int = 3
    budget_epochs: int = 1
    trial_fraction: float = 1.0
    seed: int = 0


@dataclass
class TaskHistory:
    """The records of one past task: mean meta-features and its configurations, best first."""

    task: TaskFeatures
    vector: np.ndarray
    ranked: list[MemoryRecord]


def propose(task: TaskFeatures, records: list[MemoryRecord], space: SearchSpace, settings: ProposerSettings) -> list[Proposal]:
    """Up to ``settings.count`` starting configurations for ``task`` (see module docstring)."""
    if settings.count == 0:
        return []
    usable = [r for r in same_methods(task, records) if all(name in r.config for name in space.names)]
    if not usable:
        return [Proposal(space.defaults(), "defaults", "no similar past runs with the same methods: " + ", ".join(
            f"{d.name}={d.default:g} ({d.hp.source})" for d in space.dims))]
    knn = knn_proposals(task, usable, space, settings)
    if len(usable) >= settings.regressor_min_records and \
            len({r.task.task_id() for r in usable}) >= settings.regressor_min_tasks:
        return regressor_proposals(task, usable, space, settings, knn)
    return knn


def same_methods(task: TaskFeatures, records: list[MemoryRecord]) -> list[MemoryRecord]:
    """The records whose method set is ``task``'s: the only neighbours any proposal learns from."""
    return [r for r in records if set(r.task.methods) == set(task.methods)]


def propose_value(name: str, default: float, task: TaskFeatures, records: list[MemoryRecord],
                  settings: ProposerSettings) -> Proposal:
    """A hyperparameter that is proposed but not searched (``chain_threshold``): the inverse-distance weighted mean of
    its value in the best record (that has it) of each of the nearest tasks with the same methods; ``default``
    without such records."""
    having = [r for r in same_methods(task, records) if name in r.config]
    if not having:
        return Proposal({name: default}, "defaults", f"no past runs with {name}: published default {default:g}")
    tasks = histories(having)
    dist = task_distances(task, tasks)
    order = np.argsort(dist, kind="stable")[: settings.neighbours]
    weights = 1.0 / (dist[order] + WEIGHT_EPS)
    value = float((weights * np.array([tasks[i].ranked[0].config[name] for i in order])).sum() / weights.sum())
    return Proposal({name: value}, "memory:knn", f"inverse-distance mean over the {len(order)} nearest tasks with {name}")


def histories(records: list[MemoryRecord]) -> list[TaskHistory]:
    by_task: dict[str, list[MemoryRecord]] = defaultdict(list)
    for r in records:
        by_task[r.task.task_id()].append(r)
    return [TaskHistory(rs[0].task, np.mean([r.task.numeric() for r in rs], axis=0),
                        sorted(rs, key=lambda r: -r.retention)) for rs in by_task.values()]


def zscores(vectors: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vectors`` and ``query`` standardised per feature over all of them (a constant feature gets std 1)."""
    stacked = np.vstack([vectors, query[None]])
    std = stacked.std(axis=0)
    std[std == 0] = 1.0
    z = (stacked - stacked.mean(axis=0)) / std
    return z[:-1], z[-1]


def task_distances(task: TaskFeatures, tasks: list[TaskHistory]) -> np.ndarray:
    z, zq = zscores(np.stack([t.vector for t in tasks]), task.numeric())
    numeric = np.sqrt(((z - zq) ** 2).mean(axis=1))
    family = np.array([t.task.student_family != task.student_family for t in tasks], dtype=np.float64)
    return numeric + CATEGORY_WEIGHT * family


def knn_proposals(task: TaskFeatures, records: list[MemoryRecord], space: SearchSpace, settings: ProposerSettings) -> list[Proposal]:
    tasks = histories(records)
    dist = task_distances(task, tasks)
    near = [tasks[i] for i in np.argsort(dist, kind="stable")[: settings.neighbours]]
    near_dist = np.sort(dist, kind="stable")[: settings.neighbours]
    candidates = []
    if len(near) > 1:
        weights = 1.0 / (near_dist + WEIGHT_EPS)
        mean = (weights[:, None] * np.stack([space.to_unit(t.ranked[0].config) for t in near])).sum(0) / weights.sum()
        names = ", ".join(f"{t.task.dataset}/{t.task.student_model} (d={d:.2f})" for t, d in zip(near, near_dist))
        candidates.append(Proposal(space.from_unit(mean), "memory:knn", "inverse-distance mean of the best "
                                   f"configurations of the {len(near)} nearest tasks: {names}"))
    for rank in range(max(len(t.ranked) for t in near)):
        for t, d in zip(near, near_dist):
            if rank < len(t.ranked):
                r = t.ranked[rank]
                candidates.append(Proposal(space.clip(r.config), "memory:knn",
                                           f"configuration #{rank + 1} of {t.task.dataset}/{t.task.student_model} "
                                           f"(task {t.task.task_id()}, d={d:.2f}, val retention {r.retention:.3f}, "
                                           f"run {r.run_id})"))
    return distinct(candidates, space, settings.count, DISTINCT)


def distinct(candidates: list[Proposal], space: SearchSpace, count: int, apart: float) -> list[Proposal]:
    """The first ``count`` candidates that are more than ``apart`` (max-norm, unit scale) from every earlier pick."""
    chosen: list[Proposal] = []
    units: list[np.ndarray] = []
    for c in candidates:
        u = space.to_unit(c.config)
        if all(np.abs(u - v).max() > apart for v in units):
            chosen.append(c)
            units.append(u)
        if len(chosen) == count:
            break
    return chosen


def regressor_features(z: np.ndarray, same_family: np.ndarray, configs: np.ndarray, epochs: np.ndarray,
                       fractions: np.ndarray) -> np.ndarray:
    """One row per (task, configuration, fidelity): see the module docstring."""
    return np.hstack([z, same_family[:, None], configs, np.log(np.maximum(epochs, 1))[:, None],
                      np.log(fractions)[:, None]])


def regressor_proposals(task: TaskFeatures, records: list[MemoryRecord], space: SearchSpace, settings: ProposerSettings,
                        knn: list[Proposal]) -> list[Proposal]:
    from sklearn.ensemble import GradientBoostingRegressor

    z, zq = zscores(np.stack([r.task.numeric() for r in records]), task.numeric())
    family = np.array([r.task.student_family == task.student_family for r in records], dtype=np.float64)
    x = regressor_features(z, family, np.stack([space.to_unit(r.config) for r in records]),
                           np.array([r.epochs for r in records], dtype=np.float64),
                           np.array([r.train_fraction for r in records], dtype=np.float64))
    model = GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                      random_state=settings.seed)
    model.fit(x, np.array([r.retention for r in records]))
    rng = np.random.default_rng(settings.seed)
    units = np.vstack([rng.random((CANDIDATES, len(space.dims))), *[space.to_unit(p.config)[None] for p in knn],
                       space.to_unit(space.defaults())[None]])
    n = len(units)
    predicted = model.predict(regressor_features(np.repeat(zq[None], n, 0), np.ones(n), units,
                                                 np.full(n, float(settings.budget_epochs)),
                                                 np.full(n, settings.trial_fraction)))
    tasks = len({r.task.task_id() for r in records})
    ranked = [Proposal(space.from_unit(units[i]), "memory:regressor",
                       f"predicted val retention {predicted[i]:.3f} (gradient-boosted regressor on {len(records)} "
                       f"records of {tasks} tasks)") for i in np.argsort(-predicted, kind="stable")]
    return distinct(ranked, space, settings.count, DIVERSE)
