"""Run one training stage on Ray: :func:`hpmkd.training.train_stage` in the processes of a stage executor.

Two executors (``ray.executor``), registered in :data:`EXECUTORS`, run the same loop bit for bit:

* ``train`` (:mod:`hpmkd.components.train_executor`): a Ray Train ``TorchTrainer``, one worker per rank; the only one
  that runs several workers (DDP, ``ray.num_workers > 1``);
* ``task`` (:mod:`hpmkd.components.task_executor`): one Ray task in a pooled worker process, without Ray Train's
  controller and worker group, for a stage of one worker (what ``auto``, the default, picks for it).

Both checkpoint every epoch under ``ray.storage_path`` and resume from it (a restarted worker, a rerun of an
interrupted stage), log each epoch to the stage's MLflow run exactly once, after its checkpoint, report it to the
live progress display (:mod:`hpmkd.components.progress`), and record the node of every rank
(:mod:`hpmkd.components.placement`). The stage's selected predictor (:mod:`hpmkd.predictors`) is written from the
last checkpoint as ``model.pt``, and the stage's phases (:mod:`hpmkd.phases`) come back with its metrics. The worker
returns its selected predictor's test predictions; the test metrics are computed from them here, in the driver
(:func:`hpmkd.evaluation.measure`), so no worker process imports the metrics' libraries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpmkd import checkpoint
from hpmkd.components.placement import cluster_nodes, placement
from hpmkd.components.stage_launch import Executed, StageLaunch
from hpmkd.components.task_executor import run_on_task
from hpmkd.components.train_executor import run_on_train
from hpmkd.config import RayConfig
from hpmkd.evaluation import measure
from hpmkd.phases import Phases
from hpmkd.predictors import save_predictor
from hpmkd.selection import selected_payload

#: ``ray.executor`` -> how a stage is run
EXECUTORS: dict[str, Callable[[StageLaunch], Executed]] = {"train": run_on_train, "task": run_on_task}


def executor_name(ray_cfg: RayConfig) -> str:
    """The executor ``ray.executor`` names; for ``auto``: ``task`` with one worker, ``train`` with several."""
    if ray_cfg.executor != "auto":
        return ray_cfg.executor
    return "task" if ray_cfg.num_workers == 1 else "train"


@dataclass
class TrainedStage:
    """What a training stage leaves behind: its metrics, where its files are, and where its ranks ran
    (:func:`hpmkd.components.placement.placement`)."""

    metrics: dict[str, Any]
    state_path: Path
    model_path: Path
    phases: dict[str, float]
    placement: dict[str, Any]


def run_training_stage(launch: StageLaunch, out_dir: Path) -> TrainedStage:
    """Fit ``launch.spec`` with the executor of ``launch.ray_cfg``; a rerun with the same ``launch.train_run_name``
    resumes from its checkpoint. ``state.pt`` and ``model.pt`` are written to ``out_dir``, each atomically."""
    try:
        executed = EXECUTORS[executor_name(launch.ray_cfg)](launch)
    except Exception as err:  # Ray wraps the worker's exception; surface its own message first
        raise StageFailedError(f"stage {launch.spec.name!r} failed: {root_message(err)}") from err
    result = executed.result
    phases = Phases()
    phases.update(result.pop("phases"))
    phases.add("fit_end", time.time() - result.pop("returned_at"))  # the workers stopped, the result back
    if (predicted := result.pop("final_predictions", None)) is not None:  # the worker predicted; measured here
        with phases.timed("test"):
            result.update(measure(predicted, launch.spec.evaluation))
    with phases.timed("copy_out"):
        out_dir.mkdir(parents=True, exist_ok=True)
        state = executed.last_state()
        state_path = out_dir / checkpoint.STATE_FILE
        checkpoint.save_atomic(state, state_path)
        model_path = out_dir / checkpoint.MODEL_FILE
        save_predictor(selected_payload(state), model_path)
    return TrainedStage(result, state_path, model_path, phases.seconds, placement(result["rank_nodes"], cluster_nodes()))


class StageFailedError(RuntimeError):
    """A stage's training failed; the message starts with the worker's own error."""


def root_message(err: BaseException) -> str:
    """The worker's own ``Type: message`` from a Ray-wrapped exception: that of the lowest failed rank of a Ray Train
    worker group, or a Ray task's cause (whole: Ray Train cuts the long error text it shows to 1,000 characters);
    otherwise the innermost error's last ``...Error:`` line."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        err = failures[min(failures)]
    cause = getattr(err, "cause", None)  # a RayTaskError carries the exception the worker raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip()}"
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen)
    for line in reversed(text.splitlines()):
        if "Error:" in line or "Exception:" in line:
            return line.strip()
    return f"{type(seen).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}"
