"""Run one experiment end to end: validate, plan the stage graph, run it on Ray, record it in MLflow, summarise.

Everything that can be checked without Ray is checked first (the config, then :func:`hpmkd.pipelines.preflight
.preflight`: data and labels, every model and objective built on the meta device, teacher checkpoints), so bad
input fails in seconds and records nothing half-done; so does a stage that asks for more CPUs or GPUs than the Ray
cluster has (:func:`hpmkd.components.placement.check_resources`, once Ray is up). The experiment gets one parent
MLflow run; every stage is a nested run (see ``components.stages``). If a stage fails, the parent run is marked
FAILED, the stages that finished stay FINISHED, and the error is raised after the summary of what did finish. Runs left
``RUNNING`` by an earlier driver that died are marked ``KILLED`` first (:mod:`hpmkd.components.orphans`).

Stages start critical path first (``ray.order``), each one's duration estimated from the store's past runs
(:mod:`hpmkd.components.estimates`); the estimates are in the results next to the actual times. Given a progress
display, every running stage's epochs are shown live (:mod:`hpmkd.components.progress`). The data, loaded once by
the preflight, goes to Ray's object store once, and training processes read it from there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import ray
import yaml

from hpmkd.components import orphans
from hpmkd.components.estimates import estimate_all
from hpmkd.components.graph import Stage, StageResult
from hpmkd.components.progress import Display, ProgressMonitor
from hpmkd.components.placement import check_resources, cluster_nodes
from hpmkd.components.ray_runtime import ensure_ray
from hpmkd.components.scheduler import run_graph
from hpmkd.components.stages import ExperimentContext, execute
from hpmkd.components.tracking import Tracker, default_tracking_uri
from hpmkd.config import ExperimentConfig
from hpmkd.paths import inside, safe_name
from hpmkd.pipelines import plan_experiment
from hpmkd.pipelines.preflight import preflight
from hpmkd.pipelines.summary import summarise

log = logging.getLogger("hpmkd")

#: the parent run's record of a table's preprocessing (:meth:`hpmkd.data.table.TablePreprocessing.record`)
PREPROCESSING_FILE = "preprocessing.json"


class ExperimentFailedError(RuntimeError):
    """A stage failed; ``summary`` holds what finished (those stages stay recorded as FINISHED)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    output: str | None = None,
    ray_init: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    display: Display | None = None,
    checked: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` and return the results dict (also written as JSON to ``output`` when given). Components switched
    off in ``cfg.components`` are replaced first (:func:`hpmkd.pipelines.plan_experiment`): the stages, the scheduler
    and the parent run's params all see that effective config. ``tags`` are added to the parent run's (``hpmkd
    ablate`` marks its variants so). ``display``: where live progress goes (none by default). ``checked``: called once
    everything that can be checked without Ray has passed (the store opened), before Ray starts (``hpmkd run`` sends Ray's and MLflow's
    own messages to a file from there on)."""
    began = time.perf_counter()
    plan = plan_experiment(cfg)
    cfg, stages = plan.cfg, plan.stages
    splits = preflight(plan)
    tracking_uri = tracking_uri or cfg.mlflow.tracking_uri or default_tracking_uri()
    tracker = Tracker(tracking_uri, cfg.experiment, cfg.mlflow.artifact_root)
    if checked is not None:
        checked()
    orphans.sweep(tracker.client, tracker.experiment_id)
    out_root = Path(cfg.output_dir).resolve()
    storage_path = cfg.ray.storage_path or str(out_root / "ray")
    resources = ensure_ray(cfg.ray.address, cfg.ray.num_cpus, tracking_uri, cfg.ray.bind_host,
                           **{"log_to_driver": cfg.ray.log_to_driver, **(ray_init or {})})
    check_resources(stages, cfg.ray, cluster_nodes())  # a stage the cluster cannot hold fails before anything runs
    log.info("experiment %r, pipeline %s: %d stages; MLflow %s", cfg.experiment, cfg.pipeline, len(stages), tracking_uri)

    with tracker.run(
        f"{cfg.pipeline}-seed{cfg.seed}",
        {**(tags or {}), "kind": "pipeline", "pipeline": cfg.pipeline, "data_fingerprint": splits.fingerprint,
         "seed": str(cfg.seed)},
    ) as parent, orphans.heartbeat(tracker.client, parent):
        tracker.log_params(parent, cfg.as_dict())
        tracker.log_text(parent, yaml.safe_dump(cfg.as_dict(), sort_keys=False), "config.yaml")
        if splits.preprocessing is not None:  # a table's fitted preprocessing: what turns raw rows into inputs
            tracker.log_dict(parent, splits.preprocessing, PREPROCESSING_FILE)
        out_dir = inside(out_root, safe_name(cfg.experiment), parent)
        estimates = None
        if cfg.ray.order == "critical_path":
            estimates = estimate_all(stages, len(splits.train), tracker.client)
        monitor = ProgressMonitor(display) if display is not None else None
        ctx = ExperimentContext(cfg, tracker, parent, splits, storage_path, out_dir,
                                monitor.hub if monitor is not None else None,
                                ray.put(splits) if cfg.ray.share_splits else None)
        try:
            results, error = run_graph(stages, shown(monitor, lambda s, inputs: execute(s, ctx, inputs)),
                                       resources.get("CPU", 1.0), cfg.ray.parallel, estimates)
        finally:
            ctx.close()
            if monitor is not None:
                monitor.close()
        summary = summarise(cfg, stages, results, parent, tracking_uri, time.perf_counter() - began, estimates)
        tracker.log_metrics(parent, {k: summary[k] for k in ("retention", "auc_retention", "compression", "wall_s")
                                     if summary.get(k) is not None})
        if summary["student"]:
            tracker.log_metrics(parent, {f"student_{k}": summary["student"][k] for k in ("test_acc", "test_auc")
                                         if k in summary["student"]})
        tracker.log_dict(parent, summary, "results.json")
        if output:
            Path(output).write_text(json.dumps(summary, indent=2))
        if error is not None:
            raise ExperimentFailedError(str(error), summary) from error
    return summary


def shown(monitor: ProgressMonitor | None, run_stage: Callable[[Stage, dict[str, StageResult]], StageResult]
          ) -> Callable[[Stage, dict[str, StageResult]], StageResult]:
    """``run_stage``, telling ``monitor`` (if any) when each stage starts and how it ends."""
    if monitor is None:
        return run_stage

    def run(stage: Stage, inputs: dict[str, StageResult]) -> StageResult:
        monitor.started(stage.name)
        status = "FAILED"
        try:
            result = run_stage(stage, inputs)
            status = "REUSED" if result.reused else result.status
            return result
        finally:
            monitor.finished(stage.name, status)

    return run
