"""End to end on tables: estimator teachers fitted with out-of-fold outputs, students distilled on Ray Train,
every stage recorded in a real MLflow store with its AUC metrics; HPM-KD (configuration manager, chain, attention,
meta temperature) on a CSV table, and its student exported to predict from raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.csv as pcsv
import pytest
import torch
from mlflow import MlflowClient

from hpmkd.components.report import write_report
from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.data.table import synthetic_table
from hpmkd.logit_cache import list_entries
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tabular_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tabular")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(ROOT / "conf" / "tabular.yaml", ["train.epochs=6", f"output_dir={tmp / 'runs'}",
                                                      "teachers.0.options={max_iter: 50}"])
    return run_experiment(cfg, tracking_uri=uri), cfg, uri, tmp


def test_teachers_and_students_record_their_auc_metrics(tabular_run, ray_session):
    summary, cfg, uri, _ = tabular_run
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    stages = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert set(stages) == {"teacher_hgb", "teacher_svc", "student_alone", "distill"}
    for name, run in stages.items():
        assert run.info.status == "FINISHED", name
        for key in ("test_acc", "test_loss", "test_auc", "test_brier", "test_ece"):
            assert key in run.data.metrics, (name, key)
        assert 0.5 < run.data.metrics["test_auc"] <= 1.0
    for teacher in ("teacher_hgb", "teacher_svc"):
        run = stages[teacher]
        assert run.data.tags["stage_kind"] == "fit_teacher"
        # fitted in a Ray task whose node is recorded like a training stage's ranks
        assert run.data.tags["placement.node_ids"] == ray_session.get_runtime_context().get_node_id()
        assert run.data.tags["placement.ranks"].startswith("0:")
        assert next(s["placement"] for s in summary["stages"] if s["name"] == teacher)["node_ids"] == [
            run.data.tags["placement.node_ids"]]
        assert run.data.metrics["test_auc"] > 0.95  # breast_cancer: a strong teacher
        files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert "checkpoint/train_outputs.npz" in files and len(files) == 2
        # the leak the folds avoid: the teacher is surer of the training rows it was fitted on
        assert run.data.metrics["train_confidence_in_sample"] > run.data.metrics["train_confidence_oof"]
    best = max(t["test_auc"] for t in summary["teachers"])
    assert summary["auc_retention"] == pytest.approx(summary["student"]["test_auc"] / best)
    assert parent.data.metrics["auc_retention"] == pytest.approx(summary["auc_retention"])
    assert parent.data.metrics["student_test_auc"] == pytest.approx(summary["student"]["test_auc"])
    assert summary["student"]["test_auc"] > 0.9


def test_the_student_reads_out_of_fold_teacher_outputs_from_the_cache(tabular_run):
    summary, cfg, uri, _ = tabular_run
    distill = MlflowClient(uri).get_run(next(s["run_id"] for s in summary["stages"] if s["name"] == "distill"))
    assert distill.data.tags["teacher_outputs"] == "cache"
    views = {e.key.digest: e.key.view for e in list_entries(cfg.cache_root())}
    for teacher in ("hgb", "svc"):
        assert views[distill.data.params[f"cache.{teacher}"]].startswith("plain|oof:folds=5:seed=0:")


def test_a_second_run_reuses_the_fitted_teachers_and_the_report_shows_the_auc(tabular_run):
    summary, cfg, uri, tmp = tabular_run
    again = run_experiment(cfg, tracking_uri=uri)
    assert all(s["reused"] for s in again["stages"])
    assert again["auc_retention"] == pytest.approx(summary["auc_retention"])
    text = write_report(uri, tmp / "report").read_text()
    assert "## Experiment `tabular-kd`" in text and "### Test metrics per stage" in text
    assert "| teacher_hgb | teacher |" in text and "AUC retention" in text


@pytest.mark.timeout(3600)  # six stages and a Tune search: half an hour when the 2 cores are shared
def test_hpmkd_on_a_csv_table_and_its_student_predicts_from_raw_rows(ray_session, tmp_path):
    table = synthetic_table(n_samples=600, n_features=8, n_informative=5, n_classes=3, categorical=2, missing=0.05,
                            random_state=3)
    pcsv.write_csv(table, tmp_path / "t.csv")
    data = {"path": str(tmp_path / "t.csv"), "target": "y", "categorical": ["x6", "x7"]}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "conf" / "tabular_hpmkd.yaml", [
        "data.name=table", f"data.options={json.dumps(data)}", "train.epochs=3", "config_manager.budget_epochs=2",
        "teachers.0.options={max_iter: 30}", "teachers.1.options={n_estimators: 20}", "distill.baseline=false",
        f"output_dir={tmp_path / 'runs'}"])
    summary = run_experiment(cfg, tracking_uri=uri)
    kinds = {s["name"]: (s["kind"], s["status"]) for s in summary["stages"]}
    assert kinds["tune"] == ("tune", "FINISHED") and kinds["assistant_1"] == ("chain_link", "FINISHED")
    assert kinds["distill"] == ("distill", "FINISHED")
    client = MlflowClient(uri)
    runs = child_runs(client, client.get_run(summary["parent_run_id"]).info.experiment_id, summary["parent_run_id"])
    distill = runs["distill"]
    assert {"teacher_weight.hgb", "teacher_weight.rf", "teacher_weight.assistant_1", "temperature",
            "test_auc"} <= set(distill.data.metrics)
    recorded = json.loads(Path(client.download_artifacts(summary["parent_run_id"], "preprocessing.json",
                                                         str(tmp_path))).read_text())
    assert [c["name"] for c in recorded["columns"]] == [f"x{j}" for j in range(8)]
    # the exported student: raw rows (strings, missing cells) in, class probabilities out
    mlflow.set_tracking_uri(uri)
    model_id = next(m.model_id for m in mlflow.search_logged_models(
        experiment_ids=[distill.info.experiment_id], output_format="list") if m.source_run_id == distill.info.run_id)
    exported = mlflow.pyfunc.load_model(f"models:/{model_id}")
    raw = table.slice(0, 25).to_pandas()
    probs = exported.predict(raw)
    assert list(probs.columns) == ["0", "1", "2"] and np.allclose(probs.to_numpy().sum(1), 1, atol=1e-5)
    from hpmkd.data.table import TablePreprocessing
    from hpmkd.predictors import load_predictor

    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    weights = client.download_artifacts(distill.info.run_id, "checkpoint/model.pt", str(tmp_path))
    student = load_predictor(weights, cfg.student.ref, splits.shape).eval()
    x = torch.from_numpy(TablePreprocessing.from_record(recorded).encode(raw))
    np.testing.assert_allclose(probs.to_numpy(), torch.softmax(student(x), -1).detach().numpy(), atol=1e-5)


def test_a_table_student_is_exported_as_a_model_that_reads_raw_rows(tracking_uri, tmp_path):
    from hpmkd.components.table_model import log_table_model
    from hpmkd.components.tracking import Tracker
    from hpmkd.data.table import TablePreprocessing
    from hpmkd.models.ref import ModelRef
    from hpmkd.predictors import load_predictor, save_predictor

    table = synthetic_table(n_samples=200, n_features=5, n_informative=3, categorical=1, missing=0.1, random_state=1)
    pcsv.write_csv(table, tmp_path / "t.csv")
    splits = load_dataset("table", options={"path": str(tmp_path / "t.csv"), "target": "y", "categorical": ["x4"]})
    ref = ModelRef("tabular_resnet", {"width": 8, "depth": 1})
    save_predictor(ref.build(splits.shape).state_dict(), tmp_path / "model.pt")
    tracker = Tracker(tracking_uri, "export")
    run = tracker.start_run("student", {})
    log_table_model(tracker, run, str(tmp_path / "model.pt"), ref, splits)
    tracker.finish(run)
    model_id = mlflow.search_logged_models(experiment_ids=[tracker.experiment_id], output_format="list")[0].model_id
    raw = table.slice(0, 9).to_pandas()  # strings, missing cells, and the target column (ignored)
    probs = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(raw)
    student = load_predictor(str(tmp_path / "model.pt"), ref, splits.shape).eval()
    x = torch.from_numpy(TablePreprocessing.from_record(splits.preprocessing).encode(raw))
    assert list(probs.columns) == splits.class_names
    np.testing.assert_allclose(probs.to_numpy(), torch.softmax(student(x), -1).detach().numpy(), atol=1e-6)
