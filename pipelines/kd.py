"""``kd``: teachers (trained side by side, or loaded) -> one distillation stage; plus the student trained alone.

Graph::

    teacher_<a> ─┐
    teacher_<b> ─┼─> distill
    ...         ─┘
    student_alone        (independent; the baseline the distilled student must beat)

The distillation recipe (methods, weights, aggregator, temperature) is the config's ``distill`` section.
"""

from __future__ import annotations

from components.scheduler import Stage
from hpmkd.config import ExperimentConfig
from pipelines.registry import PIPELINES, baseline_stages, distill_cpus, teacher_stages


@PIPELINES.register("kd")
def kd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    teachers = teacher_stages(cfg)
    return [*teachers, *baseline_stages(cfg),
            Stage("distill", "distill", deps=[t.name for t in teachers], cpus=distill_cpus(cfg))]
