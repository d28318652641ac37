"""End to end: the ``kd`` pipeline really trains on Fashion-MNIST with Ray and really lands runs in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.pipelines.runner import ExperimentFailedError, run_experiment

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "data.max_train=1200",
    "data.max_val=300",
    "data.max_test=600",
    "train.epochs=2",
    "train.batch_size=32",
    "distill.train={epochs: 3}",
]


def tiny_config(tmp_path, *extra: str):
    return load_config(ROOT / "conf" / "smoke.yaml", [*TINY, f"output_dir={tmp_path / 'runs'}", *extra])


@pytest.fixture(scope="module")
def kd_run(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("kd")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = tmp_path / "results.json"
    summary = run_experiment(tiny_config(tmp_path), tracking_uri=uri, output=str(output))
    return summary, uri, output, tmp_path


def test_results_json_has_the_contracted_shape(kd_run):
    summary, uri, output, _ = kd_run
    written = json.loads(output.read_text())
    assert written["parent_run_id"] == summary["parent_run_id"]
    for key in ("experiment", "pipeline", "parent_run_id", "tracking_uri", "wall_s", "stages", "teachers", "student",
                "retention", "compression"):
        assert key in written, key
    assert {s["name"] for s in written["stages"]} == {"teacher_cnn", "teacher_mlp", "student_alone", "distill"}
    for stage in written["stages"]:
        assert set(stage) >= {"name", "kind", "run_id", "status", "wall_s", "metrics"}
        assert stage["status"] == "FINISHED"
    assert {t["name"] for t in written["teachers"]} == {"cnn", "mlp"}
    assert set(written["student"]) >= {"model", "params", "test_acc", "val_acc"}
    best = max(t["test_acc"] for t in written["teachers"])
    assert written["retention"] == pytest.approx(written["student"]["test_acc"] / best)
    best_params = max(written["teachers"], key=lambda t: t["test_acc"])["params"]
    assert written["compression"] == pytest.approx(best_params / written["student"]["params"])


def test_student_learns_well_above_chance(kd_run):
    summary, _, _, _ = kd_run
    # 10 classes: chance is 0.10; a tiny CNN after ~110 steps on 1,200 images is far above it
    assert summary["student"]["test_acc"] > 0.35
    assert all(t["test_acc"] > 0.45 for t in summary["teachers"])


def test_mlflow_has_the_parent_and_nested_stage_runs(kd_run):
    summary, uri, _, root = kd_run
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kind"] == "pipeline"
    assert parent.data.params["student.model"] == "cnn"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "results.json"}
    stages = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert set(stages) == {"teacher_cnn", "teacher_mlp", "student_alone", "distill"}
    fingerprint = parent.data.tags["data_fingerprint"]
    for name, run in stages.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["data_fingerprint"] == fingerprint
        assert 0.0 <= run.data.metrics["test_acc"] <= 1.0
        assert run.data.metrics["params"] > 0
        epochs = 3 if name == "distill" else 2
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == epochs, name
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == epochs, name
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert {"checkpoint/model.pt", "checkpoint/state.pt"} <= files, name
    distill = stages["distill"]
    assert distill.data.params["distill.methods.kd.weight"] == "0.9"
    # no augmentation and a logit method: the teachers' logits were computed once into the Arrow cache
    assert distill.data.tags["teacher_outputs"] == "cache"
    assert {"cache.cnn", "cache.mlp"} <= set(distill.data.params)
    assert distill.data.metrics["cache_hits"] == 0
    assert distill.data.metrics["temperature"] == pytest.approx(4.0)
    assert len(client.get_metric_history(distill.info.run_id, "loss.kd.kd")) == 3
    assert distill.data.metrics["teacher_weight.cnn"] == pytest.approx(0.5)
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    students = {stages["distill"].info.run_id, stages["student_alone"].info.run_id}
    assert {m.source_run_id for m in models} == students  # teachers are checkpoints only


def test_the_logged_student_model_loads_and_predicts(kd_run):
    summary, uri, _, root = kd_run
    import numpy as np
    import torch

    mlflow.set_tracking_uri(uri)
    distill_id = next(s["run_id"] for s in summary["stages"] if s["name"] == "distill")
    client = MlflowClient(uri)
    model_id = next(m.model_id for m in mlflow.search_logged_models(
        experiment_ids=[client.get_run(distill_id).info.experiment_id], output_format="list")
        if m.source_run_id == distill_id)
    model = mlflow.pytorch.load_model(f"models:/{model_id}")
    out = model(torch.from_numpy(np.zeros((2, 1, 28, 28), np.float32)))
    assert tuple(out.shape) == (2, 10)


def test_a_nan_loss_fails_its_stage_naming_the_epoch_and_keeps_the_others(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(tmp_path, "distill.train={lr: 1.0e+30, epochs: 2}", "distill.baseline=false", "ray.max_failures=0",
                      "mlflow.log_models=false")
    with pytest.raises(ExperimentFailedError) as info:
        run_experiment(cfg, tracking_uri=uri)
    assert "epoch 0" in str(info.value) and "distill" in str(info.value)
    summary = info.value.summary
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FAILED"
    stages = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert stages["distill"].info.status == "FAILED"
    assert "epoch 0" in stages["distill"].data.tags["error"]
    assert stages["teacher_cnn"].info.status == "FINISHED"
    assert stages["teacher_mlp"].info.status == "FINISHED"


def test_a_second_identical_run_reuses_every_stage(kd_run):
    summary, uri, _, root = kd_run
    again = run_experiment(tiny_config(root), tracking_uri=uri)
    assert all(s["reused"] for s in again["stages"]), again["stages"]
    assert again["student"]["test_acc"] == summary["student"]["test_acc"]
    client = MlflowClient(uri)
    first = {s["name"]: s["run_id"] for s in summary["stages"]}
    for stage in again["stages"]:
        tags = client.get_run(stage["run_id"]).data.tags
        assert tags["reused"] == "true" and tags["reused_from"] == first[stage["name"]]


def test_changing_one_setting_recomputes_only_what_depends_on_it(kd_run):
    summary, uri, _, root = kd_run
    changed = run_experiment(tiny_config(root, "distill.temperature.T=2.0", "mlflow.log_models=false"),
                             tracking_uri=uri)
    reused = {s["name"]: s["reused"] for s in changed["stages"]}
    assert reused == {"teacher_cnn": True, "teacher_mlp": True, "student_alone": True, "distill": False}
    distill = MlflowClient(uri).get_run(next(s["run_id"] for s in changed["stages"] if s["name"] == "distill"))
    assert distill.data.metrics["temperature"] == pytest.approx(2.0)
    assert distill.data.metrics["cache_hits"] == 2  # same teachers, same data: the logit cache is reused too


@pytest.mark.parametrize("recipe,tag,terms", [
    (["distill.ce_weight=1.0", "distill.methods={fitnet: {weight: 10}}"], "online", ["loss.fitnet.hint"]),
    (["distill.ce_weight=1.0", "distill.methods={rkd: {weight: 1.0}}"], "online", ["loss.rkd.distance", "loss.rkd.angle"]),
    (["distill.aggregator={name: attention}", "distill.temperature={schedule: meta, T: 4}", "distill.meta_interval=5"],
     "cache", ["loss.kd.kd", "loss.aggregator.attn_entropy", "loss.aggregator.attn_label"]),
], ids=["feature-fitnet", "relation-rkd", "multi-teacher-attention-meta-T"])
def test_each_method_family_runs_end_to_end(kd_run, recipe, tag, terms):
    summary, uri, _, root = kd_run
    result = run_experiment(tiny_config(root, *recipe, "mlflow.log_models=false"), tracking_uri=uri)
    stages = {s["name"]: s for s in result["stages"]}
    # a temperature learned from held-out data carves a meta split out of the training rows: the teachers change too
    learns_from_held_out = "schedule: meta" in " ".join(recipe)
    assert stages["teacher_cnn"]["reused"] != learns_from_held_out and not stages["distill"]["reused"]
    run = MlflowClient(uri).get_run(stages["distill"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["teacher_outputs"] == tag
    for term in terms:
        assert len(MlflowClient(uri).get_metric_history(run.info.run_id, term)) == 3, term
    assert result["student"]["test_acc"] > 0.3
    weights = [run.data.metrics["teacher_weight.cnn"], run.data.metrics["teacher_weight.mlp"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-4)


def test_a_finished_run_that_cannot_be_read_back_is_computed_again(kd_run):
    """Reuse reads a finished stage's ``stage.json`` back; when that fails (here: the file is gone), the stage is
    computed instead of failing the pipeline, and gives the same result."""
    summary, uri, _, root = kd_run
    client = MlflowClient(uri)
    first = next(s for s in summary["stages"] if s["name"] == "student_alone")
    record = Path(client.get_run(first["run_id"]).info.artifact_uri.removeprefix("file://")) / "stage.json"
    hidden = record.with_name("stage.json.hidden")
    record.rename(hidden)
    try:
        again = run_experiment(tiny_config(root), tracking_uri=uri)
    finally:
        hidden.rename(record)
    stages = {s["name"]: s for s in again["stages"]}
    assert not stages["student_alone"]["reused"] and stages["distill"]["reused"]
    assert client.get_run(stages["student_alone"]["run_id"]).data.tags["not_read_back"] == first["run_id"]
    assert stages["student_alone"]["metrics"]["test_acc"] == first["metrics"]["test_acc"]
