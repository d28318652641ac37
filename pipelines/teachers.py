"""``teachers``: train (or load) the config's teachers and nothing else.

Graph::

    teacher_<a>
    teacher_<b>

What it is for: teachers worth distilling can take longer to train than an experiment that distils them should. A
config such as ``conf/teachers.yaml`` trains them once with this pipeline; its stages' selected weights
(``checkpoint/model.pt`` of each ``teacher_<name>`` run) are what a distilling config loads with
``teachers[].checkpoint`` and verifies with ``teachers[].sha256``. Training is deterministic on one CPU, so the same
config reproduces the files bit for bit (``python benchmarks/teachers.py`` checks it). The config's ``student`` and
``distill`` keys are not used.
"""

from __future__ import annotations

from hpmkd.components.graph import Stage
from hpmkd.config import ExperimentConfig
from hpmkd.pipelines.registry import PIPELINES, teacher_stages


@PIPELINES.register("teachers")
def teachers_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    return teacher_stages(cfg)
