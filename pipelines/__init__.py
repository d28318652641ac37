"""Named pipelines: each turns a validated config into a graph of stages (see ``components.scheduler.Stage``)."""

from __future__ import annotations

from components.scheduler import Stage
from hpmkd.ablation import effective_config
from hpmkd.config import ExperimentConfig
from pipelines.config_manager import with_tune_stage
from pipelines.registry import PIPELINES
from pipelines import chain, hpmkd, kd, smskd  # noqa: F401  (register "takd", "hpmkd", "kd", "smskd")

__all__ = ["PIPELINES", "build_stages"]


def build_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The graph of ``cfg.pipeline`` for the effective config (components switched off replaced by their plain
    counterparts, :func:`hpmkd.ablation.effective_config`; idempotent, so a config already made effective is
    unchanged), plus what every pipeline can add (the configuration manager's ``tune`` stage)."""
    cfg = effective_config(cfg)
    return with_tune_stage(cfg, PIPELINES.get(cfg.pipeline, "pipeline")(cfg))
