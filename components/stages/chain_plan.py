"""The ``chain_plan`` stage kind: a progressive chain's plan (:class:`hpmkd.chain.ChainPlan`), recorded, and with
``chain.min_link_gain`` the measured decision of how many assistants pay for themselves.

The plan is chosen when the pipeline is built (the graph's links depend on it); this stage records it as the MLflow
run of a stage: its params are the plan (``plan.steps``, ``plan.models.<i>.model`` / ``options`` / ``params`` /
``target``, ``plan.ratios.<i>``, ``plan.why``), and its artifacts ``chain_plan.json`` and ``chain_plan.txt`` (the
table and the why). It trains nothing and holds no CPU. A measured plan (:attr:`ChainPlanRecord.measured`) reads
the validation accuracies of its inputs, the teacher the chain compresses and the student trained alone, and decides
with :func:`hpmkd.chain.decide_links`: the decision is its record (:class:`hpmkd.chain.ChainDecision`, read by the
chain's links), its metrics (``assistants_planned``, ``assistants_kept``, ``capacity_gap``), tag ``chain_decision``
and the end of ``chain_plan.txt``.
"""

from __future__ import annotations

import logging

from hpmkd.chain import ChainDecision, decide_links
from hpmkd.components.graph import Stage, StageOutcome, StageResult
from hpmkd.components.stage_params import ChainPlanRecord
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun

log = logging.getLogger("hpmkd")


@STAGE_KINDS.register("chain_plan")
class ChainPlanKind(StageKind):
    record_type = ChainDecision

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: ChainPlanRecord = stage.params
        plan = params.plan
        sizes = [m["params"] for m in plan["models"]]
        known = {"compression": sizes[0] / sizes[-1]} if sizes[0] is not None else {}  # an estimator's: unknown
        metrics = {"steps": float(plan["steps"]), **known}
        decision = None
        text = f"{plan['table']}\n\n{plan['why']}\n"
        if params.measured:
            decision = decide_links(len(plan["models"]) - 2, inputs[params.teacher].metrics["val_acc"],
                                    inputs[params.student].metrics["val_acc"], params.min_link_gain)
            log.info("chain plan, measured: %s", decision.why)
            metrics.update(assistants_planned=float(decision.planned), assistants_kept=float(decision.kept),
                           capacity_gap=decision.gap)
            ctx.tracker.set_tags(run.run_id, {"chain_decision": decision.why})
            text += f"\n{decision.why}\n"
        ctx.tracker.log_dict(run.run_id, plan, "chain_plan.json")
        ctx.tracker.log_text(run.run_id, text, "chain_plan.txt")
        return StageOutcome(metrics, record=decision)
