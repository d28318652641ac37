"""Named pipelines: each turns a validated config into a graph of stages (see ``components.scheduler.Stage``)."""

from __future__ import annotations

from components.scheduler import Stage
from hpmkd.config import ExperimentConfig
from pipelines.config_manager import with_tune_stage
from pipelines.registry import PIPELINES
from pipelines import chain, kd, smskd  # noqa: F401  (register "takd", "kd", "smskd")

__all__ = ["PIPELINES", "build_stages"]


def build_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The graph of ``cfg.pipeline``, plus what every pipeline can add (the configuration manager's ``tune`` stage)."""
    return with_tune_stage(cfg, PIPELINES.get(cfg.pipeline, "pipeline")(cfg))
