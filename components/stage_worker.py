"""What every stage executor does in the process that trains: find the teachers' outputs, run
:func:`hpmkd.training.train_stage` in a :class:`~hpmkd.training.StageEnv`, and name the node when its data set is
missing. Both executors (:mod:`hpmkd.components.train_executor`, :mod:`hpmkd.components.task_executor`) call
:func:`run_rank` with their own environment, so a stage trains the same way, bit for bit, whichever runs it.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.placement import cluster_nodes, node_name
from hpmkd.components.teacher_service import ActorTeachers
from hpmkd.data.base import DatasetNotFoundError
from hpmkd.teachers import TeacherSource
from hpmkd.training import StageEnv, train_stage


def worker_teachers(names: list[str], actors: list[Any], cache: list[list[str]], rank: int) -> TeacherSource | None:
    """Where a training process gets its teachers' outputs: the cache entries when given, else the actors."""
    if cache:
        return CachedTeachers(names, cache)
    if actors:
        return ActorTeachers(names, actors, start=rank)
    return None


def run_rank(config: dict[str, Any], env: StageEnv, began: float, fetched: float) -> dict[str, Any]:
    """Train ``config["spec"]`` in ``env`` (one rank); its result with the phases the executor adds: ``worker_start``
    (from the launch, ``config["launched_at"]``, to ``began``) and the resume state and data read before the loop
    (``began`` to ``fetched``) added to ``setup``; ``returned_at`` stamps the return."""
    spec = config["spec"]
    try:
        out = train_stage(spec, env)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(f"rank {env.rank} of stage {spec.name!r} runs on Ray node {this_node()}, where "
                                   f"data set {spec.data.name!r} is missing (every node needs its own copy, or a "
                                   f"data.root on shared storage): {err}") from None
    out["phases"]["worker_start"] = began - config["launched_at"]
    out["phases"]["setup"] += fetched - began
    out["returned_at"] = time.time()
    return out


def shared_splits(config: dict[str, Any]) -> Any:
    """The driver's splits from the object store, or ``None`` (the worker loads the data set itself)."""
    return ray.get(config["splits"]) if config.get("splits") is not None else None


def this_node() -> str:
    """This process's Ray node: its name, address and id."""
    node_id = ray.get_runtime_context().get_node_id()
    return f"{node_name(node_id, cluster_nodes())} ({ray.util.get_node_ip_address()}, node id {node_id})"
