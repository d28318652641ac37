"""The two stage executors train bit for bit the same; the ``task`` executor checkpoints every epoch, resumes, and
logs each epoch to MLflow exactly once, even when its process died between saving an epoch and logging it."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hpmkd import checkpoint
from hpmkd.components.epoch_checkpoints import EPOCH_PREFIX, EpochCheckpoints
from hpmkd.components.stage_launch import StageLaunch
from hpmkd.components.stage_runner import executor_name, run_training_stage
from hpmkd.config import DataConfig, RayConfig, TrainConfig, load_config
from hpmkd.evaluation import measure
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.training import StageEnv, StageSpec, train_stage

ROOT = Path(__file__).resolve().parent.parent
SPEC = StageSpec("student", 0, DataConfig(name="digits"), ModelRef("mlp", {"hidden": 32, "depth": 1}),
                 TrainConfig(epochs=3, batch_size=64))


def longer(epochs: int) -> StageSpec:
    return StageSpec(**{**SPEC.__dict__, "train": TrainConfig(epochs=epochs, batch_size=64)})


def fit(tmp_path: Path, executor: str, spec: StageSpec = SPEC, run: str = "run", uri: str = "", run_id=None,
        out: str = "out"):
    launch = StageLaunch(spec, train_run_name=run, storage_path=str(tmp_path / "ray"),
                         ray_cfg=RayConfig(executor=executor), tracking_uri=uri, run_id=run_id)
    return run_training_stage(launch, tmp_path / out)


def mlflow_run(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return client, uri, client.create_run(client.create_experiment("executors")).info.run_id


def logged_epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "val_acc"))


def test_both_executors_train_bit_for_bit_the_same(ray_session, tmp_path):
    client, uri, task_run = mlflow_run(tmp_path)
    train_run = client.create_run(client.get_experiment_by_name("executors").experiment_id).info.run_id
    task = fit(tmp_path / "task", "task", uri=uri, run_id=task_run)
    train = fit(tmp_path / "train", "train", uri=uri, run_id=train_run)
    task_state, train_state = checkpoint.load(task.state_path), checkpoint.load(train.state_path)
    for key, tensor in train_state["model"].items():
        assert torch.equal(task_state["model"][key], tensor), key
    assert [h["val_acc"] for h in task_state["history"]] == [h["val_acc"] for h in train_state["history"]]
    assert task.metrics["test_acc"] == train.metrics["test_acc"] > 0.5
    assert task.model_path.read_bytes() == train.model_path.read_bytes()
    # both log each epoch once, after its checkpoint; the task records its node and its phases like Train's ranks
    assert logged_epochs(client, task_run) == logged_epochs(client, train_run) == [0, 1, 2]
    assert task.placement["node_ids"] == train.placement["node_ids"]
    assert set(task.phases) == set(train.phases)
    assert [p.name for p in (tmp_path / "task" / "ray" / "run").iterdir()] == [f"{EPOCH_PREFIX}000002"]


def test_the_driver_measures_what_the_worker_predicted(ray_session, tmp_path):
    """A worker returns its predictions, not its metrics: the driver's measure of them is what the loop computes in
    one process, every test metric and every shift alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker trains (ray.cpus_per_worker: 1)
    try:
        in_process = train_stage(SPEC, StageEnv())
        predicted = train_stage(SPEC, StageEnv(measure_test=False))
    finally:
        torch.set_num_threads(threads)
    tested = {k: v for k, v in in_process.items() if k.startswith("test_")}
    assert {"test_ece", "test_noise_ece", "test_blur_ece", "test_brier"} <= set(tested)
    assert not any(k.startswith("test_") and k not in ("test_acc", "test_loss") for k in predicted)
    assert measure(predicted["final_predictions"], SPEC.evaluation) | {
        "test_acc": predicted["test_acc"], "test_loss": predicted["test_loss"]} == tested
    task = fit(tmp_path, "task")
    assert "final_predictions" not in task.metrics
    assert {k: v for k, v in task.metrics.items() if k.startswith("test_")} == tested


def test_a_rerun_resumes_from_the_last_epoch_checkpoint(ray_session, tmp_path):
    first = fit(tmp_path, "task", out="first")
    resumed = fit(tmp_path, "task", longer(5), out="resumed")
    assert first.metrics["resumed_at_epoch"] == 0 and resumed.metrics["resumed_at_epoch"] == 3
    history = checkpoint.load(resumed.state_path)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert history[:3] == checkpoint.load(first.state_path)["history"]  # not trained again


def test_a_stage_interrupted_after_epoch_2_ends_as_if_uninterrupted(ray_session, tmp_path):
    states: list[dict] = []
    # in this process; each epoch's state copied as the report saw it (the loop goes on mutating its history)
    train_stage(longer(5), StageEnv(report=lambda metrics, state: states.append(copy.deepcopy(state))))
    EpochCheckpoints(str(tmp_path / "ray"), "run").save(2, states[2])  # what a process killed in epoch 3 leaves
    resumed = fit(tmp_path, "task", longer(5))
    assert resumed.metrics["resumed_at_epoch"] == 3
    final = checkpoint.load(resumed.state_path)
    assert final["history"][:3] == states[-1]["history"][:3]
    assert [h["val_acc"] for h in final["history"]] == [h["val_acc"] for h in states[-1]["history"]]
    for key, tensor in states[-1]["model"].items():
        assert torch.equal(final["model"][key], tensor), key


def test_an_epoch_saved_but_not_logged_is_logged_once_by_the_retry(ray_session, tmp_path):
    """What a process killed between saving epoch 2 and logging it leaves: the retry logs epoch 2 from the resumed
    history, then trains on; no epoch is logged twice."""
    client, uri, run_id = mlflow_run(tmp_path)
    done = fit(tmp_path / "first", "task", out="first")
    state = checkpoint.load(done.state_path)
    for metrics in state["history"][:2]:  # epochs 0 and 1 were logged
        client.log_metric(run_id, "val_acc", metrics["val_acc"], step=int(metrics["epoch"]))
        client.log_metric(run_id, "epoch", metrics["epoch"], step=int(metrics["epoch"]))
    EpochCheckpoints(str(tmp_path / "ray"), "run").save(2, state, owner=run_id)  # epoch 2 saved, not logged

    resumed = fit(tmp_path, "task", longer(5), uri=uri, run_id=run_id)

    assert resumed.metrics["resumed_at_epoch"] == 3
    assert logged_epochs(client, run_id) == [0, 1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc") if m.step == 2] == \
        [state["history"][2]["val_acc"]]


def test_another_runs_checkpoint_is_resumed_without_logging_its_epochs(ray_session, tmp_path):
    """A rerun adopting an interrupted run's checkpoint logs only the epochs it trains, as on Ray Train."""
    client, uri, run_id = mlflow_run(tmp_path)
    fit(tmp_path, "task", out="first")  # saved by no run
    fit(tmp_path, "task", longer(4), uri=uri, run_id=run_id, out="second")
    assert logged_epochs(client, run_id) == [3]


def test_the_newest_checkpoint_that_loads_is_resumed_and_one_is_kept(tmp_path):
    store = EpochCheckpoints(str(tmp_path), "run")
    assert store.latest() is None
    store.save(0, {"epoch": 0}, owner="a")
    store.save(1, {"epoch": 1}, owner="b")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [f"{EPOCH_PREFIX}000001"]
    cut = run / f"{EPOCH_PREFIX}000002"  # newer, but its copy was cut off
    cut.mkdir()
    (cut / checkpoint.STATE_FILE).write_bytes((run / f"{EPOCH_PREFIX}000001" / checkpoint.STATE_FILE).read_bytes()[:20])
    saved = store.latest()
    assert saved.state == {"epoch": 1} and saved.owner == "b"
    store.save(1, {"epoch": 1, "again": True})  # the same epoch trained again replaces it
    assert store.latest().state == {"epoch": 1, "again": True}


def test_auto_picks_a_task_for_one_worker_and_train_for_several():
    assert executor_name(RayConfig()) == "task"
    assert executor_name(RayConfig(num_workers=2)) == "train"
    assert executor_name(RayConfig(executor="train")) == "train"


@pytest.mark.parametrize("override, message", [
    ("ray.executor=trainer", "'trainer' is not a stage executor"),
    ("ray={executor: task, num_workers: 2}", "'task' runs one worker"),
])
def test_a_wrong_executor_is_refused_naming_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf" / "smoke.yaml", [override])


def test_the_tracking_relay_logs_an_epoch_once_and_survives_its_process(ray_session, tmp_path):
    """The actor that logs for stage tasks: an epoch it has is not logged again, and a relay whose process is killed
    is started again and serves the next call."""
    from hpmkd.components.tracking_relay import TrackingRelay

    client, uri, run_id = mlflow_run(tmp_path)
    relay = TrackingRelay.remote(uri)
    epoch = {"epoch": 0.0, "val_acc": 0.5}
    assert ray_session.get(relay.log_unless_logged.remote(run_id, epoch)) is True
    assert ray_session.get(relay.log_unless_logged.remote(run_id, epoch)) is False
    ray_session.kill(relay, no_restart=False)
    # The restarted actor answers once its process is up again. A call may reach the old process after the kill was
    # sent and log before it dies unanswered, so the retries log only what the run lacks, as a stage task's retry does.
    for _ in range(300):
        try:
            ray_session.get(relay.log_unless_logged.remote(run_id, {"epoch": 1.0, "val_acc": 0.75}))
            break
        except ray_session.exceptions.RayActorError:
            time.sleep(0.2)
    assert [(int(m.step), m.value) for m in client.get_metric_history(run_id, "val_acc")] == [(0, 0.5), (1, 0.75)]
    ray_session.kill(relay)
