"""The ``task`` stage executor: a one-process stage runs as one Ray task, without Ray Train's controller, worker
group and process group.

A ``TorchTrainer`` costs a stage 6-10 s before its first step on an idle machine (the controller actor, a new worker
process that imports torch and Ray Train, the process group) and more to stop (docs/performance.md). A Ray task runs
in one of Ray's pooled worker processes, which stay alive between tasks with torch and hpmkd already imported, and
gives its CPUs back when it ends; the stage's own loop (:func:`hpmkd.components.stage_worker.run_rank`) is the same,
so it trains bit for bit as on Ray Train. What Ray Train did for such a stage is done here:

* **Checkpoints**: every epoch the full state is saved under ``ray.storage_path`` (:mod:`hpmkd.components.epoch_checkpoints`,
  one kept); a rerun with the same run name resumes from the newest that loads.
* **Failures**: the task is retried up to ``ray.max_failures`` times, for a worker process or node that died and for
  an error raised by the loop alike (``max_retries``, ``retry_exceptions``), and the retry resumes from the last
  checkpoint.
* **MLflow, exactly once**: an epoch is logged only after its checkpoint is saved, and each checkpoint names the
  MLflow run that saved it; a task that died between the two leaves its run's newest epoch saved but not logged,
  which the retry logs (from the resumed history) before training on. An epoch is never logged twice, nor trained
  again once logged. The task does not import MLflow: the experiment's
  :class:`~hpmkd.components.tracking_relay.TrackingRelay` actor logs for it, and the task waits for each call.
* **Placement**: the task records its Ray node, like each Train rank.

``ray.executor: auto`` runs every stage of ``ray.num_workers: 1`` this way and several workers (DDP) on Ray Train
(:mod:`hpmkd.components.train_executor`).
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from hpmkd.components import progress
from hpmkd.components.epoch_checkpoints import EpochCheckpoints
from hpmkd.components.stage_launch import Executed, StageLaunch
from hpmkd.components.stage_worker import run_rank, shared_splits, worker_teachers
from hpmkd.components.tracking_relay import TrackingRelay
from hpmkd.training import StageEnv

#: the name of a stage's Ray task is this prefix and the stage's name (``ray list tasks`` shows it)
TASK_NAME_PREFIX = "hpmkd-stage:"


@ray.remote
def stage_task(config: dict[str, Any]) -> dict[str, Any]:
    """Train one stage in this worker process (see the module docstring)."""
    began = time.time()
    spec = config["spec"]
    torch.set_num_threads(config["threads"])
    store = EpochCheckpoints(config["storage_path"], config["run_name"])
    saved = store.latest()
    relay, run_id = config["tracking_relay"], config["run_id"]
    if relay is not None and saved is not None and saved.owner == run_id:
        ray.get(relay.log_unless_logged.remote(run_id, saved.state["history"][-1]))
    splits = shared_splits(config)
    fetched = time.time()

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        store.save(int(metrics["epoch"]), state, owner=run_id or "")
        if relay is not None:
            ray.get(relay.log_metrics.remote(run_id, metrics, int(metrics["epoch"])))
        progress.send(config.get("progress"), spec.name, spec.train.epochs, metrics)

    device = torch.device("cuda", 0) if config["use_gpu"] else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
    env = StageEnv(
        device=device,
        wrap=lambda module: module.to(device),
        resume_state=saved.state if saved is not None else None,
        report=report,
        teachers=worker_teachers(config["teacher_names"], config["teacher_actors"], config["teacher_cache"], 0),
        splits=splits,
        measure_test=False,  # the driver measures (hpmkd.components.stage_runner)
    )
    return {**run_rank(config, env, began, fetched), "rank_nodes": [ray.get_runtime_context().get_node_id()]}


def run_on_task(launch: StageLaunch) -> Executed:
    """Fit ``launch`` (one worker) as one Ray task of ``ray.cpus_per_worker`` CPUs (and a GPU with ``ray.use_gpu``)."""
    ray_cfg = launch.ray_cfg
    own_relay = TrackingRelay.remote(launch.tracking_uri) if launch.tracking_relay is None and launch.run_id else None
    config = {**launch.worker_config(), "storage_path": launch.storage_path, "run_name": launch.train_run_name,
              "tracking_relay": launch.tracking_relay or own_relay, "run_id": launch.run_id,
              "use_gpu": ray_cfg.use_gpu}
    task = stage_task.options(name=f"{TASK_NAME_PREFIX}{launch.spec.name}", num_cpus=ray_cfg.cpus_per_worker,
                              num_gpus=1 if ray_cfg.use_gpu else 0, max_retries=ray_cfg.max_failures,
                              retry_exceptions=True)
    try:
        result = ray.get(task.remote(config))
    finally:
        if own_relay is not None:  # a launch outside an experiment got a relay of its own
            ray.kill(own_relay)
    store = EpochCheckpoints(launch.storage_path, launch.train_run_name)
    return Executed(result, lambda: store.latest().state)
