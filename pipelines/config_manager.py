"""The configuration manager in any pipeline: with ``config_manager.enabled``, a ``tune`` stage is added.

::

    teachers ─┬─> tune ─┐            (tune: Ray Tune trials seeded with the manager's proposals)
              └─────────┴─> distill  (every distill stage runs with the tuned configuration)

The ``tune`` stage depends on the teacher stages that the pipeline's first ``distill`` stage depends on, and every
``distill`` stage depends on ``tune``, so chains and multi-stage pipelines all use the one tuned configuration.
"""

from __future__ import annotations

import math
from dataclasses import replace

from components.scheduler import Stage
from components.stages import TEACHER_KINDS
from hpmkd.config import ExperimentConfig
from hpmkd.config_schema import to_dict
from hpmkd.registry import ConfigError

def tune_cpus(cfg: ExperimentConfig) -> float:
    """CPUs the tune stage holds: its concurrent trials; without ``max_concurrent`` the whole cluster (the stage runs
    when nothing else does, and Tune fills every CPU with trials)."""
    cm = cfg.config_manager
    return cm.max_concurrent * cm.cpus_per_trial if cm.max_concurrent else math.inf


def with_tune_stage(cfg: ExperimentConfig, stages: list[Stage]) -> list[Stage]:
    """``stages`` with the ``tune`` stage inserted before the first ``distill`` stage (see module docstring)."""
    if not cfg.config_manager.enabled:
        return stages
    distills = [s for s in stages if s.kind == "distill"]
    if not distills:
        raise ConfigError(f"config_manager.enabled: pipeline {cfg.pipeline!r} has no distill stage to configure; "
                          f"set config_manager.enabled: false.")
    kinds = {s.name: s.kind for s in stages}
    teachers = [d for d in distills[0].deps if kinds[d] in TEACHER_KINDS]
    tune = Stage("tune", "tune", deps=teachers, params={"config_manager": to_dict(cfg.config_manager)},
                 cpus=tune_cpus(cfg))
    out = []
    for stage in stages:
        if stage is distills[0]:
            out.append(tune)
        out.append(replace(stage, deps=[*stage.deps, "tune"]) if stage.kind == "distill" else stage)
    return out
