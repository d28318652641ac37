"""The ``tune`` stage: Ray Tune searches the distillation configuration, seeded with the configuration manager's
proposals, and hands the best configuration (on validation) to the stages that depend on it.

* **Start**: the task's meta-features (data, teachers just trained or loaded, student) and the proposals
  (:mod:`hpmkd.components.config_manager`: memory or published defaults) are logged (``proposals.json``, tag
  ``proposal_source``). The proposals are Tune's ``points_to_evaluate``: they are the first trials, the searcher
  (``random``, or ``optuna``'s TPE) samples the rest of ``config_manager.trials`` from ``search_space``.
* **Trials** train at the search's fidelity (:func:`hpmkd.search_trials.trial_spec`): ``budget_epochs`` epochs (null: the
  distillation stage's whole schedule) on a stratified ``trial_fraction`` of the training split, scored by their best
  validation accuracy (``best_val_acc``), optionally stopped early by ASHA (``scheduler: asha``). A trial is a Tune
  *function trainable* that runs :func:`hpmkd.training.train_stage` in its own process with a plain-PyTorch
  :class:`~hpmkd.training.StageEnv` (one device, no DDP), its teachers served exactly as a ``distill`` stage's are
  (logit cache or actors). Not Ray Train: a ``TorchTrainer`` per trial costs 10-20 s of fixed start-up
  (measured with Ray 2.60) for a few seconds of work, and a trial killed by ASHA leaves its Train placement group to
  a cleaner; a function trainable starts in about a second and reports Tune checkpoints that ASHA and
  ``Tuner.restore`` use directly (and Tune reuses a finished trial's process for the next one). Trials run side
  by side as the cluster allows (``max_concurrent``, or the cluster's CPUs over ``cpus_per_trial``), each asking
  ``cpus_per_trial`` / ``gpus_per_trial``.
* **Records**: each trial is an MLflow run nested under the tune stage's run (tag ``kind = trial``): its config
  keys as params, ``val_acc`` / ``best_val_acc`` per epoch, the Ray node its process ran on (tag
  ``placement.node_id``); when the search ends, each trial is closed (FINISHED, tag ``early_stopped`` when ASHA
  stopped it; FAILED with its error) and written to the optimisation memory. The stage's placement
  (:mod:`hpmkd.components.placement`) lists its finished trials' nodes.
* **Resume**: the Tune experiment is named after the stage run under ``ray.storage_path``, or, when an earlier run
  of the same stage was interrupted, after that run (:func:`hpmkd.components.stages.resume_key`); a stage that
  finds it (``Tuner.can_restore``) calls ``Tuner.restore``: finished trials are kept, unfinished and errored ones
  continue from their last per-epoch checkpoint, and their MLflow runs are picked up again. With ``reuse: false``
  nothing is restored, the search starts afresh. The state is checked before it is restored
  (:mod:`hpmkd.components.tune_storage`): a search whose state a killed driver cut off is set aside and started
  again, with a warning, rather than half-restored.
* **Output**: ``overrides`` (the config key paths of the best configuration), which every stage depending on this
  one runs with (:func:`hpmkd.components.stages.configured`); plus the proposals, their source and the chosen config.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import torch
from mlflow import MlflowClient
from ray import tune

from hpmkd import checkpoint
from hpmkd.components import progress
from hpmkd.components.config_manager import budget_epochs, fixed_for, memory_records, proposals_for, source_of
from hpmkd.components.graph import Stage, StageOutcome, StageResult
from hpmkd.components.memory import make_record, remember, task_features
from hpmkd.components.placement import NODE_ID_TAG, cluster_nodes, placement, placement_tags
from hpmkd.components.stage_params import Distill, Tune, TunedConfig
from hpmkd.components.stage_worker import worker_teachers
from hpmkd.components.stages.base import (STAGE_KINDS, ExperimentContext, StageKind, StageRun, resume_key,
                                         storage_name)
from hpmkd.components.stages.distill import distill_setup
from hpmkd.components.tune_storage import resumable, search_storage
from hpmkd.components.tracking import log_metrics, log_params
from hpmkd.config import ExperimentConfig, Recipe
from hpmkd.meta_features import TaskFeatures
from hpmkd.registry import Registry
from hpmkd.search_space import HYPERPARAMETERS, SearchSpace, build_space
from hpmkd.training import NonFiniteLossError, StageEnv, StageSpec, train_stage
from hpmkd.search_trials import trial_spec

log = logging.getLogger("hpmkd")

METRIC = "best_val_acc"  # best validation accuracy so far: what ASHA, the searcher and the final choice compare
# Trial checkpoints are all kept while the search runs (CheckpointConfig(num_to_keep=None)), and the experiment
# state is snapshotted at every step of Tune's loop (TUNE_GLOBAL_CHECKPOINT_S=0; one small JSON file per step).
# With num_to_keep=1, Tune deleted a trial's previous checkpoint when it registered the next one, before the snapshot
# naming the new one was written: a driver killed in between left a state pointing at a deleted checkpoint, and the
# restored trial failed ("does not exist on storage anymore"). Now a state that lags resumes from an older
# checkpoint that still exists. The checkpoints are deleted once the search has finished (prune_checkpoints).
SNAPSHOT_PERIOD = "TUNE_GLOBAL_CHECKPOINT_S"
SNAPSHOT_PERIOD_S = "0"
# Tune's console output: Ray 2.60's newer engine prints the search's configuration box and its result folders even at
# verbose=0; the older one ("0") prints nothing there. hpmkd shows the trials itself (components.progress).
OUTPUT_ENGINE = "RAY_AIR_NEW_OUTPUT"
OUTPUT_ENGINE_QUIET = "0"

SEARCHERS: Registry[Any] = Registry("searcher")
SCHEDULERS: Registry[Any] = Registry("scheduler")


@SEARCHERS.register("random")
def random_searcher(points: list[dict[str, float]], seed: int, max_concurrent: int) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed, max_concurrent=max_concurrent)


@SEARCHERS.register("optuna")
def optuna_searcher(points: list[dict[str, float]], seed: int, max_concurrent: int) -> Any:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points or None, seed=seed), max_concurrent=max_concurrent)


@SCHEDULERS.register("asha")
def asha(grace_period: int, reduction_factor: float, budget: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=budget, grace_period=min(grace_period, budget),
                         reduction_factor=reduction_factor)


@SCHEDULERS.register("fifo")
def fifo(grace_period: int, reduction_factor: float, budget: int) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


@dataclass
class TrialSetup:
    """What every trial needs, shipped once through the object store (``tune.with_parameters``)."""

    cfg: ExperimentConfig
    recipe: Recipe
    spec: StageSpec
    space: SearchSpace
    budget: int
    threads: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tune_key: str
    stage_name: str
    teacher_actors: list[Any]
    teacher_cache: list[list[str]]
    progress_hub: Any = None  # each trial's epochs are shown live, as row ``<stage>/<trial id>``

    def trial_spec(self, config: dict[str, float]) -> StageSpec:
        """The distillation spec with ``config`` applied at the trial's fidelity (:func:`trial_spec`)."""
        return trial_spec(self.spec, self.recipe, self.space.overrides(config), self.budget,
                          self.cfg.config_manager.trial_fraction)


def trial_runs(client: MlflowClient, experiment_id: str, tune_key: str) -> dict[str, Any]:
    """The MLflow runs of the trials of the tune stage with content key ``tune_key``, by trial id."""
    runs = client.search_runs([experiment_id], f"tags.tune_key = '{tune_key}' and tags.kind = 'trial'",
                              max_results=10000)
    return {r.data.tags["trial_id"]: r for r in runs}


def trial_run(client: MlflowClient, setup: TrialSetup, trial_id: str, config: dict[str, float]) -> str:
    """The trial's MLflow run: found again when the trial resumes, created (nested under the tune stage) otherwise."""
    found = client.search_runs([setup.experiment_id], f"tags.tune_key = '{setup.tune_key}' and tags.trial_id = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "mlflow.parentRunId", setup.parent_run_id)
        return run_id
    run = client.create_run(setup.experiment_id, run_name=f"trial_{trial_id}", tags={
        "kind": "trial", "stage": f"{setup.stage_name}/{trial_id}", "trial_id": trial_id, "tune_key": setup.tune_key,
        "mlflow.parentRunId": setup.parent_run_id})
    log_params(client, run.info.run_id, {**setup.space.overrides(config), "budget_epochs": setup.budget})
    return run.info.run_id


def run_trial(config: dict[str, float], setup: TrialSetup) -> None:
    """Tune function trainable: train one configuration in this process, one Tune report (and checkpoint) per epoch."""
    torch.set_num_threads(setup.threads)
    client = MlflowClient(setup.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    run_id = trial_run(client, setup, trial_id, config)
    client.set_tag(run_id, NODE_ID_TAG, ray.get_runtime_context().get_node_id())
    resume = None
    if (saved := tune.get_checkpoint()) is not None:
        with saved.as_directory() as folder:
            resume = checkpoint.load(Path(folder) / checkpoint.STATE_FILE)
    best = resume["best"]["val_acc"] if resume else 0.0
    done = resume["epoch"] + 1 if resume else 0

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        nonlocal best, done
        best, done = max(best, metrics["val_acc"]), int(metrics["epoch"]) + 1
        metrics = {**metrics, METRIC: best, "epochs_run": float(done)}
        # Recorded before the report: Tune may end the trial at the report (ASHA, max_t), and nothing after it runs.
        # (So a crash between the two can record one epoch twice; it is retrained from the previous checkpoint.)
        log_metrics(client, run_id, metrics, step=int(metrics["epoch"]))
        progress.send(setup.progress_hub, f"{setup.stage_name}/{trial_id}", setup.budget, metrics)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save_atomic(state, Path(folder) / checkpoint.STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    env = StageEnv(device=device, resume_state=resume, report=report,
                   teachers=worker_teachers(setup.spec.teacher_names, setup.teacher_actors, setup.teacher_cache, 0))
    try:
        train_stage(setup.trial_spec(config), env)
    except NonFiniteLossError as err:  # a diverging configuration is a (bad) result, not a crash
        client.set_tag(run_id, "diverged", str(err))
        tune.report({"val_acc": 0.0, METRIC: best, "epochs_run": float(done), "diverged": 1.0})


def concurrency(cfg: ExperimentConfig) -> int:
    """``config_manager.max_concurrent``, or as many trials as the cluster's CPUs (and GPUs) hold."""
    cm = cfg.config_manager
    if cm.max_concurrent:
        return cm.max_concurrent
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // cm.cpus_per_trial)
    if cm.gpus_per_trial:
        fits = min(fits, int(resources.get("GPU", 0) // cm.gpus_per_trial))
    return max(1, fits)


def experiment_path(storage_path: str, name: str) -> str:
    """Where Tune keeps the search ``name`` (its state and trial checkpoints)."""
    return f"{storage_path.rstrip('/')}/{name}"


def make_tuner(setup: TrialSetup, points: list[dict[str, float]], name: str,
               storage: tuple[pyarrow.fs.FileSystem, str]) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the one restored from ``name`` in ``storage`` (True) when an earlier run of the stage left a
    whole state there (:mod:`hpmkd.components.tune_storage`)."""
    cm = setup.cfg.config_manager
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": cm.cpus_per_trial, "gpu": cm.gpus_per_trial})
    os.environ.setdefault(SNAPSHOT_PERIOD, SNAPSHOT_PERIOD_S)  # read when Tuner.fit builds its controller
    os.environ.setdefault(OUTPUT_ENGINE, OUTPUT_ENGINE_QUIET)  # read when Tuner.fit starts
    fs, root = storage
    path = experiment_path(root, name)
    if resumable(fs, path):
        log.info("tune: restoring the search from %s (finished trials are kept)", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs), True
    space = {d.name: (tune.loguniform if d.log else tune.uniform)(d.low, d.high) for d in setup.space.dims}
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=cm.trials, reuse_actors=True,  # no process start per trial
            search_alg=SEARCHERS.get(cm.searcher, "config_manager.searcher")(points, setup.cfg.seed,
                                                                             concurrency(setup.cfg)),
            scheduler=SCHEDULERS.get(cm.scheduler, "config_manager.scheduler")(cm.grace_period, cm.reduction_factor,
                                                                                setup.budget)),
        run_config=tune.RunConfig(name=name, storage_path=root, storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cm.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
    )
    return tuner, False


def prune_checkpoints(fs: pyarrow.fs.FileSystem, path: str) -> int:
    """Delete the trial checkpoints of the finished search at ``path`` on ``fs`` (a rerun of a finished stage never
    restores the search); returns how many were deleted."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    folders = [f.path for f in found if f.type == pyarrow.fs.FileType.Directory and f.base_name.startswith("checkpoint_")]
    for folder in folders:
        fs.delete_dir(folder)
    return len(folders)


@dataclass
class TrialOutcome:
    run_id: str
    config: dict[str, float]
    best_val_acc: float
    epochs: int
    early_stopped: bool
    node_id: str


def close_trials(client: MlflowClient, setup: TrialSetup, grid: Any, task: TaskFeatures) -> dict[str, TrialOutcome]:
    """End every trial's MLflow run (under this stage's run, tag ``trial_index``: the order Tune created the trials,
    proposals first) and write the finished ones to the memory; returns the trials that produced a result, by id, in
    that order."""
    results = {r.metrics["trial_id"]: (i, r) for i, r in enumerate(grid)  # the grid keeps the creation order
               if r.metrics and "trial_id" in r.metrics}
    errors = [r.error for r in grid if r.error is not None]
    closed = {}
    runs = trial_runs(client, setup.experiment_id, setup.tune_key)
    for trial_id in sorted(runs, key=lambda t: results.get(t, (len(results), None))[0]):
        run = runs[trial_id]
        run_id = run.info.run_id
        client.set_tag(run_id, "mlflow.parentRunId", setup.parent_run_id)
        index, result = results.get(trial_id, (None, None))
        if index is not None:
            client.set_tag(run_id, "trial_index", str(index))
        if result is None or result.error is not None:
            error = result.error if result is not None else "the trial never reported"
            client.set_tag(run_id, "error", str(error)[:5000])
            client.set_terminated(run_id, "FAILED")
            continue
        outcome = TrialOutcome(run_id, {k: float(v) for k, v in result.config.items()}, float(result.metrics[METRIC]),
                               int(result.metrics["epochs_run"]), False, run.data.tags.get(NODE_ID_TAG, ""))
        outcome.early_stopped = outcome.epochs < setup.budget and not result.metrics.get("diverged")
        client.set_tag(run_id, "early_stopped", str(outcome.early_stopped).lower())
        remember(client, make_record(task, outcome.config, outcome.best_val_acc, outcome.epochs, "trial", run_id,
                                     setup.cfg.config_manager.trial_fraction))
        client.set_terminated(run_id, "FINISHED")
        closed[trial_id] = outcome
    if errors:
        log.warning("tune: %d trial(s) failed: %s", len(errors), "; ".join(str(e)[:200] for e in errors))
    return closed


@STAGE_KINDS.register("tune")
class TuneKind(StageKind):
    """Search the distillation configuration (:class:`~hpmkd.components.stage_params.Tune`; module docstring)."""

    record_type = TunedConfig

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: Tune = stage.params
        cfg = ctx.cfg
        teachers = [inputs[d] for d in params.teachers]
        space = build_space(cfg)
        task = task_features(cfg, ctx.splits, teachers, params.student.count_params(ctx.splits.shape))
        client = ctx.tracker.client
        records = memory_records(cfg, client)
        proposals, fixed = proposals_for(cfg, task, space, records), fixed_for(cfg, task, records)
        source = source_of(proposals)
        ctx.tracker.log_dict(run.run_id, {"task": task.to_dict(), "proposals": [p.to_dict() for p in proposals],
                                          "proposed_only": [p.to_dict() for p in fixed]}, "proposals.json")
        ctx.tracker.set_tags(run.run_id, {"proposal_source": source})
        log.info("tune: %d proposal(s) from %s: %s", len(proposals), source, [p.config for p in proposals])
        search = resume_key(ctx, run)  # the trials' tag tune_key, and the search's name
        before = trial_runs(client, ctx.tracker.experiment_id, search)
        distill = Distill(params.student, params.recipe, params.teachers)
        with distill_setup(stage, ctx, distill, inputs, run) as (spec, plan):
            setup = TrialSetup(cfg, params.recipe, spec, space, budget_epochs(cfg),
                               max(1, int(params.config_manager.cpus_per_trial)), ctx.tracker.tracking_uri,
                               ctx.tracker.experiment_id, run.run_id, search, stage.name, list(plan.pools), plan.cache,
                               ctx.progress_hub)
            name = storage_name(ctx, stage, search)
            storage = search_storage(ctx.storage_path)
            tuner, restored = make_tuner(setup, [p.config for p in proposals], name, storage)
            grid = tuner.fit()
        ctx.tracker.set_tags(run.run_id, {"restored": str(restored).lower()})
        closed = close_trials(client, setup, grid, task)
        log.info("tune: deleted %d trial checkpoint(s) of the finished search",
                 prune_checkpoints(storage[0], experiment_path(storage[1], name)))
        if not closed:
            raise RuntimeError(f"stage {stage.name!r}: every one of the {len(grid)} trials failed; see their runs' "
                               f"error tags (first: {next((r.error for r in grid if r.error), None)}).")
        best_id, best = max(closed.items(), key=lambda item: item[1].best_val_acc)
        metrics = {"val_acc": best.best_val_acc, "trials": float(len(grid)),
                   "trials_failed": float(len(grid) - len(closed)), "trials_restored": float(len(before) if restored else 0),
                   "trials_early_stopped": float(sum(t.early_stopped for t in closed.values()))}
        chosen, overrides = dict(best.config), space.overrides(best.config)
        for hp, value in ((n, v) for p in fixed for n, v in p.config.items()):  # proposed, not searched
            chosen[hp] = value
            overrides.update(HYPERPARAMETERS[hp].overrides(value, None))
        tuned = TunedConfig(overrides, chosen, source, [p.to_dict() for p in proposals + fixed], best_id, best.run_id,
                            restored, setup.budget)
        ctx.tracker.log_dict(run.run_id, {"config": chosen, "overrides": overrides, "best_trial": best_id},
                             "chosen.json")
        where = placement([t.node_id for t in closed.values() if t.node_id], cluster_nodes())
        ctx.tracker.set_tags(run.run_id, placement_tags(where))
        return StageOutcome(metrics, record=tuned, placement=where)
