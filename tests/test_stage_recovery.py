"""A stage's process killed mid-stage (a Ray Train worker, or the worker running its Ray task) is restarted and
resumes from its last per-epoch checkpoint, each epoch logged once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment
from conftest import kill_a_stage_worker

ROOT = Path(__file__).resolve().parent.parent


def kill_worker_after_first_epoch(uri: str, stop: threading.Event) -> list[int]:
    """Wait until a stage has logged epoch 1 to MLflow (so epoch 0's checkpoint is registered), then SIGKILL its
    process (once)."""
    killed: list[int] = []
    client = MlflowClient(uri)
    while not stop.is_set() and not killed:
        time.sleep(0.5)
        try:
            experiment = client.get_experiment_by_name("recovery")
            runs = client.search_runs([experiment.experiment_id], "metrics.epoch >= 1") if experiment else []
        except Exception:  # the store may be created a moment later
            continue
        if not runs:
            continue
        pid = kill_a_stage_worker()
        if pid is not None:
            killed.append(pid)
    return killed


@pytest.mark.parametrize("executor", ["task", "train"])
def test_a_killed_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path, executor):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        "experiment=recovery", "data.max_train=6000", "data.max_val=300", "data.max_test=300", "train.epochs=4",
        "teachers=[{name: cnn, model: cnn_small, options: {stem_stride: 2}}]", "distill.baseline=false",
        "ray.max_failures=2", f"ray.executor={executor}", "mlflow.log_models=false", f"output_dir={tmp_path / 'runs'}",
    ])
    stop = threading.Event()
    killed: list[int] = []
    watcher = threading.Thread(target=lambda: killed.extend(kill_worker_after_first_epoch(uri, stop)))
    watcher.start()
    try:
        summary = run_experiment(cfg, tracking_uri=uri)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher never found a worker to kill"
    teacher = next(s for s in summary["stages"] if s["name"] == "teacher_cnn")
    assert teacher["status"] == "FINISHED"
    client = MlflowClient(uri)
    run = child_runs(client, client.get_experiment_by_name("recovery").experiment_id, summary["parent_run_id"])["teacher_cnn"]
    assert run.data.metrics["resumed_at_epoch"] >= 1  # the new worker started from a saved epoch, not from scratch
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(epochs) == [0, 1, 2, 3]  # each epoch exactly once
