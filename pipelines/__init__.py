"""Named pipelines: each turns a validated config into a graph of stages (:class:`hpmkd.components.graph.Stage`).

Importing this package registers every pipeline and the config sections they own; it imports neither Ray nor
MLflow (``hpmkd validate`` plans an experiment with it). The runner is :mod:`hpmkd.pipelines.runner`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpmkd.components.graph import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.pipelines import (chain, hpmkd, humpkd, kd, mtbkd, smskd, tabular,  # noqa: F401  (the pipelines;
                             teachers)  # tabular: the estimator teachers' section and stage)
from hpmkd.pipelines.config_manager import with_tune_stage
from hpmkd.pipelines.registry import PIPELINES
from hpmkd.pipelines.switches import effective_config

__all__ = ["PIPELINES", "ExperimentPlan", "plan_experiment"]


@dataclass(frozen=True)
class ExperimentPlan:
    """What runs: the effective config (components switched off replaced by their plain counterparts,
    :func:`~hpmkd.pipelines.switches.effective_config`) and its stage graph."""

    cfg: ExperimentConfig
    stages: list[Stage]


def plan_experiment(cfg: ExperimentConfig) -> ExperimentPlan:
    """The graph of ``cfg.pipeline`` for the effective config, plus what every pipeline can add (the configuration
    manager's ``tune`` stage)."""
    cfg = effective_config(cfg)
    return ExperimentPlan(cfg, with_tune_stage(cfg, PIPELINES.get(cfg.pipeline, "pipeline")(cfg)))
