"""``takd``: the teachers' knowledge passed down a chain of teacher assistants to the student (TAKD, METHODS §5.6;
HPM-KD's progressive chain, §3.2), and :func:`chain_stages`, the one chain builder every chain pipeline uses
(``takd``, and ``hpmkd`` whose links also keep the teachers, :mod:`pipelines.hpmkd`).

Graph::

    teacher_<a> ─┐
    teacher_<b> ─┼─> assistant_1 ─> assistant_2 ─> … ─> distill   (the student)
    ...         ─┘
    chain_plan                                                      (records the plan)
    student_alone                                                   (with distill.baseline)

The assistants are given by hand (``chain.assistants``) or planned (:func:`hpmkd.chain.plan_chain`, ``chain.max_gap``
and friends). Every step distils with the ``distill`` recipe: the first assistant from all the teachers, each
later step from the one before. ``chain.epsilon`` turns on HPM-KD's stop rule at run time (see
:func:`components.stages.distill`): assistants after a link whose relative validation gain fell below ε are
skipped, and the student distils from the last assistant trained.
"""

from __future__ import annotations

import logging

from components import chain_plan  # noqa: F401  (registers the "chain_plan" stage kind)
from components.scheduler import Stage
from hpmkd.chain import FIRST_TESTED_LINK, ChainPlan, count_model_params, describe_chain, plan_chain
from hpmkd.config import ExperimentConfig, ModelConfig
from hpmkd.data.loading import data_shape
from pipelines.registry import PIPELINES, baseline_stages, distill_cpus, teacher_stages

log = logging.getLogger("hpmkd")


def plan_for(cfg: ExperimentConfig) -> ChainPlan:
    """The chain from the teacher ``chain.plan_from`` (default: the largest) to the student, given by hand or
    planned; sized for the data set's classes and input shape."""
    num_classes, input_shape = data_shape(cfg.data.name, cfg.data.root, cfg.data.download)
    candidates = [ModelConfig(t.model, t.options) for t in cfg.teachers if cfg.chain.plan_from in (None, t.name)]
    teacher = max(candidates, key=lambda m: count_model_params(m, num_classes, input_shape))
    student = ModelConfig(cfg.student.model, cfg.student.options)
    if cfg.chain.assistants is not None:
        return describe_chain(teacher, cfg.chain.assistants, student, num_classes=num_classes,
                              input_shape=input_shape, max_gap=cfg.chain.max_gap)
    return plan_chain(teacher, student, num_classes=num_classes, input_shape=input_shape, max_gap=cfg.chain.max_gap,
                      scale=cfg.chain.scale, max_steps=cfg.chain.max_steps)


def chain_stages(cfg: ExperimentConfig, teachers: list[Stage], keep_teachers: bool = False) -> list[Stage]:
    """``chain_plan``, the assistants ``assistant_<i>`` and the student ``distill`` (module docstring). Each link
    distils from the previous link (the first from ``teachers``); with ``keep_teachers`` every later link distils
    from ``teachers`` and the previous link together (HPM-KD, :mod:`pipelines.hpmkd`). Without assistants the
    student's stage is exactly ``kd``'s ``distill`` (same settings, so the same content key)."""
    plan = plan_for(cfg)
    log.info("chain plan (%d steps):\n%s\n%s", plan.steps, plan.table(), plan.why)
    stages = [Stage("chain_plan", "chain_plan", params={"plan": plan.as_dict()}, cpus=0.0)]
    first = [t.name for t in teachers]
    previous = first
    for i, assistant in enumerate(plan.assistants, start=1):
        chain = {"index": i, "steps": plan.steps}
        if i > FIRST_TESTED_LINK and cfg.chain.epsilon is not None:  # only these can be skipped by the ε rule
            chain["epsilon"] = cfg.chain.epsilon
        params = {"model": assistant.model.model, "options": assistant.model.options, "teachers": previous,
                  "chain": chain}
        stages.append(Stage(f"assistant_{i}", "distill", deps=previous, params=params,
                            cpus=distill_cpus(cfg, len(previous))))
        previous = [*first, f"assistant_{i}"] if keep_teachers else [f"assistant_{i}"]
    student = {"teachers": previous} if plan.assistants else {}
    stages.append(Stage("distill", "distill", deps=previous, params=student, cpus=distill_cpus(cfg, len(previous))))
    return stages


@PIPELINES.register("takd")
def takd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    teachers = teacher_stages(cfg)
    return [*teachers, *baseline_stages(cfg), *chain_stages(cfg, teachers)]
