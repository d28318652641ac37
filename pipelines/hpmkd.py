"""``hpmkd``: HPM-KD (arXiv 2512.09886) as one pipeline: the configuration manager, the teachers, and a progressive
chain whose every link distils from the attention-weighted ensemble of all the teachers and the previous link.

Graph (with one assistant)::

    teacher_<a> ─┬─> tune ─┐                              (config_manager.enabled: the searched recipe)
    teacher_<b> ─┤         ├─> assistant_1 ─┐
                 └─────────┴────────────────┴─> distill   (the student: teachers + assistant_1)
    chain_plan                                            (records the plan)
    student_alone                                         (with distill.baseline)

The chain is :func:`hpmkd.pipelines.chain.chain_stages` with ``keep_teachers``: ``assistant_1`` distils from the
teachers, ``assistant_i`` (i ≥ 2) and the student from the teachers and the link before (unlike ``takd``, where
later links see only the previous link). Without assistants the student distils from the teachers. Every link uses
the ``distill`` recipe (in the default config: the ``attention`` aggregator and the ``meta`` temperature), tuned
by the ``tune`` stage when ``config_manager.enabled`` (:func:`hpmkd.pipelines.config_manager.with_tune_stage`); the
teachers' logits are computed once into the cache (``distill.teacher_outputs: auto``). Each component can be
switched to its plain counterpart with ``components.<name>: false`` (:mod:`hpmkd.pipelines.switches`).
"""

from __future__ import annotations

from hpmkd.components.graph import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.pipelines.chain import chain_stages
from hpmkd.pipelines.registry import PIPELINES, baseline_stages, teacher_stages


@PIPELINES.register("hpmkd")
def hpmkd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    teachers = teacher_stages(cfg)
    return [*teachers, *baseline_stages(cfg), *chain_stages(cfg, teachers, keep_teachers=True)]
