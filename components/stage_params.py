"""The typed params of the core stage kinds, resolved once when a pipeline builds its graph (no Ray, no MLflow).

=================  ============================  ==============================================================
kind               params                        what the stage does (:mod:`hpmkd.components.stages`)
=================  ============================  ==============================================================
``train_teacher``  :class:`TrainModel`           trains a teacher with cross-entropy
``train_student``  :class:`TrainModel`           trains the student alone (the baseline)
``load_teacher``   :class:`LoadTeacher`          loads a teacher checkpoint and measures it
``fit_teacher``    :class:`FitTeacher`           fits an estimator teacher, with out-of-fold training outputs
``distill``        :class:`Distill`              distils a student from its input stages' models
``chain_link``     :class:`ChainLink`            one link of a progressive chain (a distill with HPM-KD's ε rule)
``chain_plan``     :class:`ChainPlanRecord`      records a chain's plan
``tune``           :class:`Tune`                 the configuration manager's search
=================  ============================  ==============================================================

Records (a stage's kind-specific output besides its model): :class:`hpmkd.chain.ChainLinkInfo` (a chain link's),
:class:`hpmkd.chain.ChainDecision` (a measured chain plan's), :class:`TunedConfig` (a tune stage's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from hpmkd.checkpoint import file_digest
from hpmkd.components.graph import StageParams, Workload
from hpmkd.config import Recipe, TrainConfig
from hpmkd.config_schema import to_dict
from hpmkd.data.holdout import HoldOut
from hpmkd.models.ref import ModelRef
from hpmkd.search_space import ConfigManagerConfig


#: the kinds whose model is a teacher
TEACHER_KINDS = ("train_teacher", "load_teacher", "fit_teacher")


@dataclass(frozen=True)
class TrainModel(StageParams):
    """Train ``model`` with cross-entropy: a teacher (``teacher`` is its name) or the student alone. ``holdout``:
    rows of the training split it does not train on (:mod:`hpmkd.data.holdout`); ``init_seed``: its
    initialisation's own seed (a deep ensemble's members; the data split stays the experiment seed's)."""

    model: ModelRef
    train: TrainConfig
    teacher: str | None = None
    holdout: HoldOut | None = None
    init_seed: int | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "train_student" if self.teacher is None else "train_teacher"

    def workload(self) -> Workload:
        return Workload(self.model.model, self.train.epochs)

    def settings(self) -> dict[str, Any]:
        return {**({"teacher": self.teacher} if self.teacher else {}), "model": self.model.model,
                "options": self.model.options, "train": to_dict(self.train),
                **({"holdout": asdict(self.holdout)} if self.holdout else {}),
                **({"init_seed": self.init_seed} if self.init_seed is not None else {})}


@dataclass(frozen=True)
class LoadTeacher(StageParams):
    """A teacher given as a checkpoint file (``teachers[].checkpoint``)."""

    kind = "load_teacher"
    teacher: str
    model: ModelRef
    checkpoint: str

    def settings(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "model": self.model.model, "options": self.model.options,
                "checkpoint": self.checkpoint, "checkpoint_sha256": file_digest(self.checkpoint)}


@dataclass(frozen=True)
class FitTeacher(StageParams):
    """Fit the estimator teacher ``teacher`` (``model``: an :data:`hpmkd.estimators.ESTIMATORS` name and its
    options) on the training split; ``fit``: ``oof`` also stores out-of-fold outputs on the training rows from
    ``folds`` stratified folds (:mod:`hpmkd.oof`), ``in_sample`` does not."""

    kind = "fit_teacher"
    teacher: str
    model: ModelRef
    fit: str
    folds: int

    def settings(self) -> dict[str, Any]:
        folds = {"folds": self.folds} if self.fit == "oof" else {}
        return {"teacher": self.teacher, "model": self.model.model, "options": self.model.options, "fit": self.fit,
                **folds}


@dataclass(frozen=True)
class Distill(StageParams):
    """Distil ``student`` from the models of the input stages ``teachers`` with ``recipe``.

    ``init_from``: an input whose weights the student starts from; ``reference``: an input whose frozen model feeds
    the ``reference`` loss (both SMSKD). ``fixed``: ``distill`` keys the stage's own recipe replaced (an SMSKD
    stage's), which a tune stage's configuration does not override.
    """

    kind = "distill"
    student: ModelRef
    recipe: Recipe
    teachers: tuple[str, ...]
    init_from: str | None = None
    reference: str | None = None
    fixed: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        links = {k: v for k, v in (("init_from", self.init_from), ("reference", self.reference)) if v is not None}
        return {"model": self.student.model, "options": self.student.options, **self.recipe.settings(),
                "teachers": list(self.teachers), **links}

    def workload(self) -> Workload:
        return Workload(self.student.model, self.recipe.train.epochs)

    def tuned(self, overrides: dict[str, Any]) -> "Distill":
        mine = {path: v for path, v in overrides.items() if (path.split(".") + [""])[1] not in self.fixed}
        return replace(self, recipe=self.recipe.with_overrides(mine))


@dataclass(frozen=True)
class ChainLink(Distill):
    """Link ``index`` of a progressive chain of ``steps`` steps (an assistant). ``epsilon``: HPM-KD's stop rule for
    this link (``None``: the link is always trained, as link 1 always is)."""

    kind = "chain_link"
    index: int = 1
    steps: int = 1
    epsilon: float | None = None

    def settings(self) -> dict[str, Any]:
        chain = {"index": self.index, "steps": self.steps, **({"epsilon": self.epsilon} if self.epsilon is not None else {})}
        return {**super().settings(), "chain": chain}

    def tuned(self, overrides: dict[str, Any]) -> "ChainLink":
        tuned = super().tuned(overrides)
        if self.epsilon is not None and "chain.epsilon" in overrides:
            tuned = replace(tuned, epsilon=float(overrides["chain.epsilon"]))
        return tuned


@dataclass(frozen=True)
class ChainPlanRecord(StageParams):
    """A progressive chain's plan (:meth:`hpmkd.chain.ChainPlan.as_dict`), recorded as a stage. With
    ``min_link_gain``, the stage also decides from the measured validation accuracies of the input stages
    ``teacher`` and ``student`` how many assistants are trained (:func:`hpmkd.chain.decide_links`)."""

    kind = "chain_plan"
    plan: dict[str, Any]
    teacher: str | None = None
    student: str | None = None
    min_link_gain: float | None = None

    @property
    def measured(self) -> bool:
        return self.min_link_gain is not None

    def settings(self) -> dict[str, Any]:
        measured = {"teacher": self.teacher, "student": self.student, "min_link_gain": self.min_link_gain}
        return {"plan": self.plan, **(measured if self.measured else {})}


@dataclass(frozen=True)
class Tune(StageParams):
    """Search ``recipe`` for ``student`` distilled from ``teachers`` with the configuration manager's settings."""

    kind = "tune"
    student: ModelRef
    recipe: Recipe
    teachers: tuple[str, ...]
    config_manager: ConfigManagerConfig

    def settings(self) -> dict[str, Any]:
        return {"model": self.student.model, "options": self.student.options, **self.recipe.settings(),
                "teachers": list(self.teachers), "config_manager": to_dict(self.config_manager)}

    def workload(self) -> Workload:
        budget = self.config_manager.budget_epochs or self.recipe.train.epochs
        return Workload(self.student.model, self.config_manager.trials * budget)


@dataclass(frozen=True)
class TunedConfig:
    """A tune stage's choice: ``overrides`` (config key path -> value) that every stage depending on it runs with,
    the chosen ``config`` by hyperparameter, where the proposals came from and what the search did."""

    overrides: dict[str, Any]
    config: dict[str, float]
    source: str
    proposals: list[dict[str, Any]]
    best_trial: str
    best_trial_run: str
    restored: bool
    budget_epochs: int
