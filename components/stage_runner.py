"""Run one training stage on Ray Train: ``TorchTrainer`` workers execute :func:`hpmkd.training.train_stage`.

The worker function follows Ray's ``train_func(config)`` pattern and works the same with one CPU worker or many GPU
workers (``ray.num_workers``, ``ray.use_gpu``). Every epoch, rank 0 writes a full checkpoint (model, optimiser,
scheduler, epoch, RNG, the selection's state, history) through ``ray.train.report``; a failed worker group is
restarted from it (``FailureConfig(max_failures)``), and a rerun with the same Train run name resumes from it. The
epoch's metrics reach the stage's MLflow run from the Train controller (:class:`EpochLogger`), only once the epoch's
checkpoint is registered: an epoch seen in MLflow is never trained again, and each is logged exactly once however
often the worker group restarts. The stage's selected predictor (:mod:`hpmkd.predictors`) is
written from the last checkpoint as ``model.pt``. A run whose Train snapshot a killed driver cut off mid-write resumes
from its newest whole checkpoint (:mod:`hpmkd.components.train_snapshot`). Rank 0 reports each epoch to the live
progress display (:mod:`hpmkd.components.progress`), and the stage's phases (:mod:`hpmkd.phases`) come back with its metrics.
Every rank reports its Ray node, so the stage records where it ran (:mod:`hpmkd.components.placement`); a rank
whose node lacks the data set fails naming that node and the folders searched.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from mlflow import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hpmkd.components import progress
from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.placement import cluster_nodes, node_name, placement
from hpmkd.components.teacher_service import ActorTeachers
from hpmkd.components.train_snapshot import recover_cut_snapshot
from hpmkd.components.tracking import log_metrics
from hpmkd import checkpoint
from hpmkd.config import RayConfig
from hpmkd.data.base import DatasetNotFoundError
from hpmkd.phases import Phases
from hpmkd.predictors import save_predictor
from hpmkd.selection import selected_payload
from hpmkd.teachers import TeacherSource
from hpmkd.training import StageEnv, StageSpec, train_stage


def worker_teachers(names: list[str], actors: list[Any], cache: list[list[str]], rank: int) -> TeacherSource | None:
    """Where a training process gets its teachers' outputs: the cache entries when given, else the actors."""
    if cache:
        return CachedTeachers(names, cache)
    if actors:
        return ActorTeachers(names, actors, start=rank)
    return None


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
    splits = ray.get(config["splits"]) if config.get("splits") is not None else None
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
    teachers = worker_teachers(config["teacher_names"], config["teacher_actors"], config["teacher_cache"], rank)
    env = StageEnv(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        # Some parameters get no gradient on some steps (a meta-learned temperature, attention with one teacher, DKD
        # before warm-up), so DDP must look for unused parameters.
        wrap=lambda module: ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True}),
        resume_state=resume,
        report=report,
        teachers=teachers,
        all_reduce_mean=all_reduce_mean,
        splits=splits,
    )
    try:
        out = train_stage(spec, env)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(f"rank {rank} of stage {spec.name!r} runs on Ray node {this_node()}, where data "
                                   f"set {spec.data.name!r} is missing (every node needs its own copy, or a "
                                   f"data.root on shared storage): {err}") from None
    out["phases"]["worker_start"] = began - config["launched_at"]  # controller, worker actors, process group
    out["phases"]["setup"] += fetched - began  # the resume state and the data, read before the loop
    out["returned_at"] = time.time()
    return {**out, "rank_nodes": rank_nodes}


def gather_node_ids(world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all ranks call it)."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return every


def this_node() -> str:
    """This process's Ray node: its name, address and id."""
    node_id = ray.get_runtime_context().get_node_id()
    return f"{node_name(node_id, cluster_nodes())} ({ray.util.get_node_ip_address()}, node id {node_id})"


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


@dataclass
class TrainedStage:
    """What a training stage leaves behind: its metrics, where its files are, and where its ranks ran
    (:func:`hpmkd.components.placement.placement`)."""

    metrics: dict[str, Any]
    state_path: Path
    model_path: Path
    phases: dict[str, float]
    placement: dict[str, Any]


def run_training_stage(
    spec: StageSpec,
    *,
    train_run_name: str,
    storage_path: str,
    out_dir: Path,
    ray_cfg: RayConfig,
    tracking_uri: str,
    run_id: str | None,
    teacher_actors: list[Any] = (),
    teacher_cache: list[list[str]] = (),
    progress_hub: Any = None,
    splits_ref: Any = None,
) -> TrainedStage:
    """Fit ``spec`` with a ``TorchTrainer``; a rerun with the same ``train_run_name`` resumes from its checkpoint.

    Teachers come from ``teacher_actors`` (one :class:`TeacherPool` per teacher) or, when given, from the cache
    entries ``teacher_cache[view][teacher]``. Rank 0 reports each epoch to ``progress_hub`` when given.
    ``splits_ref``: an object-store reference to the splits of ``spec.data`` and ``spec.seed``, which the workers then
    read (zero-copy on the driver's node) instead of loading the data set themselves.
    """
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "spec": spec,
            "threads": max(1, int(ray_cfg.cpus_per_worker)),
            "teacher_names": spec.teacher_names,
            "teacher_actors": list(teacher_actors),
            "teacher_cache": list(teacher_cache),
            "progress": progress_hub,
            "splits": splits_ref,
            "launched_at": time.time(),
            "recovered": recover_cut_snapshot(storage_path, train_run_name),
        },
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=train_run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[EpochLogger(tracking_uri, run_id)] if run_id else None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; surface its own message first
        raise StageFailedError(f"stage {spec.name!r} failed: {root_message(err)}") from err
    phases = Phases()
    phases.update(result.return_value.pop("phases"))
    phases.add("fit_end", time.time() - result.return_value.pop("returned_at"))  # worker group shut down
    with phases.timed("copy_out"):
        out_dir.mkdir(parents=True, exist_ok=True)
        state_path = out_dir / checkpoint.STATE_FILE
        with result.checkpoint.as_directory() as folder:
            state = checkpoint.load(Path(folder) / checkpoint.STATE_FILE)
        checkpoint.save_atomic(state, state_path)
        model_path = out_dir / checkpoint.MODEL_FILE
        save_predictor(selected_payload(state), model_path)
    return TrainedStage(result.return_value, state_path, model_path, phases.seconds,
                        placement(result.return_value["rank_nodes"], cluster_nodes()))


class StageFailedError(RuntimeError):
    """A stage's training failed; the message starts with the worker's own error."""


def root_message(err: BaseException) -> str:
    """The innermost error's ``Type: message`` line from a Ray-wrapped exception."""
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen)
    for line in reversed(text.splitlines()):
        if "Error:" in line or "Exception:" in line:
            return line.strip()
    return f"{type(seen).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}"
