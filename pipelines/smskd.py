"""``smskd``: sequential multi-stage KD (SMSKD, Tian et al., arXiv 2601.15657): K distillation stages of one student,
each with its own method(s), each starting from the previous stage's student and anchored to a frozen copy of it;
and the ``smskd`` config section.

Graph::

    teacher_<a> ─┬─> smskd_1 ─> smskd_2 ─> … ─> smskd_K     (each smskd_k also reads every teacher)
    teacher_<b> ─┘
    student_alone                                           (with distill.baseline)

Stage ``k``'s recipe is the ``distill`` section with the keys of ``smskd.stages[k-1]`` replaced
(:meth:`SmskdConfig.recipes`). Stages after the first start from ``smskd_{k-1}``'s selected weights
(``smskd.init: previous``) and add the ``reference`` loss towards a frozen copy of them (``smskd.reference``: weight
λ_ref, TCP weighting ``mode``, ``tau_ref``, ``normalize``). Every stage is a ``distill`` stage run (typed params
``init_from`` and ``reference``), so each records its validation accuracy (``selected_val_acc``, and ``val_acc`` per
epoch); ``smskd_K`` is the final student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from hpmkd.components.graph import Stage
from hpmkd.config import SECTIONS, DistillConfig, ExperimentConfig, check_recipe, positive
from hpmkd.config_schema import from_dict, join, to_dict
from hpmkd.losses.reference import REFERENCE_WEIGHTS
from hpmkd.pipelines.registry import PIPELINES, baseline_stages, distill_stage, teacher_stages
from hpmkd.registry import ConfigError, did_you_mean


@dataclass
class ReferenceConfig:
    """SMSKD's anchor to the frozen previous-stage student: the ``reference`` loss (:mod:`hpmkd.losses.reference`)
    with weight ``weight`` (λ_ref; 0 drops the anchor) and its options."""

    weight: float = 1.0
    mode: str = "one_minus_tcp"
    tau_ref: float = 4.0
    normalize: bool = False

    def check(self, path: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{join(path, 'weight')}: must be >= 0 (0 drops the reference anchor), got {self.weight}.")
        positive(path, tau_ref=self.tau_ref)
        REFERENCE_WEIGHTS.get(self.mode, join(path, "mode"))


@SECTIONS.register("smskd")
@dataclass
class SmskdConfig:
    """SMSKD (pipeline ``smskd``): K sequential distillation stages, stage ``k`` starting from stage ``k−1``'s student
    (``init: previous``; ``scratch`` is the re-initialisation ablation) and anchored to a frozen copy of it by the
    ``reference`` loss (``reference``).

    ``stages``: one mapping per stage, of the ``distill`` keys that stage replaces (``methods`` required; also
    ``ce_weight``, ``aggregator``, ``temperature``, ``meta_interval``, ``train``). Keys a stage does not give come
    from the ``distill`` section.
    """

    stages: list[dict[str, Any]] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    init: Literal["previous", "scratch"] = "previous"

    #: distill keys a stage may replace (the teacher-output keys apply to every stage: set them under distill)
    STAGE_KEYS = ("ce_weight", "methods", "aggregator", "temperature", "meta_interval", "train")

    def check(self, path: str) -> None:
        for i, stage in enumerate(self.stages):
            where = join(path, f"stages.{i}")
            for key in stage:
                if key not in self.STAGE_KEYS:
                    raise ConfigError(f"{where}.{key}: not a per-stage key.{did_you_mean(str(key), self.STAGE_KEYS)} "
                                      f"A stage may replace: {', '.join(self.STAGE_KEYS)}; other distill keys apply to "
                                      f"every stage (set them in the distill section).")
            if not isinstance(stage.get("methods"), dict) or not stage["methods"]:
                raise ConfigError(f"{where}.methods: every SMSKD stage names its own KD method(s), e.g. "
                                  f"methods: {{fitnet: {{weight: 100}}}}.")
            if "reference" in stage["methods"]:
                raise ConfigError(f"{where}.methods.reference: SMSKD adds the frozen-reference loss to every stage "
                                  f"after the first itself; set its weight and mode under smskd.reference.")

    def check_with(self, cfg: ExperimentConfig) -> None:
        for path, recipe in zip(self.paths(), self.recipes(cfg.distill)):
            check_recipe(cfg.recipe(recipe, path), path)

    def paths(self) -> list[str]:
        """The key path of each stage (``smskd.stages.<k>``), which also names its recipe in errors."""
        return [f"smskd.stages.{k}" for k in range(len(self.stages))]

    def recipes(self, base: DistillConfig) -> list[DistillConfig]:
        """Each stage's recipe: ``base`` with the stage's keys replaced; stages after the first also get the
        ``reference`` loss (unless its weight is 0)."""
        out = []
        for k, (stage, path) in enumerate(zip(self.stages, self.paths())):
            data = to_dict(base) | copy.deepcopy(stage)
            if k > 0 and self.reference.weight > 0:
                data["methods"] = {**data["methods"], "reference": to_dict(self.reference)}
            out.append(from_dict(DistillConfig, data, path))
        return out


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
    for k, (path, distill, own) in enumerate(zip(cfg.smskd.paths(), cfg.smskd.recipes(cfg.distill), cfg.smskd.stages),
                                             start=1):
        recipe = cfg.recipe(distill, path)
        links = {}
        if previous is not None:
            if cfg.smskd.init == "previous":
                links["init_from"] = previous
            if "reference" in recipe.distill.methods:
                links["reference"] = previous
        after = () if previous is None else (previous,)  # sequential even when a stage reads nothing of the last
        stages.append(distill_stage(cfg, f"smskd_{k}", teachers, after=after, recipe=recipe, fixed=tuple(own), **links))
        previous = stages[-1].name
    return stages
