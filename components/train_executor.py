"""The ``train`` stage executor: a Ray Train ``TorchTrainer`` whose workers run one stage, one rank each.

It follows Ray's ``train_func(config)`` pattern and works the same with one CPU worker or many GPU workers
(``ray.num_workers``, ``ray.use_gpu``; several workers train with DDP). Every epoch, rank 0 writes a full
checkpoint (model, optimiser, scheduler, epoch, RNG, the selection's state, history) through ``ray.train.report``;
a failed worker group is restarted from it (``FailureConfig(max_failures)``), and a rerun with the same Train run
name resumes from it. The epoch's metrics reach the stage's MLflow run from the Train controller
(:class:`EpochLogger`), only once the epoch's checkpoint is registered: an epoch seen in MLflow is never trained
again, and each is logged exactly once however often the worker group restarts. A run whose Train snapshot a killed
driver cut off mid-write resumes from its newest whole checkpoint (:mod:`hpmkd.components.train_snapshot`). Every
rank reports its Ray node, so the stage records where it ran (:mod:`hpmkd.components.placement`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from mlflow import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hpmkd import checkpoint
from hpmkd.components import progress
from hpmkd.components.stage_launch import Executed, StageLaunch
from hpmkd.components.stage_worker import run_rank, shared_splits, worker_teachers
from hpmkd.components.train_snapshot import recover_cut_snapshot
from hpmkd.components.tracking import log_metrics
from hpmkd.training import StageEnv, StageSpec


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry point: one rank of one stage."""
    began = time.time()
    spec: StageSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    resume = None
    if (ckpt := ray.train.get_checkpoint() or config.get("recovered")) is not None:
        with ckpt.as_directory() as folder:
            resume = checkpoint.load(Path(folder) / checkpoint.STATE_FILE)
    splits = shared_splits(config)
    fetched = time.time()

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if state is not None:
                checkpoint.save_atomic(state, Path(folder) / checkpoint.STATE_FILE)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)
        if rank == 0:
            progress.send(config.get("progress"), spec.name, spec.train.epochs, metrics)

    def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(t)
            t = t / world
        return t

    rank_nodes = gather_node_ids(world)
    env = StageEnv(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        # Some parameters get no gradient on some steps (a meta-learned temperature, attention with one teacher, DKD
        # before warm-up), so DDP must look for unused parameters.
        wrap=lambda module: ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True}),
        resume_state=resume,
        report=report,
        teachers=worker_teachers(config["teacher_names"], config["teacher_actors"], config["teacher_cache"], rank),
        all_reduce_mean=all_reduce_mean,
        splits=splits,
        measure_test=False,  # the driver measures (hpmkd.components.stage_runner)
    )
    return {**run_rank(config, env, began, fetched), "rank_nodes": rank_nodes}


def gather_node_ids(world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all ranks call it)."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return every


class EpochLogger(ray.train.UserCallback):
    """Log each epoch's metrics (rank 0's) to the stage's MLflow run, on the Train controller.

    The controller calls ``after_report`` only once every rank has reported and the epoch's checkpoint is registered
    and saved to storage, so a worker group that dies between reporting and registering retrains that epoch without
    it having been logged, and one that dies after retrains from the next epoch: every epoch is logged exactly once.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        log_metrics(self._client, self.run_id, metrics[0], step=int(metrics[0]["epoch"]))


def run_on_train(launch: StageLaunch) -> Executed:
    """Fit ``launch`` with a ``TorchTrainer`` of ``ray.num_workers`` workers."""
    ray_cfg = launch.ray_cfg
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**launch.worker_config(),
                           "recovered": recover_cut_snapshot(launch.storage_path, launch.train_run_name)},
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=launch.train_run_name,
            storage_path=launch.storage_path,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[EpochLogger(launch.tracking_uri, launch.run_id)] if launch.run_id else None,
        ),
    )
    result = trainer.fit()

    def last_state() -> dict[str, Any]:
        with result.checkpoint.as_directory() as folder:
            return checkpoint.load(Path(folder) / checkpoint.STATE_FILE)

    return Executed(result.return_value, last_state)
