"""A driver SIGKILLed mid-run: the rerun marks its runs KILLED, reuses finished stages and resumes the interrupted
stage from its last checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components import orphans
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "driver-kill"


def overrides(tmp_path: Path, address: str) -> list[str]:
    return [
        f"experiment={EXPERIMENT}", "data.max_train=2000", "data.max_val=300", "data.max_test=300",
        "teachers=[{name: cnn, model: cnn_small, options: {stem_stride: 2}, train: {epochs: 1}}]",
        "distill.baseline=false", "distill.train={epochs: 5}", "mlflow.log_models=false",
        f"ray.address={address}", f"output_dir={tmp_path / 'runs'}",
    ]


def wait_for_epoch(client: MlflowClient, stage: str, epoch: int, driver: subprocess.Popen, timeout: float) -> None:
    """Block until the stage run ``stage`` has logged ``epoch`` (its checkpoint is persisted before that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the driver ended early:\n{driver.stdout.read()}"
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}' and metrics.epoch >= {epoch}")
            if runs:
                return
        time.sleep(0.3)
    raise AssertionError(f"stage {stage} never reached epoch {epoch}")


def test_a_killed_driver_is_swept_and_its_run_resumes(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = ray_session.get_runtime_context().gcs_address  # the driver joins this session's cluster
    args = [f"--set={o}" for o in overrides(tmp_path, address)]
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hpmkd.cli import main; sys.exit(main())", "run",
         str(ROOT / "conf" / "smoke.yaml"), "--tracking-uri", uri, *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = MlflowClient(uri)
    try:
        wait_for_epoch(client, "distill", 1, driver, timeout=400)
    finally:
        driver.send_signal(signal.SIGKILL)  # no cleanup at all: the worst case for the records
        driver.wait()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    left = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    assert {r.data.tags.get("stage", "parent") for r in left} == {"parent", "distill"}  # what SIGKILL leaves behind

    cfg = load_config(ROOT / "conf" / "smoke.yaml", overrides(tmp_path, address))
    summary = run_experiment(cfg, tracking_uri=uri)

    for run in left:  # the dead driver's runs were closed by the rerun, with the reason
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "KILLED"
        assert "died" in closed.data.tags["killed_reason"]
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["teacher_cnn"]["reused"] is True  # finished before the kill: not recomputed
    assert stages["distill"]["status"] == "FINISHED" and stages["distill"]["reused"] is False
    assert stages["distill"]["metrics"]["resumed_at_epoch"] >= 1  # resumed from its checkpoint, not from scratch
    assert client.get_run(summary["parent_run_id"]).data.tags[orphans.DRIVER_TAG] == orphans.this_driver()
    assert orphans.sweep(client, experiment_id) == []  # the finished rerun leaves nothing to sweep


def test_only_dead_drivers_are_swept(tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("sweep")
    alive = client.create_run(experiment_id, tags={orphans.DRIVER_TAG: orphans.this_driver()}).info.run_id
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    dead_driver = f"{orphans.this_driver().rsplit(':', 2)[0]}:{dead_pid.pid}:1"
    dead = client.create_run(experiment_id, tags={orphans.DRIVER_TAG: dead_driver}).info.run_id
    dead_child = client.create_run(experiment_id, tags={"mlflow.parentRunId": dead}).info.run_id
    remote_fresh = client.create_run(experiment_id, tags={
        orphans.DRIVER_TAG: "elsewhere:1:1", orphans.HEARTBEAT_TAG: f"{time.time():.0f}"}).info.run_id
    remote_stale = client.create_run(experiment_id, tags={
        orphans.DRIVER_TAG: "elsewhere:2:1", orphans.HEARTBEAT_TAG: f"{time.time() - 2 * orphans.STALE_AFTER_S:.0f}"}).info.run_id

    assert sorted(orphans.sweep(client, experiment_id)) == sorted([dead, dead_child, remote_stale])
    status = {r: client.get_run(r).info.status for r in (alive, dead, dead_child, remote_fresh, remote_stale)}
    assert status == {alive: "RUNNING", dead: "KILLED", dead_child: "KILLED", remote_fresh: "RUNNING",
                      remote_stale: "KILLED"}
