"""Stage kinds: what each node of a pipeline's graph does, each recorded as one nested MLflow run.

``STAGE_KINDS`` maps a kind to a function ``(stage, ctx, inputs, run: StageRun) -> StageOutcome``. :func:`execute` wraps
every kind the same way: open the nested run (tags, the stage's resolved settings as params), run, log the final
metrics and files, close the run as FINISHED, or FAILED with the error while earlier stages stay as they are.

Kinds: ``train_teacher`` and ``train_student`` (cross-entropy on Ray Train), ``load_teacher`` (a given checkpoint,
evaluated), ``distill`` (teacher actors serve the student's Ray Train workers; each finished one is written to the
optimisation memory, :mod:`components.memory`; also the links of a progressive chain and the stages of SMSKD, see
:func:`distill`). ``tune`` (the configuration manager's search) is registered by :mod:`components.tune_stage`; the
``overrides`` a stage outputs configure the stages that depend on it. ``chain_plan`` (a record of a chain's plan) is
registered by :mod:`components.chain_plan`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from components.scheduler import Stage, StageResult
from components.stage_runner import run_training_stage
from components.memory import remember_stage
from components.teacher_outputs import TeacherOutputPlan, prepare_teacher_outputs
from components.teacher_service import TeacherSpec
from components.tracking import Tracker
from hpmkd import checkpoint
from hpmkd.chain import link_stopped, relative_gain
from hpmkd.config import DistillConfig, ExperimentConfig, ModelConfig, TrainConfig, merged_train, with_overrides
from hpmkd.config_schema import from_dict, to_dict
from hpmkd.data import DataSplits
from hpmkd.models import count_params, load_state_checked
from hpmkd.registry import Registry
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

#: stages whose model is a teacher: recorded as checkpoints only (``mlflow.log_models`` exports students, the
#: product of a run, as MLflow models; a teacher export would cost seconds on the critical path for no user)
TEACHER_KINDS = ("train_teacher", "load_teacher")
#: stages that hand a configuration on (``outputs["overrides"]``) rather than a model
CONFIG_KINDS = ("tune",)


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
    ctx = configured(ctx, inputs)
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


def configured(ctx: ExperimentContext, inputs: dict[str, StageResult]) -> ExperimentContext:
    """The context a stage runs in: the experiment's config with the ``overrides`` (config key path -> value) its
    inputs hand on (a ``tune`` stage's best configuration), so its params, content key and training all use them."""
    overrides = {k: v for r in inputs.values() for k, v in r.outputs.get("overrides", {}).items()}
    return replace(ctx, cfg=with_overrides(ctx.cfg, overrides)) if overrides else ctx


def reuse(ctx: ExperimentContext, stage: Stage, run_id: str) -> StageOutcome:
    """The outcome of the finished stage run ``run_id``: its recorded metrics and outputs, its weights fetched."""
    folder = ctx.out_dir / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    record = json.loads(Path(ctx.tracker.download(run_id, STAGE_RECORD, folder)).read_text())
    outputs = record["outputs"]
    if "model_path" in outputs:  # logged under its own file name (model.pt, or a loaded teacher's checkpoint file)
        outputs["model_path"] = ctx.tracker.download(run_id, f"checkpoint/{Path(outputs['model_path']).name}", folder)
    return StageOutcome(record["metrics"], outputs)


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's end-of-run metrics for MLflow; ``val_acc``/``val_loss`` are per-epoch series there, so the selected
    model's values are logged as ``selected_val_acc``/``selected_val_loss``."""
    return {(f"selected_{k}" if k in ("val_acc", "val_loss") else k): v for k, v in metrics.items()}


def stage_settings(stage: Stage, ctx: ExperimentContext) -> dict[str, Any]:
    """The resolved settings that define a stage (logged as params and hashed into its key)."""
    cfg = ctx.cfg
    common = {"seed": cfg.seed, "data": to_dict(cfg.data), **stage.params}
    if stage.kind in TEACHER_KINDS:
        teacher = cfg.teachers[stage.params["teacher"]]
        weights = checkpoint.file_digest(teacher.checkpoint) if teacher.checkpoint else None
        return {**common, "model": teacher.model, "options": teacher.options, "checkpoint": teacher.checkpoint,
                "checkpoint_sha256": weights, "train": to_dict(cfg.teacher_train(stage.params["teacher"]))}
    if stage.kind == "train_student":
        return {**common, "model": cfg.student.model, "options": cfg.student.options, "train": to_dict(cfg.student_train())}
    if stage.kind == "chain_plan":  # a record: its params are the plan itself
        return common
    # a distillation: the student and the recipe (named by its key path, param ``recipe``) unless params say otherwise
    params = dict(stage.params)
    path = params.pop("recipe", "distill")
    return {"seed": cfg.seed, "data": to_dict(cfg.data), "model": cfg.student.model, "options": cfg.student.options,
            **recipe_settings(cfg, path), "teachers": [t.name for t in cfg.teachers], **params}


def recipe_settings(cfg: ExperimentConfig, path: str) -> dict[str, Any]:
    """The settings of the recipe at key path ``path`` (:meth:`ExperimentConfig.recipes`): its resolved training
    (``train``) and the rest of it (``distill``)."""
    recipe = cfg.recipes()[path]
    return {"train": to_dict(merged_train(cfg.train, recipe.train, f"{path}.train")),
            "distill": {k: v for k, v in to_dict(recipe).items() if k not in ("train", "baseline")}}


def stage_config(stage: Stage, ctx: ExperimentContext) -> ExperimentConfig:
    """The experiment's config as one distillation stage sees it: its student as ``student``, its recipe (with its
    resolved training) as ``distill``."""
    settings = stage_settings(stage, ctx)
    student = replace(ctx.cfg.student, model=settings["model"], options=settings["options"])
    recipe = from_dict(DistillConfig, {**settings["distill"], "train": settings["train"]}, "distill")
    return replace(ctx.cfg, student=student, distill=recipe)


def train_and_record(
    stage: Stage,
    ctx: ExperimentContext,
    run: StageRun,
    spec: StageSpec,
    teacher_actors: list[Any] = (),
    teacher_cache: list[list[str]] = (),
) -> StageOutcome:
    """Fit ``spec`` on Ray Train and record its files (checkpoint, weights, MLflow model) in the stage's run.

    The Train run is named after the stage's content key (:func:`resume_key`), so rerunning the same stage resumes
    its checkpoint.
    """
    out_dir = ctx.out_dir / stage.name
    trained = run_training_stage(
        spec,
        train_run_name=f"{ctx.cfg.experiment}-{stage.name}-{resume_key(ctx, run)}",
        storage_path=ctx.storage_path,
        out_dir=out_dir,
        ray_cfg=ctx.cfg.ray,
        tracking_uri=ctx.tracker.tracking_uri,
        run_id=run.run_id,
        teacher_actors=teacher_actors,
        teacher_cache=teacher_cache,
    )
    record_model(ctx, run.run_id, spec.model, trained.model_path, trained.state_path,
                 as_mlflow_model=ctx.cfg.mlflow.log_models and stage.kind not in TEACHER_KINDS)
    metrics = {k: float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))}
    texts = {k: v for k, v in trained.metrics.items() if isinstance(v, str)}  # data fingerprint, reference digest
    return StageOutcome(metrics, {"model_path": str(trained.model_path), "model": spec.model.model,
                                  "options": spec.model.options, "params": int(trained.metrics["params"]), **texts})


def resume_key(ctx: ExperimentContext, run: StageRun) -> str:
    """What names a stage's Ray Train run or Tune search under ``ray.storage_path``: its content key, so that a rerun
    of the same stage resumes what an interrupted run left; with ``reuse`` off, the key and the stage's MLflow run,
    so that nothing an earlier run left is resumed (the stage is recomputed from scratch)."""
    return run.key if ctx.cfg.reuse else f"{run.key}-{run.run_id}"


def record_model(ctx: ExperimentContext, run_id: str, model_cfg: ModelConfig, model_path: Path, state_path: Path | None,
                 as_mlflow_model: bool) -> None:
    """Log the checkpoint files, and with ``as_mlflow_model`` the model itself as an MLflow model."""
    ctx.tracker.log_artifact(run_id, model_path, "checkpoint")
    if state_path is not None:
        ctx.tracker.log_artifact(run_id, state_path, "checkpoint")
    if as_mlflow_model:
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
                         "options": teacher.options, "params": params, "teacher": teacher.name})


@STAGE_KINDS.register("distill")
def distill(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
    """Distil a student from teacher models served by Ray actors.

    Stage params (all optional; the defaults are the config's ``student``, its ``distill`` section and every input):
    ``teachers`` names the input stages whose models teach (trained or loaded teachers, or any earlier distillation
    stage, e.g. a chain's assistant); ``model`` / ``options`` the student; ``recipe`` the key path of its recipe
    (:meth:`hpmkd.config.ExperimentConfig.recipes`); ``init_from`` an input whose weights the student starts from;
    ``reference`` an input whose model, frozen, feeds the ``reference`` loss (SMSKD); ``chain`` marks a link of a
    progressive chain (below). The run's tags record which weights were used (sha256 of each file):
    ``teacher_weights``, ``init_weights``, ``reference_weights``; ``reference_state_sha256`` is the digest of the
    reference's state as training left it (:func:`hpmkd.models.state.state_digest`).

    ``distill.teacher_outputs`` chooses the source (``components/teacher_outputs.py``): with ``cache`` or ``bank``
    the actors first fill the missing cache entries and are released; workers then read the entries. The run
    records the source (tag ``teacher_outputs``) and the entries used (params ``cache.<teacher>``, metrics
    ``cache_hits`` / ``cache_entries``).

    A chain link (param ``chain``: its ``index`` and, for links the ε rule can skip, ``epsilon``) records its
    relative validation gain (metric ``chain_gain``, :func:`hpmkd.chain.relative_gain`) over the link it follows
    (:func:`previous_link`; for the first link, the best teacher). When its predecessor stopped the chain
    (:func:`hpmkd.chain.link_stopped`) it trains nothing: tagged ``chain_status: skipped``, it hands its
    predecessor's model on (the weights are copied into its run).
    """
    names = stage.params.get("teachers") or [d for d in stage.deps if inputs[d].kind not in CONFIG_KINDS]
    teachers = [inputs[d] for d in names]
    chain = stage.params.get("chain")
    previous = previous_link(teachers)
    if chain is not None and link_stopped(previous[-1].outputs, chain.get("epsilon")):
        return pass_through(stage, ctx, run, previous[-1])
    init, reference = (inputs[stage.params[k]] if k in stage.params else None for k in ("init_from", "reference"))
    with distill_setup(stage, ctx, teachers, run, init, reference) as (spec, plan):
        outcome = train_and_record(stage, ctx, run, spec, plan.pools, plan.cache)
    remember_stage(ctx.tracker.client, run.run_id, stage_config(stage, ctx), ctx.splits, teachers, outcome.metrics)
    if "reference_sha256" in outcome.outputs:
        ctx.tracker.set_tags(run.run_id, {"reference_state_sha256": outcome.outputs["reference_sha256"]})
    if chain is not None:
        gain = relative_gain(outcome.metrics["val_acc"], max(t.metrics["val_acc"] for t in previous))
        outcome.metrics.update(chain_gain=gain, chain_skipped=0.0)
        outcome.outputs.update(teacher=stage.name, chain_index=chain["index"], chain_gain=gain)
        ctx.tracker.set_tags(run.run_id, {"chain_status": "trained"})
    return outcome


def previous_link(teachers: list[StageResult]) -> list[StageResult]:
    """What a chain link follows among its ``teachers``: the earlier link (a ``takd`` link's only teacher; an
    ``hpmkd`` link's teachers are the pipeline's teachers and the earlier link), or, for the first link, the
    teachers themselves."""
    return [t for t in teachers if "chain_index" in t.outputs] or teachers


def pass_through(stage: Stage, ctx: ExperimentContext, run: StageRun, previous: StageResult) -> StageOutcome:
    """A chain link after the chain stopped: no training; its output, and its metrics, are its predecessor's model's."""
    log.info("stage %s: the chain stopped (epsilon rule), passing %s on", stage.name, previous.outputs["teacher"])
    ctx.tracker.log_artifact(run.run_id, previous.outputs["model_path"], "checkpoint")
    ctx.tracker.set_tags(run.run_id, {"chain_status": "skipped", "forwarded_from": previous.outputs["teacher"]})
    metrics = {k: v for k, v in previous.metrics.items() if k != "chain_gain"}  # the model's, not a gain of this link
    return StageOutcome({**metrics, "chain_skipped": 1.0}, {**previous.outputs, "chain_skipped": True})


@contextlib.contextmanager
def distill_setup(stage: Stage, ctx: ExperimentContext, teachers: list[StageResult], run: StageRun,
                  init: StageResult | None = None,
                  reference: StageResult | None = None) -> Iterator[tuple[StageSpec, TeacherOutputPlan]]:
    """The distillation spec for ``teachers`` (finished stages with a model) and its teacher-output plan (actors
    started, cache filled, source recorded on the run); the actors are released when the block ends. The student
    and its recipe are the stage's (:func:`stage_config`); ``init`` / ``reference`` are finished stages whose weights
    the student starts from / whose frozen model it is anchored to."""
    cfg = stage_config(stage, ctx)
    names = [t.outputs.get("teacher", t.name) for t in teachers]
    models = [ModelConfig(t.outputs["model"], t.outputs["options"]) for t in teachers]
    specs = [teacher_spec(n, m, ctx) for n, m in zip(names, models)]
    weights = [t.outputs["model_path"] for t in teachers]
    spec = spec_for(stage, ctx, ModelConfig(cfg.student.model, cfg.student.options), cfg.distill_train(),
                    distill=cfg.distill, teacher_names=names, teacher_models=models,
                    init_state=None if init is None else checkpoint.read_model_state(init.outputs["model_path"]),
                    reference_state=None if reference is None else checkpoint.read_model_state(reference.outputs["model_path"]))
    ctx.tracker.set_tags(run.run_id, {"teacher_weights": ",".join(checkpoint.file_digest(w) for w in weights),
                                      **{f"{role}_weights": checkpoint.file_digest(r.outputs["model_path"])
                                         for role, r in (("init", init), ("reference", reference)) if r is not None}})
    plan = prepare_teacher_outputs(cfg, ctx.splits, specs, weights, teacher_taps_needed(spec, ctx.splits))
    try:
        ctx.tracker.set_tags(run.run_id, {"teacher_outputs": plan.source})
        if plan.uses:
            ctx.tracker.log_params(run.run_id, plan.cache_params())
            ctx.tracker.log_metrics(run.run_id, plan.cache_metrics())
        yield replace(spec, view_bank=plan.view_bank), plan
    finally:
        plan.release()
