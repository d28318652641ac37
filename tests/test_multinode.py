"""Several Ray nodes for real: a 3-node local cluster started by ``hpmkd cluster up`` (one ``ray start`` process per
node, 1 CPU each, token authentication, an MLflow tracking server over HTTP, a shared folder), and what must hold on
it: stages spread over nodes and record where they ran, a two-node DDP distillation, the resource and missing-data
errors, and the faults a cluster meets (a teacher actor killed, the tracking server stopped, the driver stopped as a
Ray Job and submitted again, a worker node killed).

The node ``node2`` has no copy of the (fake) CIFAR-10 set that the head and ``node1`` hold in their ``$HPMKD_DATA``,
as a machine whose local disk lacks it. The node-kill test runs last: it leaves the cluster one node short.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import train_digits_teacher
from hpmkd.components import local_cluster
from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.pipelines.runner import ExperimentFailedError, run_experiment
from hpmkd.registry import ConfigError
from test_data import write_fake_cifar10

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "conf" / "smoke.yaml"
DRIVER_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI",
              "HPMKD_DATA")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The running cluster's state; this test process is its driver (connected to the head) while the module runs.
    A Ray instance the session had started is shut down first and started again afterwards."""
    import ray

    from hpmkd.components.ray_runtime import ensure_ray

    root = tmp_path_factory.mktemp("cluster")
    data, empty = root / "node-data", root / "node2-data"
    write_fake_cifar10(data, n_per_batch=20)
    empty.mkdir()
    had_ray = ray.is_initialized()
    ray.shutdown()
    saved = {k: os.environ.get(k) for k in DRIVER_ENV}
    began = time.perf_counter()
    # The test machine is shared: Ray's memory monitor (which kills workers when the *machine* is above 95% of its
    # memory, whoever uses it) may only act at 99% here.
    shared = {"RAY_memory_usage_threshold": "0.99"}
    state = local_cluster.up(root, nodes=3, cpus=1, node_env={"head": {**shared, "HPMKD_DATA": str(data)},
                                                              "node1": {**shared, "HPMKD_DATA": str(data)},
                                                              "node2": {**shared, "HPMKD_DATA": str(empty)}})
    print(f"cluster up: {time.perf_counter() - began:.1f} s")
    os.environ.update({**state.env(), "HPMKD_DATA": str(data)})
    try:
        ensure_ray(state.ray_address, None, None, log_to_driver=False)
        yield state
    finally:
        ray.shutdown()
        local_cluster.down(root)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if had_ray:
            ensure_ray(None, 2, None, log_to_driver=False, object_store_memory=256 * 1024**2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return train_digits_teacher(tmp_path_factory.mktemp("teacher"), hidden=64, depth=1, epochs=3)


def on_cluster(state: local_cluster.ClusterState, experiment: str, tmp: Path, *sets: str) -> list[str]:
    return [f"experiment={experiment}", "mlflow.log_models=false", f"output_dir={tmp / 'runs'}",
            *state.run_overrides(), *sets]


def digits_kd(state, experiment: str, tmp: Path, teacher: str, *sets: str):
    """KD on digits from the loaded MLP ``teacher`` (no teacher training): one distillation stage on Ray Train."""
    return load_config(SMOKE, on_cluster(
        state, experiment, tmp, "data={name: digits}", "distill.baseline=false",
        f"teachers=[{{name: mlp, model: mlp, options: {{hidden: 64, depth: 1}}, checkpoint: {teacher}}}]",
        "student={model: mlp, options: {hidden: 32, depth: 1}}", *sets))


def stage_run(state, experiment: str, summary: dict, stage: str):
    client = MlflowClient(state.tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, child_runs(client, experiment_id, summary["parent_run_id"])[stage]


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def wait_for_epoch(state, experiment: str, stage: str, epoch: int, stop: threading.Event) -> bool:
    client = MlflowClient(state.tracking_uri)
    while not stop.is_set():
        experiment_obj = client.get_experiment_by_name(experiment)
        if experiment_obj and client.search_runs([experiment_obj.experiment_id],
                                                 f"tags.stage = '{stage}' and metrics.epoch >= {epoch}"):
            return True
        time.sleep(0.3)
    return False


def in_background(target) -> tuple[threading.Thread, threading.Event, dict]:
    """``target(stop)`` in a thread; its result dict (or ``{"error": ...}``) lands in ``out``."""
    stop, out = threading.Event(), {}

    def body() -> None:
        try:
            out.update(target(stop) or {})
        except Exception as err:  # reported by the test's assertions, with the cause
            out["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, stop, out


def wait_for_status(client, job_id: str, statuses: set, stop: threading.Event):
    """Poll a Ray Job until its status is one of ``statuses`` (returned) or ``stop`` is set (``None``)."""
    while not stop.is_set():
        if (status := client.get_job_status(job_id)) in statuses:
            stop.set()
            return status
        time.sleep(0.5)
    return None


def run_with_fault(cfg, state, fault):
    """Run ``cfg`` while ``fault(stop)`` acts in a thread; the summary, the fault's record and the wall time."""
    thread, stop, out = in_background(fault)
    began = time.perf_counter()
    try:
        summary = run_experiment(cfg, tracking_uri=state.tracking_uri)
    finally:
        stop.set()
        thread.join(timeout=600)
    return summary, out, time.perf_counter() - began


# --- spread and placement --------------------------------------------------------------------------------------------

def test_smoke_runs_on_three_nodes_and_records_where_each_stage_ran(cluster, tmp_path):
    cfg = load_config(SMOKE, on_cluster(cluster, "multinode-smoke", tmp_path, "data.max_train=600",
                                        "data.max_val=200", "data.max_test=200", "train.epochs=1"))
    summary = run_experiment(cfg, tracking_uri=cluster.tracking_uri)
    stages = {s["name"]: s for s in summary["stages"]}
    assert sorted(stages) == ["distill", "student_alone", "teacher_cnn", "teacher_mlp"]
    assert all(s["status"] == "FINISHED" for s in stages.values())
    nodes = {s["name"]: s["placement"]["nodes"][0] for s in stages.values()}
    # three 1-CPU stages were ready together and one node holds one of them: they ran on different nodes
    assert len({nodes["teacher_cnn"], nodes["teacher_mlp"], nodes["student_alone"]}) >= 2, nodes
    assert set(nodes.values()) <= {"head", "node1", "node2"}
    for name, row in stages.items():
        assert row["resources"] == {"CPU": 1.0, "GPU": 0.0}
        _, run = stage_run(cluster, "multinode-smoke", summary, name)
        assert run.data.tags["placement.nodes"] == nodes[name]
        assert run.data.tags["placement.ranks"] == f"0:{nodes[name]}"
        assert run.data.tags["placement.node_ids"] == row["placement"]["node_ids"][0]


def test_two_node_ddp_distillation_matches_one_worker_at_the_same_effective_batch(cluster, teacher, tmp_path):
    results = {}
    for workers, batch in ((1, 64), (2, 32)):
        cfg = digits_kd(cluster, f"ddp-{workers}", tmp_path / str(workers), teacher, f"ray.num_workers={workers}",
                        f"train={{epochs: 4, batch_size: {batch}, lr: 0.05}}")
        results[workers] = {s["name"]: s for s in run_experiment(cfg, tracking_uri=cluster.tracking_uri)["stages"]}
    two = results[2]["distill"]
    assert [r["rank"] for r in two["placement"]["ranks"]] == [0, 1]
    assert len(two["placement"]["node_ids"]) == 2  # one worker per node: the gradients crossed nodes (gloo)
    assert two["resources"]["CPU"] == 2.0
    one = results[1]["distill"]["metrics"]
    print(f"DDP on 2 nodes: val_acc {two['metrics']['val_acc']:.4f} test_acc {two['metrics']['test_acc']:.4f}; "
          f"1 worker: val_acc {one['val_acc']:.4f} test_acc {one['test_acc']:.4f}")
    assert two["metrics"]["test_acc"] > 0.8
    assert abs(two["metrics"]["test_acc"] - one["test_acc"]) <= 0.04  # 540 test digits: ~0.015 standard error


# --- errors before and during training ------------------------------------------------------------------------------

def test_a_stage_asking_more_cpus_than_the_cluster_has_fails_before_anything_runs(cluster, tmp_path):
    cfg = load_config(SMOKE, on_cluster(cluster, "overcommit", tmp_path, "ray.num_workers=4",
                                        "data.max_train=200", "data.max_val=50", "data.max_test=50"))
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, tracking_uri=cluster.tracking_uri)
    text = str(err.value)
    assert "stage 'teacher_cnn' asks for 4 CPUs" in text and "3 CPUs in all" in text
    assert "head 1 CPU" in text and "node2 1 CPU" in text
    experiment = MlflowClient(cluster.tracking_uri).get_experiment_by_name("overcommit")
    assert experiment is None or not MlflowClient(cluster.tracking_uri).search_runs([experiment.experiment_id])


def test_a_worker_on_a_node_without_the_data_set_names_the_node_and_the_folder(cluster, tmp_path):
    cfg = load_config(SMOKE, on_cluster(cluster, "missing-data", tmp_path, "data={name: cifar10}",
                                        "teachers=[{name: mlp, model: mlp, options: {hidden: 16, depth: 1}}]",
                                        "distill.baseline=false", "ray.num_workers=3", "ray.max_failures=0",
                                        "ray.share_splits=false",  # every worker reads its node's disk
                                        "train.epochs=1"))
    with pytest.raises(ExperimentFailedError) as err:
        run_experiment(cfg, tracking_uri=cluster.tracking_uri)
    text = str(err.value)
    assert "runs on Ray node node2" in text and "data set 'cifar10' is missing" in text
    assert str(Path(os.environ["HPMKD_DATA"]).parent / "node2-data") in text  # the folder searched on that node


# --- faults ---------------------------------------------------------------------------------------------------------

def test_a_killed_teacher_actor_is_restarted_and_serving_resumes(cluster, teacher, tmp_path):
    import signal

    from ray.util.state import list_actors

    address = cluster.ray_address

    def kill_teacher(stop):
        if not wait_for_epoch(cluster, "actor-kill", "distill", 1, stop):
            return {}
        for actor in list_actors(address=address, filters=[("class_name", "=", "TeacherActor"),
                                                            ("state", "=", "ALIVE")], detail=True):
            os.kill(actor.pid, signal.SIGKILL)
            return {"pid": actor.pid, "at": time.perf_counter()}
        return {}

    cfg = digits_kd(cluster, "actor-kill", tmp_path, teacher, "distill.teacher_outputs=online",
                    "train={epochs: 12, batch_size: 64, lr: 0.05}")
    summary, killed, wall = run_with_fault(cfg, cluster, kill_teacher)
    assert killed.get("pid"), f"no teacher actor was killed: {killed}"
    distill = {s["name"]: s for s in summary["stages"]}["distill"]
    assert distill["status"] == "FINISHED"
    restarted = list_actors(address=address, filters=[("class_name", "=", "TeacherActor")], detail=True)
    assert any(a.num_restarts >= 1 for a in restarted)
    client, run = stage_run(cluster, "actor-kill", summary, "distill")
    assert epochs_logged(client, run.info.run_id) == list(range(12))
    print(f"teacher actor killed (pid {killed['pid']}): stage finished, run wall {wall:.1f} s")


def test_the_tracking_server_stopped_for_20_s_mid_stage_loses_no_metric(cluster, teacher, tmp_path):
    def outage(stop):
        if not wait_for_epoch(cluster, "mlflow-outage", "distill", 1, stop):
            return {}
        local_cluster.stop_mlflow(cluster.root)
        down_at = time.perf_counter()
        time.sleep(20)
        local_cluster.start_mlflow(cluster.root)
        return {"down_s": time.perf_counter() - down_at}

    cfg = digits_kd(cluster, "mlflow-outage", tmp_path, teacher, "train={epochs: 25, batch_size: 64, lr: 0.05}")
    summary, out, wall = run_with_fault(cfg, cluster, outage)
    assert out.get("down_s", 0) >= 20, f"the server was not stopped mid-stage: {out}"
    distill = {s["name"]: s for s in summary["stages"]}["distill"]
    assert distill["status"] == "FINISHED"
    client, run = stage_run(cluster, "mlflow-outage", summary, "distill")
    assert epochs_logged(client, run.info.run_id) == list(range(25))  # every epoch arrived, once
    assert run.info.status == "FINISHED"
    print(f"MLflow down {out['down_s']:.1f} s mid-stage: every epoch logged once, run wall {wall:.1f} s")


def test_a_driver_job_stopped_mid_run_and_resubmitted_reuses_and_resumes(cluster, teacher, tmp_path):
    """``cluster/submit.py``'s Ray Job stopped (``ray job stop``: SIGTERM to the driver, SIGKILL 3 s later) after
    epoch 2 of ``distill``, then submitted again: the loaded teacher is reused, ``distill`` resumes from its Train
    checkpoint, the stopped job's runs are marked KILLED, and every epoch is logged once across the two runs."""
    import importlib.util

    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = importlib.util.spec_from_file_location("cluster_submit", ROOT / "cluster" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    epochs = 20  # the stop takes 3-4 s to act (about 5 epochs here): room for it on a faster machine
    sets = on_cluster(cluster, "job-resubmit", tmp_path, "data={name: digits}", "distill.baseline=false",
                      f"teachers=[{{name: mlp, model: mlp, options: {{hidden: 64, depth: 1}}, checkpoint: {teacher}}}]",
                      "student={model: mlp, options: {hidden: 32, depth: 1}}",
                      f"train={{epochs: {epochs}, batch_size: 2, lr: 0.005}}")  # tiny batches: epochs of ~1 s
    sub = submit.submission(submit.parser().parse_args(
        ["conf/smoke.yaml", "--tracking-uri", cluster.tracking_uri, "--address", cluster.dashboard_url,
         *[f"--set={s}" for s in sets]]))
    client = JobSubmissionClient(cluster.dashboard_url)
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    def job(stop_at_epoch: int | None) -> tuple[JobStatus, str, float]:
        """Submit; with ``stop_at_epoch``, stop the job once ``distill`` logged it. The final status, the logs and
        the seconds from the stop request to the job's end."""
        job_id = submit.submit_when_ready(client, sub)
        stopped_at = time.perf_counter()
        if stop_at_epoch is not None:
            _, gone, _ = in_background(lambda stop: {"status": wait_for_status(client, job_id, ended, stop)})
            reached = wait_for_epoch(cluster, "job-resubmit", "distill", stop_at_epoch, gone)
            assert reached, f"the job ended first: {client.get_job_logs(job_id)[-3000:]}"
            stopped_at = time.perf_counter()
            client.stop_job(job_id)
            gone.set()
        deadline = time.monotonic() + 600
        while (status := client.get_job_status(job_id)) not in ended:
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(0.2)
        return status, client.get_job_logs(job_id), time.perf_counter() - stopped_at

    began = time.perf_counter()
    status, logs, stop_s = job(stop_at_epoch=2)
    assert status == JobStatus.STOPPED, logs[-3000:]
    status, logs, _ = job(stop_at_epoch=None)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    mlflow = MlflowClient(cluster.tracking_uri)
    experiment_id = mlflow.get_experiment_by_name("job-resubmit").experiment_id
    parents = sorted(mlflow.search_runs([experiment_id], "tags.kind = 'pipeline'"), key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    first, second = (child_runs(mlflow, experiment_id, p.info.run_id) for p in parents)
    assert first["distill"].info.status == "KILLED" and "died" in first["distill"].data.tags["killed_reason"]
    assert first["teacher_mlp"].info.status == "FINISHED"
    assert second["teacher_mlp"].data.tags["reused_from"] == first["teacher_mlp"].info.run_id
    resumed = int(second["distill"].data.metrics["resumed_at_epoch"])
    before, after = (epochs_logged(mlflow, runs["distill"].info.run_id) for runs in (first, second))
    assert 2 <= resumed < epochs  # the stop took effect mid-stage, and the rerun resumed the stopped run's checkpoint
    assert before == list(range(len(before))) and len(before) <= resumed  # nothing logged beyond the checkpoint
    assert after == list(range(resumed, epochs))  # the rest, once
    print(f"driver job stopped after epoch 2 of {epochs}: STOPPED {stop_s:.1f} s after `stop`, the stopped run "
          f"logged epochs 0-{before[-1]}; resubmitted: resumed at epoch {resumed}, both jobs "
          f"{time.perf_counter() - began:.1f} s")


def test_a_worker_node_killed_mid_distill_resumes_on_the_surviving_nodes(cluster, teacher, tmp_path):
    """Last in the module: it leaves the cluster without one node."""
    import ray
    from ray.util.state import list_actors

    from hpmkd.components.placement import cluster_nodes

    address = cluster.ray_address
    driver_node = ray.get_runtime_context().get_node_id()

    def kill_a_worker_node(stop):
        if not wait_for_epoch(cluster, "node-kill", "distill", 2, stop):
            return {}
        names = {n.node_id: n.name for n in cluster_nodes()}
        workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                         ("state", "=", "ALIVE")], detail=True)
        victim = next(names[a.node_id] for a in workers if a.node_id != driver_node and names[a.node_id] != "head")
        pids = local_cluster.kill_node(cluster.root, victim)
        return {"node": victim, "pids": pids, "at": time.perf_counter()}

    cfg = digits_kd(cluster, "node-kill", tmp_path, teacher, "ray.num_workers=2", "ray.max_failures=3",
                    "train={epochs: 20, batch_size: 32, lr: 0.05}")
    summary, killed, wall = run_with_fault(cfg, cluster, kill_a_worker_node)
    assert killed.get("pids"), f"no worker node was killed: {killed}"
    distill = {s["name"]: s for s in summary["stages"]}["distill"]
    assert distill["status"] == "FINISHED"
    assert killed["node"] not in distill["placement"]["nodes"]  # the restarted group runs on the surviving nodes
    client, run = stage_run(cluster, "node-kill", summary, "distill")
    assert run.data.metrics["resumed_at_epoch"] > 0
    assert epochs_logged(client, run.info.run_id) == list(range(20))  # every epoch exactly once
    print(f"node {killed['node']} killed ({len(killed['pids'])} processes) mid-distill: resumed at epoch "
          f"{run.data.metrics['resumed_at_epoch']:.0f}, run wall {wall:.1f} s")
