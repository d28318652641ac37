"""``takd``: the teachers' knowledge passed down a chain of teacher assistants to the student (TAKD, Mirzadeh et al.,
AAAI 2020, arXiv 1902.03393; HPM-KD's progressive chain, arXiv 2512.09886), the ``chain`` config section, and
:func:`chain_stages`, the one chain builder every chain pipeline uses (``takd``, and ``hpmkd`` whose links also keep
the teachers, :mod:`hpmkd.pipelines.hpmkd`).

Graph::

    teacher_<a> ─┐
    teacher_<b> ─┼─> assistant_1 ─> assistant_2 ─> … ─> distill   (the student)
    ...         ─┘
    chain_plan                                                      (records the plan)
    student_alone                                                   (with distill.baseline)

The assistants are given by hand (``chain.assistants``) or planned (:func:`hpmkd.chain.plan_chain`, ``chain.max_gap``
and friends). Every step distils with the ``distill`` recipe: the first assistant from all the teachers, each
later step from the one before. Each assistant is a ``chain_link`` stage. ``chain.min_link_gain`` makes
``chain_plan`` wait for the teacher it compresses and ``student_alone`` and decide from their measured accuracies
how many assistants pay for themselves (:func:`hpmkd.chain.decide_links`); the links beyond are skipped, and the
links after them and the student leave skipped links out of their teachers (:mod:`hpmkd.components.stages.distill`).
``chain.epsilon`` turns on HPM-KD's stop rule at run time: assistants after a link whose relative validation gain
fell below ε are skipped, and the student distils from the last assistant trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from hpmkd.chain import FIRST_TESTED_LINK, ChainPlan, describe_chain, plan_chain
from hpmkd.components.graph import Stage
from hpmkd.components.stage_params import ChainLink, ChainPlanRecord
from hpmkd.config import SECTIONS, ExperimentConfig, check_model, positive
from hpmkd.config_schema import join
from hpmkd.data.loading import data_shape
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.pipelines.registry import STUDENT_ALONE, PIPELINES, baseline_stages, distill_stage, teacher_stages
from hpmkd.registry import ConfigError, did_you_mean
from hpmkd.teachers import teacher_size

log = logging.getLogger("hpmkd")

CHAIN_PLAN = "chain_plan"


@SECTIONS.register("chain")
@dataclass
class ChainConfig:
    """A progressive distillation chain ``f_T = f_0 → f_1 → … → f_L = f_S`` (pipelines ``takd`` and ``hpmkd``; see
    :mod:`hpmkd.chain` and docs/methods.md).

    ``assistants``: the intermediate models ``f_1 … f_{L−1}`` by hand, largest first (TAKD's teacher assistants);
    ``null`` plans them (:func:`hpmkd.chain.plan_chain`): sizes near ``|θ_T|·r^{i/L}`` in the student's family,
    ``L`` the fewest steps (at most ``max_steps``) whose every size ratio ``|θ_{i−1}|/|θ_i|`` is at most
    ``max_gap``, scaling ``width``, ``depth`` or ``both``. ``plan_from``: the teacher whose size is ``|θ_T|``
    (default: the largest). ``min_link_gain``: the measured first-link rule (:func:`hpmkd.chain.decide_links`),
    ``null`` = off: once the teacher ``plan_from`` and the student alone (``distill.baseline``) are measured, only as
    many assistants are trained as their relative validation gap gives each step at least ``min_link_gain``; the
    rest are skipped (none trained: the student distils from the teachers directly). ``epsilon``: HPM-KD's stop rule
    (arXiv 2512.09886, progressive chain), ``null`` = off: after assistant ``i >= 2`` whose relative validation gain
    ``(Acc_i − Acc_{i−1})/Acc_{i−1}`` is below ε, the remaining assistants are skipped and the student distils from
    assistant ``i``.
    """

    assistants: list[ModelRef] | None = None
    max_gap: float = 4.0
    max_steps: int = 6
    scale: Literal["width", "depth", "both"] = "both"
    plan_from: str | None = None
    min_link_gain: float | None = None
    epsilon: float | None = None

    def check(self, path: str) -> None:
        if not self.max_gap > 1:
            raise ConfigError(f"{join(path, 'max_gap')}: must be > 1 (the largest size ratio allowed between "
                              f"consecutive models of the chain), got {self.max_gap}.")
        positive(path, max_steps=self.max_steps, min_link_gain=self.min_link_gain)

    def check_with(self, cfg: ExperimentConfig) -> None:
        names = cfg.teacher_names()
        if self.plan_from is not None and self.plan_from not in names:
            raise ConfigError(f"chain.plan_from: no teacher named {self.plan_from!r}.{did_you_mean(self.plan_from, names)} "
                              f"Teachers: {', '.join(names)}.")
        for i, assistant in enumerate(self.assistants or []):
            check_model(assistant, f"chain.assistants.{i}")


def plan_teacher(cfg: ExperimentConfig, shape: DataShape) -> str | None:
    """The name of the teacher the chain compresses: ``chain.plan_from``, or the largest of known size; ``None``
    when no candidate's size is known before it is fitted (estimators)."""
    candidates = [t for t in cfg.teachers if cfg.chain.plan_from in (None, t.name)]
    sized = [(size, t.name) for t in candidates if (size := teacher_size(t.ref, shape)) is not None]
    return max(sized, key=lambda s: s[0])[1] if sized else None


def plan_for(cfg: ExperimentConfig) -> ChainPlan:
    """The chain from the teacher ``chain.plan_from`` (default: the largest) to the student, given by hand or
    planned; sized for the data set's classes and input shape."""
    num_classes, input_shape = data_shape(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.options)
    shape = DataShape(num_classes, input_shape)
    name = plan_teacher(cfg, shape)
    candidates = [t for t in cfg.teachers if cfg.chain.plan_from in (None, t.name)]
    teacher = next((t.ref for t in candidates if t.name == name), candidates[0].ref)
    if cfg.chain.assistants is not None:
        return describe_chain(teacher, cfg.chain.assistants, cfg.student.ref, shape=shape, max_gap=cfg.chain.max_gap)
    if name is None:
        raise ConfigError(f"chain.assistants: the chain is planned from a teacher's parameter count, and the size of "
                          f"{', '.join(t.name for t in candidates)} (an estimator) is known only once fitted. Give the "
                          f"assistants by hand, e.g. chain.assistants: [{{model: mlp, options: {{hidden: 256, depth: "
                          f"2}}}}], or [] to distil directly, or plan from a PyTorch teacher with chain.plan_from.")
    return plan_chain(teacher, cfg.student.ref, shape=shape, max_gap=cfg.chain.max_gap, scale=cfg.chain.scale,
                      max_steps=cfg.chain.max_steps)


def chain_stages(cfg: ExperimentConfig, teachers: list[Stage], keep_teachers: bool = False) -> list[Stage]:
    """``chain_plan``, the assistants ``assistant_<i>`` and the student ``distill`` (module docstring). Each link
    distils from the previous link (the first from ``teachers``); with ``keep_teachers`` every later link distils
    from ``teachers`` and the previous link together (HPM-KD, :mod:`hpmkd.pipelines.hpmkd`). Without assistants the
    student's stage is exactly ``kd``'s ``distill`` (same settings, so the same content key)."""
    plan = plan_for(cfg)
    log.info("chain plan (%d steps):\n%s\n%s", plan.steps, plan.table(), plan.why)
    record, plan_deps = plan_record(cfg, plan, teachers)
    stages = [Stage(CHAIN_PLAN, record, deps=plan_deps, cpus=0.0)]
    first = [t.name for t in teachers]
    previous = first
    after = (CHAIN_PLAN,) if record.measured else ()
    for i, assistant in enumerate(plan.assistants, start=1):
        # only links after the first tested one can be skipped by the ε rule
        epsilon = cfg.chain.epsilon if i > FIRST_TESTED_LINK else None
        stages.append(distill_stage(cfg, f"assistant_{i}", previous, ChainLink, after=after, student=assistant.model,
                                    index=i, steps=plan.steps, epsilon=epsilon))
        previous = [*first, f"assistant_{i}"] if keep_teachers else [f"assistant_{i}"]
    stages.append(distill_stage(cfg, "distill", previous))
    return stages


def plan_record(cfg: ExperimentConfig, plan: ChainPlan, teachers: list[Stage]) -> tuple[ChainPlanRecord, list[str]]:
    """The ``chain_plan`` stage's params and inputs: with ``chain.min_link_gain`` and assistants to decide on, it
    reads the measured teacher (``plan_from``) and the student alone (:func:`hpmkd.chain.decide_links`)."""
    gain = cfg.chain.min_link_gain
    if gain is None or not plan.assistants:
        return ChainPlanRecord(plan.as_dict()), []
    if not cfg.distill.baseline:
        raise ConfigError("chain.min_link_gain: the planner measures the gap between the teacher and the student "
                          "trained alone, but distill.baseline is false. Set distill.baseline: true, or "
                          "chain.min_link_gain: null to train the planned assistants unconditionally.")
    shape = DataShape(*data_shape(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.options))
    teacher = f"teacher_{plan_teacher(cfg, shape)}"
    if teacher not in {t.name for t in teachers}:
        raise ConfigError(f"chain.plan_from: the chain compresses {teacher!r}, which this pipeline's chain does not "
                          f"read; name one of {', '.join(t.name for t in teachers)}.")
    log.info("chain plan: with min_link_gain %g, the %d assistant(s) are trained only where the gap measured between "
             "%s and %s pays for them (decided once both have run, hpmkd.chain.decide_links)", gain,
             len(plan.assistants), teacher, STUDENT_ALONE)
    return ChainPlanRecord(plan.as_dict(), teacher, STUDENT_ALONE, gain), [teacher, STUDENT_ALONE]


@PIPELINES.register("takd")
def takd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    teachers = teacher_stages(cfg)
    return [*teachers, *baseline_stages(cfg), *chain_stages(cfg, teachers)]
