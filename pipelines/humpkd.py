"""``humpkd``: HumP-KD (Mainuddin, Tabassum, Shahid, Khan, arXiv 2606.14684), heterogeneous frozen teachers and their
Meta-MLP ensemble distilled into one student with uncertainty-aware, hierarchical and multi-stage KD; and the
``humpkd`` config section. Only the paper's abstract is public: the formulas are our reconstruction
(docs/humpkd.md).

Graph::

    teacher_<a> ─┬─> meta_mlp ─┐          (teachers never train on the held-out rows the Meta-MLP is fitted on)
    teacher_<b> ─┴─────────────┴─> distill
    student_alone                         (with distill.baseline: the student without KD)
    plain_kd                              (with humpkd.plain_kd: KD from the mean of the teachers' logits)

``distill`` uses the ``distill`` recipe as written, which for HumP-KD holds its three parts, each a registered
piece usable in any pipeline: the ``variance`` aggregator (teacher weights from inter-teacher variance, and the
per-sample confidence that scales the ``kd`` term), the ``hierarchical`` method (teachers' spatial attention fused
into one mask for a masked multi-level feature alignment) and ``distill.schedule`` (the three stages, activated by
fraction of training). Each part, and the Meta-MLP teacher, has a switch in the ``humpkd`` section; ``false``
replaces it by its plain counterpart (:data:`PARTS`), so the ablation of a part is one ``--set``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from hpmkd.components.graph import Stage, StageParams
from hpmkd.components.stage_params import TrainModel
from hpmkd.config import SECTIONS, DistillConfig, ExperimentConfig
from hpmkd.config_schema import join, to_dict
from hpmkd.data.holdout import HoldOut
from hpmkd.loss_schedule import LossPhase
from hpmkd.meta_fit import MetaTrain
from hpmkd.models.ref import ModelRef
from hpmkd.pipelines.registry import PIPELINES, baseline_stages, distill_stage, teacher_stages
from hpmkd.registry import ConfigError, Registry

#: the name the Meta-MLP ensemble teacher is given (a teacher may not use it)
META = "meta"


@dataclass
class MetaMLPConfig:
    """The Meta-MLP head (:mod:`hpmkd.models.meta_mlp`: ``depth`` hidden layers of ``hidden`` units on the
    stacked teacher ``inputs``, ``probs`` or ``logits``) and how it is fitted (:class:`hpmkd.meta_fit.MetaTrain`)."""

    hidden: int = 64
    depth: int = 1
    inputs: Literal["probs", "logits"] = "probs"
    dropout: float = 0.0
    train: MetaTrain = field(default_factory=MetaTrain)

    def check(self, path: str) -> None:
        if self.hidden < 1 or self.depth < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"{path}: hidden and depth >= 1, dropout in [0, 1); got {self.hidden}, {self.depth}, "
                              f"{self.dropout}.")


@SECTIONS.register("humpkd")
@dataclass
class HumpkdConfig:
    """HumP-KD's parts (pipeline ``humpkd``): ``true`` keeps a part as the ``distill`` recipe writes it, ``false``
    replaces it by its plain counterpart (:data:`PARTS`). ``meta``: the Meta-MLP ensemble teacher (``meta_mlp``),
    fitted on the teachers' outputs on ``holdout``, a stratified fraction of the training split the pipeline's
    teachers never train on (they hold it out whether or not ``meta`` is on, so switching it off keeps the same
    teachers). ``plain_kd``: also distil the student by plain KD from the mean of the teachers' logits (stage
    ``plain_kd``, a baseline)."""

    uncertainty: bool = True
    hierarchical: bool = True
    multistage: bool = True
    meta: bool = True
    holdout: float = 0.2
    meta_mlp: MetaMLPConfig = field(default_factory=MetaMLPConfig)
    plain_kd: bool = False

    def check(self, path: str) -> None:
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"{join(path, 'holdout')}: a fraction of the training split in [0, 1), got "
                              f"{self.holdout}.")
        if self.meta and self.holdout == 0:
            raise ConfigError(f"{join(path, 'holdout')}: the Meta-MLP is fitted on rows the teachers did not train on; "
                              f"hold some out (e.g. 0.2) or set {join(path, 'meta')}: false.")

    def check_with(self, cfg: ExperimentConfig) -> None:
        if cfg.pipeline != "humpkd":
            return
        if META in cfg.teacher_names():
            raise ConfigError(f"teachers: {META!r} is the name of the Meta-MLP teacher; name the teacher otherwise.")
        distill = cfg.distill
        needs = {"uncertainty": (distill.aggregator.get("name") == "variance",
                                 "distill.aggregator: {name: variance}"),
                 "hierarchical": ("hierarchical" in distill.methods, "distill.methods.hierarchical"),
                 "multistage": (distill.schedule is not None, "distill.schedule")}
        for part, (present, where) in needs.items():
            if getattr(self, part) and not present:
                raise ConfigError(f"humpkd.{part}: the part is on but the recipe lacks it ({where}); add it, or set "
                                  f"humpkd.{part}: false.")

    def recipe(self, distill: DistillConfig) -> DistillConfig:
        """``distill`` with every part that is off replaced by its plain counterpart."""
        for part in PARTS.names():
            if not getattr(self, part):
                distill = PARTS.get(part)(distill)
        return distill


#: part -> the recipe without it (``meta`` acts on the graph, not the recipe)
PARTS: Registry[DistillConfig] = Registry("HumP-KD part")


@PARTS.register("uncertainty")
def without_uncertainty(distill: DistillConfig) -> DistillConfig:
    """The plain mean of the teachers' probabilities (``variance``'s mix, uniform weights, no confidence)."""
    return replace(distill, aggregator={"name": "mean_probs"})


@PARTS.register("hierarchical")
def without_hierarchical(distill: DistillConfig) -> DistillConfig:
    """No masked feature term (and none in any phase of the schedule)."""
    schedule = distill.schedule
    if schedule is not None:
        phases = [LossPhase(p.start, {m: v for m, v in p.multipliers().items() if m != "hierarchical"})
                  for p in schedule.phases]
        schedule = replace(schedule, phases=phases)
    return replace(distill, methods={m: o for m, o in distill.methods.items() if m != "hierarchical"},
                   schedule=schedule)


@PARTS.register("multistage")
def without_multistage(distill: DistillConfig) -> DistillConfig:
    """Every term at its weight from the first step."""
    return replace(distill, schedule=None)


def plain_kd_recipe(distill: DistillConfig) -> DistillConfig:
    """Hinton KD from the mean of the teachers' logits: the recipe's ``kd`` weight (1 when it has none), its CE
    weight and temperature, no other term, no schedule."""
    kd = distill.methods.get("kd", {"weight": 1.0})
    return replace(distill, methods={"kd": {"weight": kd["weight"]}}, aggregator={"name": "mean_logits"},
                   schedule=None)


@dataclass(frozen=True)
class FitMetaMLP(StageParams):
    """Fit the Meta-MLP teacher ``model`` (a ``meta_mlp`` whose members are the models of the input stages
    ``members``, in order) on their outputs on the ``holdout`` rows, selected on validation
    (:mod:`hpmkd.components.stages.meta_mlp`); the teacher is called ``name``."""

    kind = "meta_mlp"
    name: str
    model: ModelRef
    members: tuple[str, ...]
    train: MetaTrain
    holdout: HoldOut

    def settings(self) -> dict[str, Any]:
        return {"teacher": self.name, "model": self.model.model, "options": self.model.options,
                "members": list(self.members), "train": to_dict(self.train), "holdout": asdict(self.holdout)}


def meta_model(cfg: ExperimentConfig) -> ModelRef:
    """The ``meta_mlp`` reference over the config's teachers."""
    head = cfg.humpkd.meta_mlp
    members = [{"model": t.model, "options": dict(t.options)} for t in cfg.teachers]
    return ModelRef("meta_mlp", {"members": members, "hidden": head.hidden, "depth": head.depth,
                                 "inputs": head.inputs, "dropout": head.dropout})


@PIPELINES.register("humpkd")
def humpkd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    section: HumpkdConfig = cfg.humpkd
    holdout = HoldOut(section.holdout, cfg.seed) if section.holdout > 0 else None
    teachers = [replace(s, params=replace(s.params, holdout=holdout)) if isinstance(s.params, TrainModel) else s
                for s in teacher_stages(cfg)]
    names = [t.name for t in teachers]
    stages = [*teachers, *baseline_stages(cfg)]
    sources = list(names)
    if section.meta:
        params = FitMetaMLP(META, meta_model(cfg), tuple(names), section.meta_mlp.train, holdout)
        actors = len(names) * cfg.ray.teacher_replicas * cfg.ray.teacher_cpus
        stages.append(Stage("meta_mlp", params, deps=list(names), cpus=actors))
        sources.append("meta_mlp")
    if section.plain_kd:
        stages.append(distill_stage(cfg, "plain_kd", names, recipe=cfg.recipe(plain_kd_recipe(cfg.distill))))
    stages.append(distill_stage(cfg, "distill", sources, recipe=cfg.recipe(section.recipe(cfg.distill))))
    return stages
