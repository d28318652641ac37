"""The stage graph's types: what a pipeline builds and what crosses a stage boundary (no Ray, no MLflow).

* A :class:`Stage` is one node: a name, its typed params (a frozen :class:`StageParams` dataclass whose ``kind``
  names the stage kind that runs it, :mod:`hpmkd.components.stages`), the stages it reads and the CPUs and GPUs it
  holds.
* A stage's :class:`StageOutcome` (and, once recorded, its :class:`StageResult`) carries metrics, at most one
  :class:`ModelArtifact` (every model-producing stage hands on exactly one) and a kind-specific typed ``record``
  (a tune stage's chosen configuration, a chain link's gain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from hpmkd.config_schema import to_dict
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError


@dataclass(frozen=True)
class Workload:
    """What a stage trains, for its duration estimate: the model's name and the epochs over the training split
    (a search's trials times their budget)."""

    model: str
    epochs: float


class StageParams:
    """Base of every stage kind's params: subclasses are frozen dataclasses; ``kind`` names the kind that runs them.

    :meth:`settings` is what defines the stage besides the experiment's seed and data (logged as MLflow params and
    hashed into the content key); :meth:`tuned` applies the configuration a ``tune`` stage hands on (config key paths
    to values) and returns new params (unchanged by default); :meth:`workload` is what it trains (``None``: nothing).
    """

    kind: ClassVar[str]

    def workload(self) -> Workload | None:
        return None

    def settings(self) -> dict[str, Any]:
        return to_dict(self)

    def tuned(self, overrides: dict[str, Any]) -> "StageParams":
        return self


@dataclass
class Stage:
    """One node of the stage graph."""

    name: str
    params: StageParams
    deps: list[str] = field(default_factory=list)
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def kind(self) -> str:
        return self.params.kind


@dataclass(frozen=True)
class ModelArtifact:
    """What a model-producing stage hands on: later stages (teachers, ``init_from``, ``reference``), the logit cache,
    the teacher actors and the report all read this value.

    ``name``: how distillation stages call the model (a teacher's name, or the producing stage's name);
    ``model``: its architecture; ``path``: its predictor checkpoint (:mod:`hpmkd.predictors`); ``digest``: sha256 of
    that file (what the cache keys on); ``params``: its parameter count; ``metrics``: its selected validation and
    test metrics (``val_acc``, ``test_acc``, ...); ``train_outputs``: a file of the model's outputs on the training
    split's rows stored by the stage that made it (an estimator teacher's out-of-fold outputs,
    :class:`hpmkd.oof.FoldOutputs`), served to students instead of the model's own outputs on those rows.
    """

    name: str
    model: ModelRef
    path: str
    digest: str
    params: int
    metrics: dict[str, float] = field(default_factory=dict)
    train_outputs: str | None = None


@dataclass
class StageOutcome:
    """What a stage kind's run returns: final metrics, the model it produced (if any), its kind's typed record, and
    where it ran (:mod:`hpmkd.components.placement`; ``None`` for a stage that ran nothing on Ray)."""

    metrics: dict[str, float]
    artifact: ModelArtifact | None = None
    record: Any = None
    placement: dict[str, Any] | None = None


@dataclass
class StageResult:
    """A stage as the scheduler saw it: its outcome once run (or why not), its MLflow run and its timing."""

    name: str
    kind: str
    run_id: str | None
    status: str
    wall_s: float
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: ModelArtifact | None = None
    record: Any = None
    key: str | None = None
    started_s: float = 0.0
    wait_s: float = 0.0
    error: str | None = None
    reused: bool = False
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase (hpmkd.phases)
    estimate_s: float | None = None  # the scheduler's expected duration (hpmkd.components.estimates)
    placement: dict[str, Any] | None = None  # nodes and ranks it ran on (hpmkd.components.placement)

    def model(self) -> ModelArtifact:
        """The model this stage produced; an error naming the stage when it produced none."""
        if self.artifact is None:
            raise ConfigError(f"stage {self.name!r} ({self.kind}) produced no model, but a stage reads one from it.")
        return self.artifact


def check_graph(stages: list[Stage]) -> None:
    """Unique names, known dependencies, no cycles (stages must be listed after their inputs)."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"stage {stage.name!r} appears twice in the pipeline's graph.")
        missing = [d for d in stage.deps if d not in seen]
        if missing:
            raise ConfigError(f"stage {stage.name!r} depends on {missing}, which are not listed before it.")
        seen.add(stage.name)
