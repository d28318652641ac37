"""Filling the logit cache: the teacher actors driven by hpmkd's own loop (``ray.cache_fill: actors``) against Ray
Data ``map_batches`` over an actor pool of each teacher (``ray.cache_fill: ray_data``); side by side in one run, on
the same data and teachers, on a one-node Ray cluster and on a two-node one with the same CPUs in all.

    python benchmarks/cache_fill.py [--quick] [--train 4096] [--rounds 2]

Teachers: two ``cnn_small`` with a full-resolution stem (as in ``teacher_cache.py``), randomly initialised, one actor of
one CPU (one thread) each in both fills. Data: the first ``--train`` Fashion-MNIST training images. The clusters
are ``ray.cluster_utils.Cluster`` s of real raylets on this machine: one node of 2 CPUs, then a head and a worker
node of 1 CPU each (so each teacher's actor has a node of its own). The cache root is one folder both nodes see.
Each fill is timed from nothing (actors started, every entry computed and written, actors released), into a fresh
cache folder, in rounds (actors, ray_data, then again) so load changes on the machine hit both alike; the median
of each is reported. The entries of both fills must be identical (checked on every round).
Last line: ``ray_data_over_actors_2_nodes=<median ray_data fill s / median actors fill s on two nodes>``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

from hpmkd.components.cache_fill import start_fill
from hpmkd.components.logit_cache import ensure_cached
from hpmkd.config import RayConfig
from hpmkd.data import DataSplits
from hpmkd.logit_cache import CachedLogits
from hpmkd.teachers import TeacherSpec
from kd_setup import data_config, images_and_rounds, load, save_teachers

FILLS = ("actors", "ray_data")
TEACHERS = 2
OBJECT_STORE = 200 * 1024**2


def start_cluster(nodes: int, cpus: int) -> Cluster:
    """A Ray cluster of ``nodes`` raylets with ``cpus`` CPUs each, this process connected as its driver."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "object_store_memory": OBJECT_STORE,
                                                             "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def timed_fill(kind: str, specs: list[TeacherSpec], weights: list[str], splits: DataSplits, root: Path
               ) -> tuple[float, list[str]]:
    """Seconds to fill every teacher's entry from nothing with ``kind``, and the entries' paths."""
    began = time.perf_counter()
    filler = start_fill(RayConfig(cache_fill=kind, teacher_cpus=1.0), specs, weights)
    try:
        [uses] = ensure_cached(filler, specs, weights, splits.train, root=str(root), fingerprint=splits.fingerprint)
    finally:
        filler.release()
    return time.perf_counter() - began, [u.path for u in uses]


def same_entries(a: list[str], b: list[str]) -> bool:
    return all(np.array_equal(CachedLogits(x).values, CachedLogits(y).values) and Path(x).name == Path(y).name
               for x, y in zip(a, b))


def measure(nodes: int, rounds: int, specs, weights, splits, tmp: Path) -> dict[str, list[float]]:
    cluster = start_cluster(nodes, 2 // nodes)
    times: dict[str, list[float]] = {kind: [] for kind in FILLS}
    try:
        for r in range(rounds):
            paths = {}
            for kind in FILLS:
                seconds, paths[kind] = timed_fill(kind, specs, weights, splits, tmp / f"{nodes}-{r}-{kind}")
                times[kind].append(seconds)
                print(f"  {nodes} node(s), round {r + 1}: {kind:8s} {seconds:6.1f} s", flush=True)
            assert same_entries(paths["actors"], paths["ray_data"]), "the two fills wrote different entries"
    finally:
        ray.shutdown()
        cluster.shutdown()
    return times


def main() -> None:
    train, rounds = images_and_rounds(__doc__, 4096, 2, (2048, 1), "2,048 images, 1 round")
    splits = load(data_config(train))
    with tempfile.TemporaryDirectory(prefix="hpmkd-cache-fill-") as folder:
        tmp = Path(folder)
        specs, weights, _ = save_teachers(TEACHERS, tmp / "teachers")
        print(f"{len(splits.train)} images x {len(specs)} teachers ({specs[0].model.model}), {rounds} round(s)")
        results = {nodes: measure(nodes, rounds, specs, weights, splits, tmp) for nodes in (1, 2)}
    print("\n| cluster | actors fill s | ray_data fill s | ray_data / actors |\n|---|---|---|---|")
    ratios = {}
    for nodes, times in results.items():
        actors, data = statistics.median(times["actors"]), statistics.median(times["ray_data"])
        ratios[nodes] = data / actors
        print(f"| {nodes} node(s), 2 CPUs in all | {actors:.1f} | {data:.1f} | {ratios[nodes]:.2f} |")
    print("entries identical: yes")
    print(f"ray_data_over_actors_1_node={ratios[1]:.3f}")
    print(f"ray_data_over_actors_2_nodes={ratios[2]:.3f}")


if __name__ == "__main__":
    main()
