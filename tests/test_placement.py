"""Unit tests of the resource check, the placement records and the local cluster's process bookkeeping (no Ray)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hpmkd.components import local_cluster
from hpmkd.components.graph import Stage
from hpmkd.components.placement import Node, check_resources, placement, placement_tags
from hpmkd.components.stage_params import TrainModel
from hpmkd.config import RayConfig, TrainConfig, load_config
from hpmkd.models.ref import ModelRef
from hpmkd.pipelines import plan_experiment
from hpmkd.registry import ConfigError

NODES = [Node("a" * 56, "head", 1.0, 0.0), Node("b" * 56, "node1", 1.0, 0.0), Node("c" * 56, "node2", 2.0, 0.0)]


def stage(name: str, cpus: float, gpus: float = 0.0) -> Stage:
    return Stage(name, TrainModel(ModelRef("mlp", {}), TrainConfig()), cpus=cpus, gpus=gpus)


def test_stages_that_fit_the_cluster_pass():
    check_resources([stage("teacher", 4.0), stage("student", 1.0)], RayConfig(num_workers=4), NODES)


def test_a_stage_asking_more_cpus_than_the_cluster_has_is_named():
    with pytest.raises(ConfigError) as err:
        check_resources([stage("teacher", 1.0), stage("distill", 5.0)], RayConfig(num_workers=5), NODES)
    text = str(err.value)
    assert "'distill'" in text and "5 CPUs" in text and "4 CPUs in all" in text and "ray.num_workers=5" in text
    assert "head 1 CPU" in text and "node2 2 CPU" in text


def test_gpus_are_checked_too_and_fractional_teacher_gpus_add_up():
    with pytest.raises(ConfigError, match=r"'distill' asks for 1.5 GPUs.*has 1 GPUs"):
        check_resources([stage("distill", 1.0, gpus=1.5)], RayConfig(use_gpu=True),
                        [Node("a", "gpu0", 8.0, 1.0)])
    check_resources([stage("distill", 1.0, gpus=1.5)], RayConfig(use_gpu=True), [Node("a", "gpu0", 8.0, 2.0)])


def test_a_worker_larger_than_every_node_is_refused():
    with pytest.raises(ConfigError, match=r"ray.cpus_per_worker=3: one Ray Train worker must fit on one node"):
        check_resources([stage("teacher", 3.0)], RayConfig(cpus_per_worker=3.0), NODES)


def test_stage_resources_follow_the_ray_keys():
    cfg = load_config("conf/smoke.yaml", ["ray.num_workers=2", "ray.teacher_gpus=0.25", "ray.use_gpu=true",
                                          "distill.teacher_outputs=online"])
    stages = {s.name: s for s in plan_experiment(cfg).stages}
    assert stages["teacher_cnn"].cpus == 2.0 and stages["teacher_cnn"].gpus == 2.0
    # online: the two teachers' actors (0.5 CPU, 0.25 GPU each) serve while the workers train
    assert stages["distill"].cpus == 3.0 and stages["distill"].gpus == 2.5


def test_placement_lists_ranks_nodes_and_tags():
    where = placement(["b" * 56, "a" * 56], NODES)
    assert where["nodes"] == ["head", "node1"] and where["node_ids"] == ["a" * 56, "b" * 56]
    assert [r["node"] for r in where["ranks"]] == ["node1", "head"]
    tags = placement_tags(where)
    assert tags["placement.ranks"] == "0:node1,1:head" and tags["placement.nodes"] == "head,node1"


def test_cluster_state_round_trips_and_down_stops_a_whole_process_tree(tmp_path):
    # a recorded process with a child and a grandchild, like `ray start --block` -> raylet -> workers
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & bash -c 'sleep 300' & wait"], start_new_session=True)
    time.sleep(0.5)
    below = local_cluster.descendants(proc.pid)
    assert len(below) >= 2
    state = local_cluster.ClusterState(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", "", "tok", "shared",
                                       [local_cluster.Process("ray-head", proc.pid, "log", 1.0)], None)
    state.save()
    assert local_cluster.ClusterState.load(tmp_path) == state
    assert local_cluster.down(tmp_path) == ["ray-head"]
    proc.wait(timeout=10)
    assert not any(local_cluster.alive(p) for p in below)
    assert local_cluster.down(tmp_path) == []  # nothing left: a second `down` stops nothing


def test_cluster_commands_without_a_cluster_say_how_to_start_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hpmkd.cli", "cluster", "status", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "hpmkd: error:" in result.stderr and "hpmkd cluster up --root" in result.stderr
