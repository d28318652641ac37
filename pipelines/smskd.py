"""``smskd``: sequential multi-stage KD (SMSKD, METHODS §1): K distillation stages of one student, each with its own
method(s), each starting from the previous stage's student and anchored to a frozen copy of it.

Graph::

    teacher_<a> ─┬─> smskd_1 ─> smskd_2 ─> … ─> smskd_K     (each smskd_k also reads every teacher)
    teacher_<b> ─┘
    student_alone                                           (with distill.baseline)

Stage ``k``'s recipe is the ``distill`` section with the keys of ``smskd.stages[k-1]`` replaced
(:meth:`hpmkd.config.SmskdConfig.recipes`). Stages after the first start from ``smskd_{k-1}``'s selected weights
(``smskd.init: previous``) and add the ``reference`` loss towards a frozen copy of them (``smskd.reference``: weight
λ_ref, TCP weighting ``mode``, ``tau_ref``, ``normalize``). Every stage is a ``distill`` stage run, so each records
its validation accuracy (``selected_val_acc``, and ``val_acc`` per epoch); ``smskd_K`` is the final student.
"""

from __future__ import annotations

from components.scheduler import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.registry import ConfigError
from pipelines.registry import PIPELINES, baseline_stages, distill_cpus, teacher_stages


@PIPELINES.register("smskd")
def smskd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    if not cfg.smskd.stages:
        raise ConfigError("smskd.stages: the smskd pipeline needs its stages, one mapping each with that stage's "
                          "methods, e.g. stages: [{methods: {fitnet: {weight: 100}}, ce_weight: 1.0}, "
                          "{methods: {kd: {weight: 0.9}}}].")
    teacher_graph = teacher_stages(cfg)
    teachers = [t.name for t in teacher_graph]
    stages = [*teacher_graph, *baseline_stages(cfg)]
    previous = None
    recipes = cfg.recipes()
    for k, path in enumerate(cfg.smskd.paths(), start=1):
        params = {"recipe": path}
        if previous is not None:
            params["teachers"] = teachers
            if cfg.smskd.init == "previous":
                params["init_from"] = previous
            if "reference" in recipes[path].methods:
                params["reference"] = previous
        deps = teachers if previous is None else [*teachers, previous]
        stages.append(Stage(f"smskd_{k}", "distill", deps=deps, params=params, cpus=distill_cpus(cfg)))
        previous = stages[-1].name
    return stages
