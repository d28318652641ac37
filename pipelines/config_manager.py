"""The configuration manager in any pipeline: with ``config_manager.enabled``, a ``tune`` stage is added.

::

    teachers ─┬─> tune ─┐            (tune: Ray Tune trials seeded with the manager's proposals)
              └─────────┴─> distill  (every distill stage runs with the tuned configuration)

The ``tune`` stage searches the ``distill`` recipe for the config's student, distilled from the teacher stages that
the pipeline's first distillation stage reads; every distillation stage depends on ``tune`` and runs with its
configuration (:meth:`~hpmkd.components.graph.StageParams.tuned`), so chains and multi-stage pipelines all use the
one tuned configuration.
"""

from __future__ import annotations

import math
from dataclasses import replace

from hpmkd.components.graph import Stage
from hpmkd.components.stage_params import TEACHER_KINDS, Distill, Tune
from hpmkd.config import ExperimentConfig
from hpmkd.registry import ConfigError
from hpmkd.search_space import ConfigManagerConfig  # noqa: F401  (registers the config_manager section)

TUNE = "tune"


def tune_cpus(cfg: ExperimentConfig) -> float:
    """CPUs the tune stage holds: its concurrent trials; without ``max_concurrent`` the whole cluster (the stage runs
    when nothing else does, and Tune fills every CPU with trials)."""
    cm = cfg.config_manager
    return cm.max_concurrent * cm.cpus_per_trial if cm.max_concurrent else math.inf


def with_tune_stage(cfg: ExperimentConfig, stages: list[Stage]) -> list[Stage]:
    """``stages`` with the ``tune`` stage inserted before the first distillation stage (see module docstring)."""
    if not cfg.config_manager.enabled:
        return stages
    distills = [s for s in stages if isinstance(s.params, Distill)]
    if not distills:
        raise ConfigError(f"config_manager.enabled: pipeline {cfg.pipeline!r} has no distill stage to configure; "
                          f"set config_manager.enabled: false.")
    first = distills[0]
    teacher_stages = {s.name for s in stages if s.kind in TEACHER_KINDS}
    teachers = [d for d in first.deps if d in teacher_stages]
    tune = Stage(TUNE, Tune(cfg.student.ref, cfg.recipe(), tuple(teachers), cfg.config_manager), deps=teachers,
                 cpus=tune_cpus(cfg))
    out = []
    for stage in stages:
        if stage is first:
            out.append(tune)
        out.append(replace(stage, deps=[*stage.deps, TUNE]) if isinstance(stage.params, Distill) else stage)
    return out
