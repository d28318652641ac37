"""The pipeline registry: ``PIPELINES.get(name)(cfg) -> list[Stage]``."""

from __future__ import annotations

from components.scheduler import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.registry import Registry

PIPELINES: Registry[list[Stage]] = Registry("pipeline")


def teacher_stages(cfg: ExperimentConfig) -> list[Stage]:
    """One stage per teacher: trained (``train_teacher``) or loaded from its checkpoint (``load_teacher``)."""
    worker_cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    return [
        Stage(
            name=f"teacher_{t.name}",
            kind="load_teacher" if t.checkpoint else "train_teacher",
            params={"teacher": i},
            cpus=0.0 if t.checkpoint else worker_cpus,
        )
        for i, t in enumerate(cfg.teachers)
    ]


def distill_cpus(cfg: ExperimentConfig) -> float:
    """CPUs a distillation stage holds: its Train workers plus one actor per teacher."""
    return cfg.ray.num_workers * cfg.ray.cpus_per_worker + len(cfg.teachers) * cfg.ray.teacher_cpus
