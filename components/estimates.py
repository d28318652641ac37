"""How long a stage will take, estimated from the store's past runs of similar stages (the scheduler's input).

Every stage run records what it trained: tag ``work.model``, metrics ``work.epochs`` and ``work.rows`` (its
:class:`~hpmkd.components.graph.Workload` and the training split's size), next to its phases
(``stage_phase.total_s``, ``stage_phase.epochs_s``, :mod:`hpmkd.phases`). A stage to run is estimated from the
finished, computed (not reused) runs in the store, the most similar first: same kind and model, else same kind,
else same model, else any; from those, the median seconds per row-epoch of training times its own rows x epochs,
plus the median fixed cost (the rest of the stage's time). A stage that trains nothing is the median duration of
its kind's runs. With no history at all, a prior of :data:`PRIOR_S_PER_ROW_EPOCH` and :data:`PRIOR_FIXED_S` is used
(only the order matters then: more epochs over more rows first).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from hpmkd.components.graph import Stage
from hpmkd.phases import METRIC_PREFIX

#: seconds per training row per epoch, and fixed seconds per stage, assumed when the store has no similar run
PRIOR_S_PER_ROW_EPOCH = 2e-4
PRIOR_FIXED_S = 20.0
#: seconds assumed for a stage that trains nothing and whose kind has no recorded run
PRIOR_UNTRAINED_S = 1.0
#: past runs read (newest first)
HISTORY_RUNS = 2000

TOTAL = f"{METRIC_PREFIX}total_s"
TRAINING = f"{METRIC_PREFIX}epochs_s"


@dataclass(frozen=True)
class PastStage:
    """One finished, computed stage run: what it trained and how long it took."""

    kind: str
    model: str | None
    work: float  # rows x epochs (0: trained nothing)
    total_s: float
    training_s: float | None  # its epochs' time, when recorded

    @classmethod
    def of(cls, run: Any) -> "PastStage":
        tags, metrics = run.data.tags, run.data.metrics
        return cls(tags.get("stage_kind", ""), tags.get("work.model"),
                   metrics.get("work.rows", 0.0) * metrics.get("work.epochs", 0.0), metrics[TOTAL],
                   metrics.get(TRAINING))


def work_metrics(stage: Stage, rows: int) -> tuple[dict[str, str], dict[str, float]]:
    """The tags and metrics a stage run records so later runs can estimate from it (module docstring)."""
    load = stage.params.workload()
    if load is None:
        return {}, {}
    return {"work.model": load.model}, {"work.epochs": float(load.epochs), "work.rows": float(rows)}


def history(client: Any) -> list[PastStage]:
    """The store's finished, computed stage runs that recorded their work and total time, newest first."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    runs = client.search_runs(ids, f"tags.kind = 'stage' and attributes.status = 'FINISHED' and metrics.`{TOTAL}` >= 0",
                              order_by=["attributes.start_time DESC"], max_results=HISTORY_RUNS)
    return [PastStage.of(r) for r in runs if r.data.tags.get("reused") != "true"]


def estimate(stage: Stage, rows: int, past: list[PastStage]) -> float:
    """Expected seconds of ``stage`` over a training split of ``rows`` rows (module docstring)."""
    load = stage.params.workload()
    if load is None:
        same = [p.total_s for p in past if p.kind == stage.kind]
        return statistics.median(same) if same else PRIOR_UNTRAINED_S
    trained = [p for p in past if p.work > 0]
    levels: list[Callable[[PastStage], bool]] = [
        lambda p: p.kind == stage.kind and p.model == load.model,
        lambda p: p.kind == stage.kind,
        lambda p: p.model == load.model,
        lambda p: True,
    ]
    work = rows * load.epochs
    for similar in levels:
        found = [p for p in trained if similar(p)]
        if found:
            rate = statistics.median((p.training_s if p.training_s is not None else p.total_s) / p.work for p in found)
            fixed = statistics.median(p.total_s - p.training_s if p.training_s is not None else 0.0 for p in found)
            return fixed + rate * work
    return PRIOR_FIXED_S + PRIOR_S_PER_ROW_EPOCH * work


def estimate_all(stages: list[Stage], rows: int, client: Any) -> dict[str, float]:
    """Every stage's estimate, from the store ``client`` reads."""
    past = history(client)
    return {s.name: estimate(s, rows, past) for s in stages}
