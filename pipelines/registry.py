"""The pipeline registry, ``PIPELINES.get(name)(cfg) -> list[Stage]``, and the stages every pipeline shares.

A pipeline is one module: a function registered here that turns a validated config into a graph of
:class:`~hpmkd.components.graph.Stage` s with typed params (:mod:`hpmkd.components.stage_params`), plus the config
section it owns (registered in :data:`hpmkd.config.SECTIONS`). Building a graph imports neither Ray nor MLflow.
"""

from __future__ import annotations

import operator

from hpmkd.components.graph import Stage
from hpmkd.components.stage_params import Distill, LoadTeacher, TrainModel
from hpmkd.config import ExperimentConfig, Recipe
from hpmkd.registry import Registry
from hpmkd.teachers import choose_source, provider_for

PIPELINES: Registry[list[Stage]] = Registry("pipeline")

#: the name of the baseline stage (the student trained alone)
STUDENT_ALONE = "student_alone"


def worker_cpus(cfg: ExperimentConfig) -> float:
    """CPUs of one training stage's Ray Train workers."""
    return cfg.ray.num_workers * cfg.ray.cpus_per_worker


def worker_gpus(cfg: ExperimentConfig) -> float:
    """GPUs of one training stage's Ray Train workers (one each with ``ray.use_gpu``)."""
    return float(cfg.ray.num_workers) if cfg.ray.use_gpu else 0.0


#: teacher provider kind (:data:`hpmkd.teachers.PROVIDERS`) -> ``(cfg, index) -> Stage``: the stage that makes
#: teacher ``index`` (``sklearn``: :mod:`hpmkd.pipelines.tabular`)
TEACHER_STAGES: Registry[Stage] = Registry("teacher stage")


@TEACHER_STAGES.register("torch")
def torch_teacher_stage(cfg: ExperimentConfig, index: int) -> Stage:
    """A PyTorch teacher: trained (``train_teacher``) or loaded from its checkpoint (``load_teacher``)."""
    t = cfg.teachers[index]
    if t.checkpoint:
        params, cpus, gpus = LoadTeacher(t.name, t.ref, t.checkpoint), 0.0, 0.0
    else:
        params = TrainModel(t.ref, cfg.teacher_train(index), teacher=t.name)
        cpus, gpus = worker_cpus(cfg), worker_gpus(cfg)
    return Stage(f"teacher_{t.name}", params, cpus=cpus, gpus=gpus)


def teacher_stages(cfg: ExperimentConfig) -> list[Stage]:
    """One stage per teacher, made by its provider's kind of stage (:data:`TEACHER_STAGES`)."""
    return [TEACHER_STAGES.get(provider_for(t.ref).kind, f"teachers.{i}.model")(cfg, i)
            for i, t in enumerate(cfg.teachers)]


def baseline_stages(cfg: ExperimentConfig) -> list[Stage]:
    """``student_alone`` (the student trained with cross-entropy only) when ``distill.baseline`` asks for it."""
    if not cfg.distill.baseline:
        return []
    return [Stage(STUDENT_ALONE, TrainModel(cfg.student.ref, cfg.student_train()), cpus=worker_cpus(cfg),
                  gpus=worker_gpus(cfg))]


def distill_resources(cfg: ExperimentConfig, recipe: Recipe, teachers: int) -> tuple[float, float]:
    """CPUs and GPUs a distillation stage holds at its peak: its Train workers plus the actors of its ``teachers``
    models (replicas too) while they serve batches online; when the cache serves the logits, the actors fill it and
    are released before the workers start, so the peak is the larger of the two."""
    actors = teachers * cfg.ray.teacher_replicas
    online = choose_source(recipe.distill, cfg.data.augment, needs_features=False) == "online"
    peak = operator.add if online else max
    return (peak(worker_cpus(cfg), actors * cfg.ray.teacher_cpus),
            peak(worker_gpus(cfg), actors * cfg.ray.teacher_gpus))


def distill_stage(cfg: ExperimentConfig, name: str, teachers: list[str], params_type: type[Distill] = Distill,
                  after: tuple[str, ...] = (), **fields) -> Stage:
    """A distillation stage of the config's student with the ``distill`` recipe from ``teachers`` (input stage
    names), run after the stages it reads and ``after``; ``fields`` replace params (``student``, ``recipe``,
    ``init_from`` ...) or add a subclass's."""
    params = params_type(**{"student": cfg.student.ref, "recipe": cfg.recipe(), "teachers": tuple(teachers), **fields})
    deps = list(dict.fromkeys([*teachers, *(d for d in (params.init_from, params.reference) if d), *after]))
    cpus, gpus = distill_resources(cfg, params.recipe, len(teachers))
    return Stage(name, params, deps=deps, cpus=cpus, gpus=gpus)
