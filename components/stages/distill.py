"""Stage kinds that distil: ``distill`` (:class:`~hpmkd.components.stage_params.Distill`) and ``chain_link``
(:class:`~hpmkd.components.stage_params.ChainLink`, one assistant of a progressive chain).

A distillation reads the models of its ``teachers`` inputs (trained or loaded teachers, or any earlier distillation,
e.g. a chain's assistant), served by Ray actors or from the logit cache (``distill.teacher_outputs``,
:mod:`hpmkd.components.teacher_outputs`: with ``cache`` or ``bank`` the actors first fill the missing cache entries
and are released; workers then read the entries). ``init_from`` / ``reference`` name inputs whose weights the
student starts from / whose frozen model feeds the ``reference`` loss (SMSKD). The run records which weights were
used (sha256 of each file; tags ``teacher_weights``, ``init_weights``, ``reference_weights``; and
``reference_state_sha256``, the digest of the reference's state as training left it), the source of the teacher
outputs (tag ``teacher_outputs``) and the cache entries used (params ``cache.<teacher>``, metrics ``cache_hits`` /
``cache_entries``). Each finished distillation is written to the optimisation memory (:mod:`hpmkd.components.memory`).

A chain link records its relative validation gain (metric ``chain_gain``, :func:`hpmkd.chain.relative_gain`) over
the link it follows (:func:`previous_link`; for the first link, the best teacher). When the measured chain plan
keeps fewer assistants than its index (:class:`hpmkd.chain.ChainDecision`, ``chain.min_link_gain``), or its
predecessor stopped the chain (:meth:`hpmkd.chain.ChainLinkInfo.stops_chain`, HPM-KD's ε rule), it trains nothing:
tagged ``chain_status: skipped``, it hands its predecessor's model on (the weights are copied into its run). A
distillation whose teachers include skipped links and other models leaves the skipped links out
(:func:`serving_teachers`: an ``hpmkd`` link or student keeps the pipeline's teachers, so a skipped assistant is not
counted twice in its ensemble); one whose only teacher is a skipped link (``takd``) learns from the model it passed on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, Iterator

from hpmkd import checkpoint
from hpmkd.chain import ChainDecision, ChainLinkInfo, relative_gain
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageResult
from hpmkd.components.memory import remember_stage
from hpmkd.components.stage_params import ChainLink, Distill
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun, overrides_from
from hpmkd.components.stages.train import spec_for, train_and_record
from hpmkd.components.teacher_outputs import OutputsRequest, TeacherOutputPlan, prepare_teacher_outputs
from hpmkd.config import ExperimentConfig
from hpmkd.teachers import TeacherSpec
from hpmkd.training import StageSpec, teacher_taps_needed

log = logging.getLogger("hpmkd")


def stage_view(ctx: ExperimentContext, params: Distill, inputs: dict[str, StageResult]) -> ExperimentConfig:
    """The experiment's config as this distillation ran it (for the optimisation memory): the tune stage's
    configuration applied, its student as ``student`` and its recipe as ``distill`` / ``train``."""
    cfg = ctx.cfg.with_overrides({k: v for k, v in overrides_from(inputs).items() if not k.startswith("distill.")})
    student = replace(cfg.student, model=params.student.model, options=params.student.options)
    return replace(cfg, student=student, distill=replace(params.recipe.distill, train={}), train=params.recipe.train)


@contextlib.contextmanager
def distill_setup(stage: Stage, ctx: ExperimentContext, params: Distill, inputs: dict[str, StageResult],
                  run: StageRun) -> Iterator[tuple[StageSpec, TeacherOutputPlan]]:
    """The distillation spec of ``params`` and its teacher-output plan (actors started, cache filled, source recorded
    on the run); the actors are released when the block ends."""
    teachers = [inputs[t].model() for t in params.teachers]
    init, reference = (inputs[name].model() if name else None for name in (params.init_from, params.reference))
    spec = spec_for(stage, ctx, params.student, params.recipe.train, distill=params.recipe.distill,
                    teacher_names=[t.name for t in teachers], teacher_models=[t.model for t in teachers],
                    init_state=None if init is None else checkpoint.read_model_state(init.path),
                    reference_state=None if reference is None else checkpoint.read_model_state(reference.path))
    ctx.tracker.set_tags(run.run_id, {"teacher_weights": ",".join(t.digest for t in teachers),
                                      **{f"{role}_weights": a.digest for role, a in (("init", init), ("reference", reference))
                                         if a is not None}})
    with run.phases.timed("teacher_outputs"):
        plan = prepare_teacher_outputs(OutputsRequest(
            ctx.cfg, params.recipe.distill, ctx.splits,
            [TeacherSpec(t.name, t.model, ctx.splits.shape) for t in teachers],
            [t.path for t in teachers], teacher_taps_needed(spec, ctx.splits),
            [t.train_outputs for t in teachers]))
    try:
        ctx.tracker.set_tags(run.run_id, {"teacher_outputs": plan.source})
        if plan.uses:
            ctx.tracker.log_params(run.run_id, plan.cache_params())
            ctx.tracker.log_metrics(run.run_id, plan.cache_metrics())
        yield replace(spec, view_bank=plan.view_bank), plan
    finally:
        plan.release()


def skipped(result: StageResult) -> bool:
    return isinstance(result.record, ChainLinkInfo) and result.record.skipped


def serving_teachers(teachers: tuple[str, ...], inputs: dict[str, StageResult]) -> tuple[str, ...]:
    """The input stages a distillation learns from: ``teachers`` without the skipped chain links, unless those are
    all it has (module docstring)."""
    trained = tuple(t for t in teachers if not skipped(inputs[t]))
    return trained or teachers


def distil(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    """Train the distillation ``stage.params`` describes and write it to the optimisation memory."""
    params: Distill = stage.params
    serving = serving_teachers(params.teachers, inputs)
    if serving != params.teachers:
        left_out = [t for t in params.teachers if t not in serving]
        log.info("stage %s: leaving out the skipped chain link(s) %s", stage.name, ", ".join(left_out))
        ctx.tracker.set_tags(run.run_id, {"teachers_left_out": ",".join(left_out)})
        params = replace(params, teachers=serving)
        stage = replace(stage, params=params)
    with distill_setup(stage, ctx, params, inputs, run) as (spec, plan):
        outcome = train_and_record(stage, ctx, run, spec, stage.name, plan.pools, plan.cache)
    remember_stage(ctx.tracker.client, run.run_id, stage_view(ctx, params, inputs), ctx.splits,
                   [inputs[t] for t in params.teachers], outcome.metrics)
    return outcome


@STAGE_KINDS.register("distill")
class DistillKind(StageKind):
    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        return distil(stage, ctx, inputs, run)


def previous_link(teachers: list[StageResult]) -> list[StageResult]:
    """What a chain link follows among its ``teachers``: the earlier link (a ``takd`` link's only teacher; an
    ``hpmkd`` link's teachers are the pipeline's teachers and the earlier link), or, for the first link, the
    teachers themselves."""
    return [t for t in teachers if isinstance(t.record, ChainLinkInfo)] or teachers


@STAGE_KINDS.register("chain_link")
class ChainLinkKind(StageKind):
    """One assistant of a progressive chain (see the module docstring)."""

    record_type = ChainLinkInfo

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: ChainLink = stage.params
        previous = previous_link([inputs[t] for t in params.teachers])
        last = previous[-1].record  # a link's record; a teacher (the first link follows teachers) never stops it
        decision = next((r.record for r in inputs.values() if isinstance(r.record, ChainDecision)), None)
        if decision is not None and params.index > decision.kept:  # a first link passes its best teacher on
            best = max(previous, key=lambda r: r.metrics["val_acc"])
            return pass_through(stage, ctx, run, best, "the measured chain plan keeps "
                                f"{decision.kept} of {decision.planned} assistant(s)")
        if isinstance(last, ChainLinkInfo) and last.stops_chain(params.epsilon):
            return pass_through(stage, ctx, run, previous[-1], "the chain stopped (epsilon rule)")
        outcome = distil(stage, ctx, inputs, run)
        gain = relative_gain(outcome.metrics["val_acc"], max(t.metrics["val_acc"] for t in previous))
        outcome.metrics.update(chain_gain=gain, chain_skipped=0.0)
        ctx.tracker.set_tags(run.run_id, {"chain_status": "trained"})
        return replace(outcome, record=ChainLinkInfo(params.index, gain))


def pass_through(stage: Stage, ctx: ExperimentContext, run: StageRun, previous: StageResult, why: str) -> StageOutcome:
    """A chain link the chain does not train (``why``): its model, and its metrics, are its predecessor's."""
    model: ModelArtifact = previous.model()
    log.info("stage %s: %s; passing %s on", stage.name, why, model.name)
    ctx.tracker.log_artifact(run.run_id, model.path, "checkpoint")
    ctx.tracker.set_tags(run.run_id, {"chain_status": "skipped", "forwarded_from": model.name, "skipped_because": why})
    metrics: dict[str, Any] = {k: v for k, v in previous.metrics.items() if k != "chain_gain"}  # not this link's gain
    return StageOutcome({**metrics, "chain_skipped": 1.0}, model, ChainLinkInfo(stage.params.index, skipped=True))
