"""Where stages run, and whether they can: the cluster's nodes, each stage's placement, and the resource check.

* :func:`cluster_nodes`: the live Ray nodes with their CPUs, GPUs and name (the custom resource ``hpmkd_node_<name>``
  that ``hpmkd cluster up`` gives each node, :mod:`hpmkd.components.local_cluster`; else the node's address).
* :func:`placement`: a stage's placement from the node id of each of its processes: a training stage's Ray Train
  ranks (each rank reports its node id), a search's trials (each trial tags its run with :data:`NODE_ID_TAG`; in the
  order Tune created them), an estimator teacher's one fitting task. It holds the processes ("ranks"), the distinct
  nodes, and the node names; recorded as MLflow tags (``placement.nodes``, ``placement.node_ids``,
  ``placement.ranks``) and in the results JSON.
* :func:`check_resources`: before anything trains, every stage's request (:attr:`Stage.cpus` / :attr:`Stage.gpus`,
  and the bundle of one Train worker and of one teacher actor) against the cluster: a stage that asks for more than
  the cluster has would wait for ever in Ray's queue; it is a config error naming the stage, the resource and the
  keys to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpmkd.components.graph import Stage
from hpmkd.config import RayConfig
from hpmkd.registry import ConfigError

#: prefix of the custom resource that names a node (``hpmkd_node_head``, ``hpmkd_node_node1`` ...)
NODE_RESOURCE = "hpmkd_node_"
#: the MLflow tag of a search trial's run: the Ray node id its process ran on (last, when it was restored elsewhere)
NODE_ID_TAG = "placement.node_id"


@dataclass(frozen=True)
class Node:
    """One live Ray node."""

    node_id: str
    name: str
    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The live nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        named = [k[len(NODE_RESOURCE):] for k in res if k.startswith(NODE_RESOURCE)]
        nodes.append(Node(n["NodeID"], named[0] if named else n.get("NodeManagerAddress", "?"),
                          float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return nodes


def node_name(node_id: str, nodes: list[Node]) -> str:
    return next((n.name for n in nodes if n.node_id == node_id), node_id[:8])


def placement(rank_nodes: list[str], nodes: list[Node]) -> dict[str, Any]:
    """A stage's placement from ``rank_nodes[rank]`` (the node id of each of its processes, in order)."""
    names = [node_name(n, nodes) for n in rank_nodes]
    return {"ranks": [{"rank": r, "node_id": n, "node": name} for r, (n, name) in enumerate(zip(rank_nodes, names))],
            "node_ids": sorted(set(rank_nodes)), "nodes": sorted(set(names))}


def placement_tags(where: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a placement: the node names, the node ids, and ``rank:node`` for every rank."""
    return {"placement.nodes": ",".join(where["nodes"]), "placement.node_ids": ",".join(where["node_ids"]),
            "placement.ranks": ",".join(f"{r['rank']}:{r['node']}" for r in where["ranks"])}


def describe(nodes: list[Node]) -> str:
    return f"{len(nodes)} node(s): " + ", ".join(f"{n.name} {n.cpus:g} CPU" + (f" {n.gpus:g} GPU" if n.gpus else "")
                                                 for n in nodes)


def check_resources(stages: list[Stage], ray_cfg: RayConfig, nodes: list[Node]) -> None:
    """Raise :class:`ConfigError` when a stage asks for more than the cluster ``nodes`` has (module docstring)."""
    total_cpu, total_gpu = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    where = describe(nodes)
    for stage in stages:
        if math.isfinite(stage.cpus) and stage.cpus > total_cpu + 1e-9:
            raise ConfigError(
                f"stage {stage.name!r} asks for {stage.cpus:g} CPUs (its Train workers: ray.num_workers="
                f"{ray_cfg.num_workers} x ray.cpus_per_worker={ray_cfg.cpus_per_worker:g}, plus any teacher actors: "
                f"ray.teacher_replicas x ray.teacher_cpus) but the Ray cluster has {total_cpu:g} CPUs in all "
                f"({where}); lower those keys or add nodes.")
        if stage.gpus > total_gpu + 1e-9:
            raise ConfigError(
                f"stage {stage.name!r} asks for {stage.gpus:g} GPUs (ray.use_gpu: one per Train worker, "
                f"ray.num_workers={ray_cfg.num_workers}; plus ray.teacher_gpus per teacher actor) but the Ray cluster "
                f"has {total_gpu:g} GPUs ({where}); lower ray.num_workers / ray.teacher_gpus, set ray.use_gpu=false, "
                f"or add GPU nodes.")
    trains = any(s.cpus > 0 for s in stages)
    worker = {"CPU": ray_cfg.cpus_per_worker, "GPU": 1.0 if ray_cfg.use_gpu else 0.0}
    if trains and not any(n.cpus >= worker["CPU"] - 1e-9 and n.gpus >= worker["GPU"] - 1e-9 for n in nodes):
        raise ConfigError(
            f"ray.cpus_per_worker={ray_cfg.cpus_per_worker:g}{' with one GPU' if ray_cfg.use_gpu else ''}: one Ray "
            f"Train worker must fit on one node, and no node is that large ({where}); lower ray.cpus_per_worker.")
