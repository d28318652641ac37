"""The MLflow records a report is built from, read once into typed dataclasses (read only: nothing is logged).

An experiment's runs are of two kinds (see :mod:`hpmkd.components.tracking`): pipeline runs (tag ``kind=pipeline``: one
per ``hpmkd run``, with the flattened config as params and ``student_test_acc``, ``retention``, ``compression``,
``wall_s`` as metrics) and stage runs nested under them (tag ``kind=stage``, with ``stage``, ``stage_kind``,
``reused``/``reused_from`` tags, the ``placement.nodes`` tag of the node(s) it trained on
(:mod:`hpmkd.components.placement`) and the stage's final metrics). Per-epoch series are read on demand with
:func:`series`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlflow import MlflowClient

from hpmkd.components.tracking import store_errors

#: a stage's role in the report, by stage kind; kinds not listed produce distilled students
STAGE_ROLES = {"train_teacher": "teacher", "load_teacher": "teacher", "fit_teacher": "teacher", "meta_mlp": "teacher",
               "train_student": "student alone"}
DISTILLED = "distilled"
TERMINAL_FAILURES = ("FAILED", "KILLED")


@dataclass(frozen=True)
class StageRecord:
    """One stage run."""

    run_id: str
    parent_run_id: str
    name: str
    kind: str
    status: str
    start_ms: int
    end_ms: int | None
    metrics: dict[str, float]
    reused_from: str | None
    error: str | None
    nodes: tuple[str, ...] = ()  # the nodes its Ray Train workers ran on; () when none were recorded

    @property
    def role(self) -> str:
        """``teacher``, ``student alone`` or ``distilled``."""
        return STAGE_ROLES.get(self.kind, DISTILLED)

    @property
    def reused(self) -> bool:
        return self.reused_from is not None


@dataclass(frozen=True)
class PipelineRecord:
    """One pipeline (experiment) run and its stage runs, in start order."""

    run_id: str
    name: str
    pipeline: str
    seed: str
    status: str
    start_ms: int
    end_ms: int | None
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    error: str | None
    stages: tuple[StageRecord, ...]

    @property
    def wall_s(self) -> float | None:
        """The recorded ``wall_s`` metric; for a run that ended without it (killed), end minus start."""
        if "wall_s" in self.metrics:
            return self.metrics["wall_s"]
        return None if self.end_ms is None else (self.end_ms - self.start_ms) / 1000

    @property
    def label(self) -> str:
        """Short name for plots and tables: seed and the first characters of the run id."""
        return f"seed {self.seed} · {self.run_id[:6]}"

    def best_teacher(self) -> StageRecord | None:
        """The finished teacher stage with the highest test accuracy (the reference of retention and compression)."""
        teachers = [s for s in self.stages
                    if s.role == "teacher" and s.status == "FINISHED" and "test_acc" in s.metrics]
        return max(teachers, key=lambda s: s.metrics["test_acc"], default=None)


@dataclass(frozen=True)
class ExperimentRecords:
    """The pipeline runs of one MLflow experiment, oldest first."""

    name: str
    experiment_id: str
    pipelines: tuple[PipelineRecord, ...]

    def stages(self) -> Iterator[tuple[PipelineRecord, StageRecord]]:
        for pipeline in self.pipelines:
            for stage in pipeline.stages:
                yield pipeline, stage


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on ``tracking_uri``; a SQLite file that does not exist is an error (opening it would create it)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {tracking_uri} ({path} does not exist); pass --tracking-uri.")
    with store_errors(tracking_uri):
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    return client


def load_experiments(client: MlflowClient, names: list[str] | None = None) -> list[ExperimentRecords]:
    """The records of the experiments ``names`` (default: every experiment holding a pipeline run).

    An unknown name raises :class:`ValueError` listing the experiments the store has.
    """
    known = {e.name: e.experiment_id for e in paged(client.search_experiments)}
    missing = [n for n in names or [] if n not in known]
    if missing:
        raise ValueError(f"unknown experiment {', '.join(map(repr, missing))}; the store has: "
                         f"{', '.join(sorted(known)) or '(none)'}.")
    records = [load_experiment(client, name, known[name]) for name in dict.fromkeys(names or sorted(known))]
    if names:
        return records
    found = [r for r in records if r.pipelines]
    if not found:
        raise ValueError(f"no pipeline runs in any experiment of the store (experiments: {', '.join(sorted(known))}).")
    return found


def load_experiment(client: MlflowClient, name: str, experiment_id: str) -> ExperimentRecords:
    runs = list(paged(client.search_runs, [experiment_id], order_by=["attributes.start_time ASC"]))
    stages: dict[str, list[StageRecord]] = {}
    for run in runs:
        if run.data.tags.get("kind") == "stage" and "mlflow.parentRunId" in run.data.tags:
            stage = stage_record(run)
            stages.setdefault(stage.parent_run_id, []).append(stage)
    pipelines = tuple(pipeline_record(run, stages.get(run.info.run_id, []))
                      for run in runs if run.data.tags.get("kind") == "pipeline")
    return ExperimentRecords(name, experiment_id, pipelines)


def stage_record(run: Any) -> StageRecord:
    tags = run.data.tags
    return StageRecord(
        run_id=run.info.run_id,
        parent_run_id=tags["mlflow.parentRunId"],
        name=tags.get("stage", run.info.run_name),
        kind=tags.get("stage_kind", "?"),
        status=run.info.status,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        metrics=dict(run.data.metrics),
        reused_from=tags.get("reused_from") if tags.get("reused") == "true" else None,
        error=tags.get("error"),
        nodes=tuple(n for n in tags.get("placement.nodes", "").split(",") if n),
    )


def pipeline_record(run: Any, stages: list[StageRecord]) -> PipelineRecord:
    tags = run.data.tags
    return PipelineRecord(
        run_id=run.info.run_id,
        name=run.info.run_name,
        pipeline=tags.get("pipeline", "?"),
        seed=tags.get("seed", run.data.params.get("seed", "?")),
        status=run.info.status,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(tags),
        error=tags.get("error"),
        stages=tuple(sorted(stages, key=lambda s: s.start_ms)),
    )


def series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """The per-step values of metric ``key`` of ``run_id``, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def paged(search: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of an MLflow ``search_*`` call, following its page tokens."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return
