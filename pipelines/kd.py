"""``kd``: teachers (trained side by side, or loaded) -> one distillation stage; plus the student trained alone.

Graph::

    teacher_<a> ─┐
    teacher_<b> ─┼─> distill
    ...         ─┘
    student_alone        (independent; the baseline the distilled student must beat)

The distillation recipe (methods, weights, aggregator, temperature) is the config's ``distill`` section.
"""

from __future__ import annotations

from hpmkd.components.graph import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.pipelines.registry import PIPELINES, baseline_stages, distill_stage, teacher_stages


@PIPELINES.register("kd")
def kd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    teachers = teacher_stages(cfg)
    return [*teachers, *baseline_stages(cfg), distill_stage(cfg, "distill", [t.name for t in teachers])]
