"""Stage kinds: what each node of a pipeline's graph does, each recorded as one nested MLflow run.

``STAGE_KINDS`` maps a kind to a function ``(stage, ctx, inputs, run: StageRun) -> StageOutcome``. :func:`execute` wraps
every kind the same way: open the nested run (tags, the stage's resolved settings as params), run, log the final
metrics and files, close the run as FINISHED, or FAILED with the error while earlier stages stay as they are.

Kinds: ``train_teacher`` and ``train_student`` (cross-entropy on Ray Train), ``load_teacher`` (a given checkpoint,
evaluated), ``distill`` (teacher actors serve the student's Ray Train workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from components.scheduler import Stage, StageResult
from components.stage_runner import run_training_stage
from components.logit_cache import ensure_cached
from components.teacher_service import TeacherSpec, start_teacher_actors
from components.tracking import Tracker
from hpmkd import checkpoint
from hpmkd.config import ExperimentConfig, ModelConfig, TrainConfig
from hpmkd.config_schema import to_dict
from hpmkd.data import DataSplits
from hpmkd.models import count_params, load_state_checked
from hpmkd.registry import ConfigError, Registry
from hpmkd.training import StageSpec, evaluate, teacher_taps_needed
from hpmkd.version import code_version

log = logging.getLogger("hpmkd")

#: per stage run, the metrics and outputs a later identical stage reuses (the shared optimisation memory)
STAGE_RECORD = "stage.json"


@dataclass
class ExperimentContext:
    """What every stage of one experiment run shares."""

    cfg: ExperimentConfig
    tracker: Tracker
    parent_run_id: str
    splits: DataSplits
    storage_path: str
    out_dir: Path


@dataclass
class StageOutcome:
    metrics: dict[str, float]
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRun:
    """The MLflow run recording a stage, and the stage's content key."""

    run_id: str
    key: str


STAGE_KINDS: Registry[StageOutcome] = Registry("stage kind")


def stage_key(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], settings: dict[str, Any]) -> str:
    """Content key: hash of the stage's resolved settings, its inputs' keys, the data fingerprint and the code."""
    payload = {
        "kind": stage.kind,
        "settings": settings,
        "inputs": sorted(r.outputs.get("key", "") for r in inputs.values()),
        "data": ctx.splits.fingerprint,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def execute(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult]) -> StageResult:
    """Run ``stage`` inside its own nested MLflow run (see module docstring)."""
    fn = STAGE_KINDS.get(stage.kind)
    settings = stage_settings(stage, ctx)
    key = stage_key(stage, ctx, inputs, settings)
    tags = {
        "kind": "stage",
        "stage": stage.name,
        "stage_kind": stage.kind,
        "stage_key": key,
        "data_fingerprint": ctx.splits.fingerprint,
        "pipeline": ctx.cfg.pipeline,
        "seed": str(ctx.cfg.seed),
    }
    began = time.perf_counter()
    try:
        with ctx.tracker.run(stage.name, tags, ctx.parent_run_id) as run_id:
            ctx.tracker.log_params(run_id, settings)
            previous = ctx.tracker.finished_stage(key) if ctx.cfg.reuse else None
            if previous is not None:
                log.info("stage %s (%s): reusing finished run %s (same key %s)", stage.name, stage.kind, previous, key)
                outcome = reuse(ctx, stage, previous)
                ctx.tracker.set_tags(run_id, {"reused": "true", "reused_from": previous})
            else:
                log.info("stage %s (%s) started, MLflow run %s", stage.name, stage.kind, run_id)
                outcome = fn(stage, ctx, inputs, StageRun(run_id, key))
                outcome.outputs["key"] = key
                ctx.tracker.log_dict(run_id, {"metrics": outcome.metrics, "outputs": outcome.outputs}, STAGE_RECORD)
            ctx.tracker.log_metrics(run_id, final_metrics(outcome.metrics))
    except BaseException as err:
        log.error("stage %s FAILED after %.1f s: %s", stage.name, time.perf_counter() - began, err)
        raise
    log.info("stage %s finished in %.1f s: %s", stage.name, time.perf_counter() - began,
             ", ".join(f"{k}={outcome.metrics[k]:.4f}" for k in ("val_acc", "test_acc") if k in outcome.metrics))
    return StageResult(stage.name, stage.kind, run_id, "FINISHED", time.perf_counter() - began, outcome.metrics,
                       outcome.outputs, reused=previous is not None)


def reuse(ctx: ExperimentContext, stage: Stage, run_id: str) -> StageOutcome:
    """The outcome of the finished stage run ``run_id``: its recorded metrics and outputs, its weights fetched."""
    folder = ctx.out_dir / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    record = json.loads(Path(ctx.tracker.download(run_id, STAGE_RECORD, folder)).read_text())
    outputs = record["outputs"]
    if "model_path" in outputs:
        outputs["model_path"] = ctx.tracker.download(run_id, f"checkpoint/{checkpoint.MODEL_FILE}", folder)
    return StageOutcome(record["metrics"], outputs)


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's end-of-run metrics for MLflow; ``val_acc``/``val_loss`` are per-epoch series there, so the selected
    model's values are logged as ``selected_val_acc``/``selected_val_loss``."""
    return {(f"selected_{k}" if k in ("val_acc", "val_loss") else k): v for k, v in metrics.items()}


def stage_settings(stage: Stage, ctx: ExperimentContext) -> dict[str, Any]:
    """The resolved settings that define a stage (logged as params and hashed into its key)."""
    cfg = ctx.cfg
    common = {"seed": cfg.seed, "data": to_dict(cfg.data), **stage.params}
    if stage.kind in ("train_teacher", "load_teacher"):
        teacher = cfg.teachers[stage.params["teacher"]]
        weights = checkpoint.file_digest(teacher.checkpoint) if teacher.checkpoint else None
        return {**common, "model": teacher.model, "options": teacher.options, "checkpoint": teacher.checkpoint,
                "checkpoint_sha256": weights, "train": to_dict(cfg.teacher_train(stage.params["teacher"]))}
    if stage.kind == "train_student":
        return {**common, "model": cfg.student.model, "options": cfg.student.options, "train": to_dict(cfg.student_train())}
    return {**common, "model": cfg.student.model, "options": cfg.student.options, "train": to_dict(cfg.distill_train()),
            "distill": {k: v for k, v in to_dict(cfg.distill).items() if k not in ("train", "baseline")},
            "teachers": [t.name for t in cfg.teachers]}


def train_and_record(
    stage: Stage,
    ctx: ExperimentContext,
    run: StageRun,
    spec: StageSpec,
    teacher_actors: list[Any] = (),
    teacher_cache: list[str] = (),
) -> StageOutcome:
    """Fit ``spec`` on Ray Train and record its files (checkpoint, weights, MLflow model) in the stage's run.

    The Train run is named after the stage's content key, so rerunning the same stage resumes its checkpoint.
    """
    out_dir = ctx.out_dir / stage.name
    trained = run_training_stage(
        spec,
        train_run_name=f"{ctx.cfg.experiment}-{stage.name}-{run.key}",
        storage_path=ctx.storage_path,
        out_dir=out_dir,
        ray_cfg=ctx.cfg.ray,
        tracking_uri=ctx.tracker.tracking_uri,
        run_id=run.run_id,
        teacher_actors=teacher_actors,
        teacher_cache=teacher_cache,
    )
    record_model(ctx, run.run_id, spec.model, trained.model_path, trained.state_path)
    metrics = {k: float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))}
    return StageOutcome(metrics, {"model_path": str(trained.model_path), "model": spec.model.model,
                                  "params": int(trained.metrics["params"])})


def record_model(ctx: ExperimentContext, run_id: str, model_cfg: ModelConfig, model_path: Path, state_path: Path | None) -> None:
    ctx.tracker.log_artifact(run_id, model_path, "checkpoint")
    if state_path is not None:
        ctx.tracker.log_artifact(run_id, state_path, "checkpoint")
    if ctx.cfg.mlflow.log_models:
        model = teacher_spec("model", model_cfg, ctx).build()
        load_state_checked(model, checkpoint.read_model_state(model_path))
        ctx.tracker.log_model(run_id, model.eval(), ctx.splits.test.x[:2].numpy())


def teacher_spec(name: str, model_cfg: ModelConfig, ctx: ExperimentContext) -> TeacherSpec:
    return TeacherSpec(name, model_cfg, ctx.splits.num_classes, tuple(ctx.splits.input_shape))


def spec_for(stage: Stage, ctx: ExperimentContext, model: ModelConfig, train: TrainConfig, **extra: Any) -> StageSpec:
    return StageSpec(name=stage.name, seed=ctx.cfg.seed, data=ctx.cfg.data, model=model, train=train, **extra)


@STAGE_KINDS.register("train_teacher")
def train_teacher(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    index = stage.params["teacher"]
    teacher = ctx.cfg.teachers[index]
    spec = spec_for(stage, ctx, ModelConfig(teacher.model, teacher.options), ctx.cfg.teacher_train(index))
    outcome = train_and_record(stage, ctx, run, spec)
    outcome.outputs["teacher"] = teacher.name
    return outcome


@STAGE_KINDS.register("train_student")
def train_student(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    spec = spec_for(stage, ctx, ModelConfig(ctx.cfg.student.model, ctx.cfg.student.options), ctx.cfg.student_train())
    return train_and_record(stage, ctx, run, spec)


@STAGE_KINDS.register("load_teacher")
def load_teacher(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    """A teacher given as a checkpoint: load it (``weights_only``), check it fits, and measure it on val and test."""
    teacher = ctx.cfg.teachers[stage.params["teacher"]]
    model_cfg = ModelConfig(teacher.model, teacher.options)
    model = teacher_spec(teacher.name, model_cfg, ctx).build()
    load_state_checked(model, checkpoint.read_model_state(teacher.checkpoint))
    batch = ctx.cfg.train.eval_batch_size
    val_acc, _ = evaluate(model, ctx.splits.val, batch, torch.device("cpu"))
    test_acc, _ = evaluate(model, ctx.splits.test, batch, torch.device("cpu"))
    params = count_params(model)
    ctx.tracker.log_artifact(run.run_id, teacher.checkpoint, "checkpoint")
    return StageOutcome({"val_acc": val_acc, "test_acc": test_acc, "params": float(params)},
                        {"model_path": str(Path(teacher.checkpoint).resolve()), "model": teacher.model,
                         "params": params, "teacher": teacher.name})


@STAGE_KINDS.register("distill")
def distill(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    """Distil the student from the teachers named in ``stage.deps``, served by one Ray actor each.

    With ``distill.teacher_outputs`` ``cache`` (or ``auto`` when exact: no random augmentation, logit methods only),
    the actors first fill the logit cache (only missing entries) and are released; workers then read the cache.
    """
    cfg = ctx.cfg
    teachers = [inputs[d] for d in stage.deps]
    by_name = {t.name: t for t in cfg.teachers}
    names = [t.outputs["teacher"] for t in teachers]
    models = [ModelConfig(by_name[n].model, by_name[n].options) for n in names]
    specs = [teacher_spec(n, m, ctx) for n, m in zip(names, models)]
    weights = [t.outputs["model_path"] for t in teachers]
    spec = spec_for(stage, ctx, ModelConfig(cfg.student.model, cfg.student.options), cfg.distill_train(),
                    distill=cfg.distill, teacher_names=names, teacher_models=models)
    source = teacher_source(cfg, any(teacher_taps_needed(spec, ctx.splits)))
    ctx.tracker.set_tags(run.run_id, {"teacher_outputs": source})
    actors = start_teacher_actors(specs, weights, cfg.ray.teacher_cpus, cfg.ray.teacher_gpus)
    try:
        cache: list[str] = []
        if source == "cache":
            uses = ensure_cached(actors, specs, weights, ctx.splits.train.x, root=str(cfg.cache_root()),
                                 fingerprint=ctx.splits.fingerprint, dtype=cfg.distill.cache_dtype,
                                 top_k=cfg.distill.cache_top_k)
            ctx.tracker.log_params(run.run_id, {"cache": {u.teacher: u.digest for u in uses}})
            ctx.tracker.log_metrics(run.run_id, {"cache_hits": float(sum(u.hit for u in uses))})
            cache = [u.path for u in uses]
            release(actors)
            actors = []
        return train_and_record(stage, ctx, run, spec, actors, cache)
    finally:
        release(actors)


def teacher_source(cfg: ExperimentConfig, needs_features: bool) -> str:
    """``cache`` or ``online`` for ``distill.teacher_outputs`` (see :class:`hpmkd.config.DistillConfig`)."""
    choice = cfg.distill.teacher_outputs
    if choice == "cache" and needs_features:
        raise ConfigError("distill.teacher_outputs: 'cache' holds logits only, but a method in distill.methods reads "
                          "teacher features. Use teacher_outputs: online (or auto).")
    if choice == "auto":
        return "cache" if cfg.data.augment == "none" and not needs_features else "online"
    return choice


def release(actors: list[Any]) -> None:
    for actor in actors:
        ray.kill(actor)
