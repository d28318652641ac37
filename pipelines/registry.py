"""The pipeline registry: ``PIPELINES.get(name)(cfg) -> list[Stage]``."""

from __future__ import annotations

from components.scheduler import Stage
from components.teacher_outputs import choose_source
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


def baseline_stages(cfg: ExperimentConfig) -> list[Stage]:
    """``student_alone`` (the student trained with cross-entropy only) when ``distill.baseline`` asks for it."""
    if not cfg.distill.baseline:
        return []
    return [Stage("student_alone", "train_student", cpus=cfg.ray.num_workers * cfg.ray.cpus_per_worker)]


def distill_cpus(cfg: ExperimentConfig, teachers: int | None = None) -> float:
    """CPUs a distillation stage holds at its peak: its Train workers plus the actors of its ``teachers`` models
    (default: the config's teachers; replicas too) while they serve batches online; when the cache serves the
    logits, the actors fill it and are released before the workers start, so the peak is the larger of the two."""
    workers = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    count = len(cfg.teachers) if teachers is None else teachers
    actors = count * cfg.ray.teacher_replicas * cfg.ray.teacher_cpus
    online = choose_source(cfg.distill, cfg.data.augment, needs_features=False) == "online"
    return workers + actors if online else max(workers, actors)
