"""Stage kinds that produce a model without distilling: ``train_teacher`` and ``train_student`` (cross-entropy on
Ray Train), ``load_teacher`` (a given checkpoint, measured); and :func:`train_and_record`, how every training kind
runs a :class:`~hpmkd.training.StageSpec` on Ray Train and records its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpmkd import checkpoint
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageResult
from hpmkd.components.placement import placement_tags
from hpmkd.components.stage_params import TEACHER_KINDS, LoadTeacher, TrainModel
from hpmkd.components.stage_launch import StageLaunch
from hpmkd.components.stage_runner import executor_name, run_training_stage
from hpmkd.components.stages.base import (STAGE_KINDS, ExperimentContext, StageKind, StageRun, resume_key,
                                         storage_name)
from hpmkd.components.table_model import log_table_model
from hpmkd.components.tracking import warm_model_export
from hpmkd.models.ref import ModelRef
from hpmkd.predictors import SingleModel, load_predictor
from hpmkd.evaluation import measure, predict_final
from hpmkd.training import StageSpec


def spec_for(stage: Stage, ctx: ExperimentContext, model: ModelRef, train: Any, **extra: Any) -> StageSpec:
    return StageSpec(name=stage.name, seed=ctx.cfg.seed, data=ctx.cfg.data, model=model, train=train,
                     evaluation=ctx.cfg.evaluation, **extra)


def train_and_record(stage: Stage, ctx: ExperimentContext, run: StageRun, spec: StageSpec, name: str,
                     teacher_actors: list[Any] = (), teacher_cache: list[list[str]] = ()) -> StageOutcome:
    """Fit ``spec`` on Ray (:mod:`hpmkd.components.stage_runner`), record its files (checkpoint, predictor, MLflow model) in the stage's run, and
    hand its predictor on as a :class:`ModelArtifact` called ``name``.

    Its checkpoints' folder is named after the stage run (:func:`resume_key`): its own, or the one of an interrupted
    run of the same stage, whose checkpoint it resumes.
    """
    launch = StageLaunch(
        spec,
        train_run_name=storage_name(ctx, stage, resume_key(ctx, run)),
        storage_path=ctx.storage_path,
        ray_cfg=ctx.cfg.ray,
        tracking_uri=ctx.tracker.tracking_uri,
        run_id=run.run_id,
        teacher_actors=list(teacher_actors),
        teacher_cache=list(teacher_cache),
        progress_hub=ctx.progress_hub,
        splits_ref=ctx.splits_ref if spec.data == ctx.cfg.data and spec.seed == ctx.cfg.seed else None,
        tracking_relay=ctx.tracking_relay() if executor_name(ctx.cfg.ray) == "task" else None,
    )
    as_mlflow_model = ctx.cfg.mlflow.log_models and stage.kind not in TEACHER_KINDS
    if as_mlflow_model:
        warm_model_export()  # while the stage trains
    trained = run_training_stage(launch, ctx.stage_dir(stage.name))
    run.phases.update(trained.phases)
    record_model(ctx, run, spec.model, trained.model_path, trained.state_path, as_mlflow_model)
    ctx.tracker.set_tags(run.run_id, placement_tags(trained.placement))
    if "reference_sha256" in trained.metrics:
        ctx.tracker.set_tags(run.run_id, {"reference_state_sha256": trained.metrics["reference_sha256"]})
    metrics = {k: float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))}
    artifact = ModelArtifact(name, spec.model, str(trained.model_path), checkpoint.file_digest(trained.model_path),
                             int(trained.metrics["params"]), selected(metrics))
    return StageOutcome(metrics, artifact, placement=trained.placement)


def selected(metrics: dict[str, float]) -> dict[str, float]:
    """The selected predictor's own metrics (what a model artifact carries)."""
    return {k: metrics[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss") if k in metrics}


def record_model(ctx: ExperimentContext, run: StageRun, model: ModelRef, model_path: Path, state_path: Path | None,
                 as_mlflow_model: bool) -> None:
    """Log the checkpoint files, and with ``as_mlflow_model`` the predictor itself as an MLflow model (for a table,
    one that predicts from raw rows: :mod:`hpmkd.components.table_model`)."""
    with run.phases.timed("record_files"):
        ctx.tracker.log_artifact(run.run_id, model_path, "checkpoint")
        if state_path is not None:
            ctx.tracker.log_artifact(run.run_id, state_path, "checkpoint")
    if not as_mlflow_model:
        return
    with run.phases.timed("export_model"):
        if ctx.splits.preprocessing is not None:  # a table: the exported model reads raw rows
            log_table_model(ctx.tracker, run.run_id, str(model_path), model, ctx.splits)
        else:
            predictor = load_predictor(str(model_path), model, ctx.splits.shape)
            module = predictor.model if isinstance(predictor, SingleModel) else predictor
            ctx.tracker.log_model(run.run_id, module.eval(), ctx.splits.test.rows(torch.arange(2))[0].numpy())


class TrainKind(StageKind):
    """``train_teacher`` / ``train_student``: the model trained with cross-entropy (:class:`TrainModel`)."""

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: TrainModel = stage.params
        spec = spec_for(stage, ctx, params.model, params.train, holdout=params.holdout,
                        init_seed=params.init_seed)
        return train_and_record(stage, ctx, run, spec, params.teacher or stage.name)


STAGE_KINDS.register("train_teacher")(TrainKind)
STAGE_KINDS.register("train_student")(TrainKind)


@STAGE_KINDS.register("load_teacher")
class LoadTeacherKind(StageKind):
    """A teacher given as a checkpoint (:class:`LoadTeacher`): loaded (``weights_only``), checked to fit, measured on
    validation and test."""

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: LoadTeacher = stage.params
        predictor = load_predictor(params.checkpoint, params.model, ctx.splits.shape)
        batch = ctx.cfg.train.eval_batch_size
        predicted = predict_final(predictor, ctx.splits, batch, torch.device("cpu"), ctx.cfg.evaluation)
        scores = predicted.split_scores()
        size = params.model.count_params(ctx.splits.shape)
        ctx.tracker.log_artifact(run.run_id, params.checkpoint, "checkpoint")
        metrics = {"val_acc": scores["val_acc"], "test_acc": scores["test_acc"], "params": float(size),
                   **measure(predicted, ctx.cfg.evaluation)}
        path = str(Path(params.checkpoint).resolve())
        artifact = ModelArtifact(params.teacher, params.model, path, checkpoint.file_digest(path), size, scores)
        return StageOutcome(metrics, artifact)
