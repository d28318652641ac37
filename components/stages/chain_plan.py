"""The ``chain_plan`` stage kind: a progressive chain's plan (:class:`hpmkd.chain.ChainPlan`), recorded.

The plan is chosen when the pipeline is built (the graph's links depend on it); this stage records it as the MLflow
run of a stage: its params are the plan (``plan.steps``, ``plan.models.<i>.model`` / ``options`` / ``params`` /
``target``, ``plan.ratios.<i>``, ``plan.why``), and its artifacts ``chain_plan.json`` and ``chain_plan.txt`` (the
table and the why). It trains nothing and holds no CPU.
"""

from __future__ import annotations

from hpmkd.components.graph import Stage, StageOutcome, StageResult
from hpmkd.components.stage_params import ChainPlanRecord
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun


@STAGE_KINDS.register("chain_plan")
class ChainPlanKind(StageKind):
    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: ChainPlanRecord = stage.params
        plan = params.plan
        ctx.tracker.log_dict(run.run_id, plan, "chain_plan.json")
        ctx.tracker.log_text(run.run_id, f"{plan['table']}\n\n{plan['why']}\n", "chain_plan.txt")
        sizes = [m["params"] for m in plan["models"]]
        known = {"compression": sizes[0] / sizes[-1]} if sizes[0] is not None else {}  # an estimator's: unknown
        return StageOutcome({"steps": float(plan["steps"]), **known})
