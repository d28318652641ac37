"""What crosses from the stage runner (:mod:`hpmkd.components.stage_runner`) to a stage executor, and back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hpmkd.config import RayConfig
from hpmkd.training import StageSpec


@dataclass
class StageLaunch:
    """One training stage to run: what to train, where its checkpoints live (``storage_path/train_run_name``: a
    rerun with the same name resumes), where its epochs are logged (``run_id`` in ``tracking_uri``; none when
    ``run_id`` is ``None``; ``tracking_relay``: the experiment's :class:`~hpmkd.components.tracking_relay.TrackingRelay`,
    which logs a stage task's epochs, or ``None``: the task executor starts one), its teachers (actors, or logit-cache
    entries ``teacher_cache[view][teacher]``), the live progress hub, and the driver's splits in the object store
    (``splits_ref``, or ``None``: loaded by the worker)."""

    spec: StageSpec
    train_run_name: str
    storage_path: str
    ray_cfg: RayConfig
    tracking_uri: str
    run_id: str | None
    teacher_actors: list[Any] = field(default_factory=list)
    teacher_cache: list[list[str]] = field(default_factory=list)
    progress_hub: Any = None
    splits_ref: Any = None
    tracking_relay: Any = None

    def worker_config(self) -> dict[str, Any]:
        """The training process's ``config`` (Ray's ``train_func(config)``), stamped with the launch time."""
        return {
            "spec": self.spec,
            "threads": max(1, int(self.ray_cfg.cpus_per_worker)),
            "teacher_names": self.spec.teacher_names,
            "teacher_actors": list(self.teacher_actors),
            "teacher_cache": list(self.teacher_cache),
            "progress": self.progress_hub,
            "splits": self.splits_ref,
            "launched_at": time.time(),
        }


@dataclass
class Executed:
    """What an executor hands back: rank 0's result (:func:`hpmkd.components.stage_worker.run_rank`, with
    ``rank_nodes``: every rank's Ray node id) and how to read the state of the stage's last checkpoint."""

    result: dict[str, Any]
    last_state: Callable[[], dict[str, Any]]
