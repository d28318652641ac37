"""The adaptive configuration manager: proposals from the memory or the published defaults, the ``tune`` stage
(nested trial runs, best configuration handed to ``distill``), and a killed search that resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from hpmkd.components.config_manager import fixed_for, memory_records, proposals_for
from conftest import train_digits_teacher
from hpmkd.components.graph import ModelArtifact, StageResult
from hpmkd.components.memory import recall, task_features
from hpmkd.components.tracking import child_runs
from hpmkd.components.tune_storage import SET_ASIDE_INFIX
from hpmkd.config import DataConfig, TrainConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.meta_features import TaskFeatures
from hpmkd.proposals import MemoryRecord, ProposerSettings, propose
from hpmkd.registry import ConfigError
from hpmkd.search_space import build_space
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.version import code_version
from hpmkd.pipelines.runner import run_experiment
from hpmkd.models.ref import ModelRef

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"T": 4.0, "kd_share": 0.9, "lr": 0.05, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A small MLP teacher for scikit-learn's digits, trained here in-process (no Ray) and saved as a state."""
    return train_digits_teacher(tmp_path_factory.mktemp("teacher"), hidden=128, depth=2, epochs=4)


def test_a_search_trial_never_reads_the_test_split():
    """Trials are chosen on validation only: with ``read_test=False`` the test split is not evaluated at all."""
    spec = StageSpec("trial", 0, DataConfig(name="digits"), ModelRef("mlp", {"hidden": 32, "depth": 1}),
                     TrainConfig(epochs=1, batch_size=64), read_test=False)
    result = train_stage(spec, StageEnv())
    assert "test_acc" not in result and "test_loss" not in result and result["val_acc"] > 0.1
    assert 0.1 < train_stage(dataclasses.replace(spec, read_test=True), StageEnv())["test_acc"] <= 1.0


def digits_overrides(tmp_path: Path, teacher: str, *extra: str) -> list[str]:
    """Digits, the teacher above loaded from its checkpoint, an MLP student ~70x smaller, a 3-trial search."""
    return [
        "experiment=cm", "data={name: digits}", "distill.baseline=false", "mlflow.log_models=false",
        f"teachers=[{{name: mlp, model: mlp, options: {{hidden: 128, depth: 2}}, checkpoint: {teacher}}}]",
        "student={model: mlp, options: {hidden: 16, depth: 1}}", "train={epochs: 2, batch_size: 64, lr: 0.05}",
        "config_manager={enabled: true, trials: 3, budget_epochs: 2, scheduler: fifo}",
        f"output_dir={tmp_path / 'runs'}", *extra,
    ]


def digits_config(tmp_path: Path, teacher: str, *extra: str):
    return load_config(ROOT / "conf" / "smoke.yaml", digits_overrides(tmp_path, teacher, *extra))


def teacher_result(val_acc: float, params: int) -> StageResult:
    return StageResult("teacher_mlp", "load_teacher", None, "FINISHED", 0.0, {"val_acc": val_acc},
                       ModelArtifact("mlp", ModelRef("mlp"), "teacher.pt", "digest", params))


def proposed(cfg, teacher: StageResult, client: MlflowClient):
    """What the configuration manager proposes for ``cfg``'s task, given what ``client``'s store remembers."""
    task = task_of(cfg, teacher)
    return proposals_for(cfg, task, build_space(cfg), memory_records(cfg, client))


def task_of(cfg, teacher: StageResult) -> TaskFeatures:
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    return task_features(cfg, splits, [teacher], cfg.student.ref.count_params(splits.shape))


# --- proposals without Ray ---------------------------------------------------------------------------------------

def test_with_no_history_the_published_defaults_are_proposed(tmp_path, teacher_checkpoint):
    cfg = digits_config(tmp_path, teacher_checkpoint)
    empty_store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    proposals = proposed(cfg, teacher_result(0.95, 25_000), empty_store)
    assert [p.source for p in proposals] == ["defaults"]
    assert proposals[0].config == pytest.approx(PUBLISHED)
    assert "Hinton" in proposals[0].basis


def synthetic_task(student_params: int, dataset: str = "digits", student: str = "mlp") -> TaskFeatures:
    return TaskFeatures(dataset, 1293, 10, (1, 8, 8), 0.999, 1.1, ("mlp",), (25_000,), (0.95,), student,
                        student_params, ("kd",))


def test_nearest_tasks_come_first_and_their_mean_leads(tmp_path, teacher_checkpoint):
    cfg = digits_config(tmp_path, teacher_checkpoint)
    space = build_space(cfg)
    near, far = synthetic_task(1_200), replace(synthetic_task(90_000, "fashion_mnist", "cnn"), input_shape=(1, 28, 28),
                                                n_train=50_000)
    good_near = {"T": 2.0, "kd_share": 0.5, "lr": 0.2, "weight_decay": 1e-5}
    good_far = {"T": 8.0, "kd_share": 0.95, "lr": 0.01, "weight_decay": 1e-3}
    records = [MemoryRecord(near, good_near, 0.9, 0.95, 2, "trial"), MemoryRecord(near, PUBLISHED, 0.8, 0.85, 2, "trial"),
               MemoryRecord(far, good_far, 0.9, 0.97, 2, "trial")]
    proposals = propose(synthetic_task(1_600), records, space, ProposerSettings(count=4))
    assert {p.source for p in proposals} == {"memory:knn"}
    assert "mean" in proposals[0].basis
    assert [p.config for p in proposals[1:]] == [pytest.approx(good_near), pytest.approx(good_far),
                                                 pytest.approx(PUBLISHED)]
    mean_lr = proposals[0].config["lr"]
    assert abs(np.log(mean_lr / good_near["lr"])) < abs(np.log(mean_lr / good_far["lr"]))  # nearer task weighs more


def test_neighbours_must_share_the_method_set(tmp_path, teacher_checkpoint):
    """A FitNet stage of the very same task says nothing about a KD recipe: it is never a neighbour, for the searched
    hyperparameters or for the proposed-only chain threshold."""
    cfg = digits_config(tmp_path, teacher_checkpoint, "chain.epsilon=0.02")
    space, task = build_space(cfg), synthetic_task(1_600)
    fitnet = {"T": 2.0, "kd_share": 0.2, "lr": 0.3, "weight_decay": 1e-6, "chain_threshold": 0.04}
    records = [MemoryRecord(replace(task, methods=("fitnet",)), fitnet, 0.9, 0.99, 2, "trial")]
    assert [p.source for p in propose(task, records, space, ProposerSettings(count=2))] == ["defaults"]
    assert [p.source for p in fixed_for(cfg, task, records)] == ["defaults"]
    far = replace(synthetic_task(90_000, "fashion_mnist", "cnn"), input_shape=(1, 28, 28), n_train=50_000)
    kd = {"T": 8.0, "kd_share": 0.95, "lr": 0.01, "weight_decay": 1e-3, "chain_threshold": 0.03}
    records.append(MemoryRecord(far, kd, 0.8, 0.9, 2, "trial"))
    proposals = propose(task, records, space, ProposerSettings(count=2))
    assert [p.config for p in proposals] == [pytest.approx({k: v for k, v in kd.items() if k in space.names})]
    assert [p.config for p in fixed_for(cfg, task, records)] == [{"chain_threshold": 0.03}]


def test_a_large_history_switches_to_the_regressor(tmp_path, teacher_checkpoint):
    """60 records over 6 tasks whose retention peaks at lr = 0.2: the regressor proposes a learning rate near it;
    with 40 records (below regressor_min_records = 50) nearest neighbours answer instead."""
    cfg = digits_config(tmp_path, teacher_checkpoint)
    space = build_space(cfg)
    rng = np.random.default_rng(0)
    records = []
    for task in [synthetic_task(p) for p in (800, 1_000, 1_200, 1_500, 2_000, 3_000)]:
        for unit in rng.random((10, len(space.dims))):
            config = space.from_unit(unit)
            retention = 1.0 - 0.3 * np.log(config["lr"] / 0.2) ** 2
            records.append(MemoryRecord(task, config, retention * 0.95, retention, 2, "trial"))
    settings = ProposerSettings(count=3, budget_epochs=2)
    proposals = propose(synthetic_task(1_300), records, space, settings)
    assert {p.source for p in proposals} == {"memory:regressor"}
    assert 0.1 < proposals[0].config["lr"] < 0.4
    assert {p.source for p in propose(synthetic_task(1_300), records[:40], space, settings)} == {"memory:knn"}


def test_the_chain_threshold_is_proposed_where_relevant_but_not_searched(tmp_path, teacher_checkpoint):
    chained = digits_config(tmp_path, teacher_checkpoint, "chain.epsilon=0.02")  # the chain's stop rule is on
    task = synthetic_task(1_600)
    assert [(p.source, p.config) for p in fixed_for(chained, task, [])] == [("defaults", {"chain_threshold": 0.01})]
    records = [MemoryRecord(synthetic_task(1_200), {**PUBLISHED, "chain_threshold": 0.03}, 0.9, 0.95, 2, "distill")]
    assert [(p.source, p.config) for p in fixed_for(chained, task, records)] == [("memory:knn", {"chain_threshold": 0.03})]
    assert fixed_for(digits_config(tmp_path, teacher_checkpoint), task, records) == []  # no stop rule: not relevant
    with pytest.raises(ConfigError, match="proposed, not searched"):
        digits_config(tmp_path, teacher_checkpoint, "config_manager.search_space={chain_threshold: {}}")


@pytest.mark.parametrize("extra,message", [
    (["config_manager.search_space={temprature: {}}"], "unknown hyperparameter 'temprature'"),
    (["distill.temperature={schedule: cosine, T_min: 1, T_max: 4}"], "config_manager.search_space.T"),
    (["config_manager.search_space={kd_share: {method: dkd}}"], "kd_share.method"),
    (["config_manager.search_space={distill.methods.kd.weight: {}}"], "needs explicit low and high"),
    (["config_manager.search_space={lr: {low: 0.1, high: 0.01}}"], "low must be below high"),
    (["config_manager.proposals=5"], "config_manager.proposals"),
])
def test_a_bad_config_manager_section_fails_before_ray(tmp_path, teacher_checkpoint, extra, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        digits_config(tmp_path, teacher_checkpoint, *extra)


# --- the tune stage on Ray ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(ray_session, tmp_path_factory, teacher_checkpoint):
    tmp_path = tmp_path_factory.mktemp("tuned")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = digits_config(tmp_path, teacher_checkpoint, "config_manager.searcher=optuna", "config_manager.scheduler=asha")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_experiment(cfg, tracking_uri=uri, output=str(tmp_path / "results.json"))
    # Tune prints nothing of its own (its configuration box, result folders): hpmkd shows the trials
    shown = printed.getvalue()
    assert "Configuration for experiment" not in shown and "View detailed results" not in shown
    return summary, uri, tmp_path


def test_tune_stage_nests_its_trials_and_hands_the_best_config_to_distill(tuned, ray_session):
    summary, uri, tmp_path = tuned
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("cm").experiment_id
    stages = child_runs(client, experiment_id, summary["parent_run_id"])
    assert set(stages) == {"teacher_mlp", "tune", "distill"}
    tune_run = stages["tune"]
    assert tune_run.info.status == "FINISHED" and tune_run.data.tags["proposal_source"] == "defaults"
    trials = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{tune_run.info.run_id}'")
    assert len(trials) == 3 and all(t.info.status == "FINISHED" and t.data.tags["kind"] == "trial" for t in trials)
    for trial in trials:  # every trial: per-epoch records (fewer when ASHA stopped it), and a memory record
        epochs = [m.step for m in client.get_metric_history(trial.info.run_id, "val_acc")]
        assert epochs in ([0], [0, 1]) and trial.data.metrics["epochs_run"] == len(epochs)
        assert trial.data.tags["early_stopped"] == str(len(epochs) < 2).lower()
        assert trial.data.tags["memory"] == "kd"
        assert trial.data.tags["placement.node_id"] == ray_session.get_runtime_context().get_node_id()
    # the stage's placement: one entry per finished trial, in the order Tune created them
    assert tune_run.data.tags["placement.node_ids"] == ray_session.get_runtime_context().get_node_id()
    assert [r.split(":")[0] for r in tune_run.data.tags["placement.ranks"].split(",")] == ["0", "1", "2"]
    placed = next(s["placement"] for s in summary["stages"] if s["name"] == "tune")
    assert [r["node_id"] for r in placed["ranks"]] == [t.data.tags["placement.node_id"] for t in sorted(
        trials, key=lambda t: int(t.data.tags["trial_index"]))]
    first = min(trials, key=lambda t: int(t.data.tags["trial_index"]))  # the proposal is evaluated first
    assert float(first.data.params["distill.temperature.T"]) == 4.0
    assert float(first.data.params["distill.train.lr"]) == 0.05

    cm = json.loads((tmp_path / "results.json").read_text())["config_manager"]
    assert cm["source"] == "defaults" and cm["proposals"][0]["config"] == pytest.approx(PUBLISHED)
    best = max(trials, key=lambda t: t.data.metrics["best_val_acc"])
    assert cm["best_trial"] == best.data.tags["trial_id"]
    assert cm["best_val_acc"] == pytest.approx(best.data.metrics["best_val_acc"])
    chosen = cm["chosen"]
    assert float(best.data.params["distill.temperature.T"]) == pytest.approx(chosen["T"])

    distill = stages["distill"].data.params  # the final stage ran with the chosen configuration
    assert float(distill["distill.temperature.T"]) == pytest.approx(chosen["T"])
    assert float(distill["distill.methods.kd.weight"]) == pytest.approx(chosen["kd_share"])
    assert float(distill["distill.ce_weight"]) == pytest.approx(1 - chosen["kd_share"])
    assert float(distill["train.lr"]) == pytest.approx(chosen["lr"])
    assert float(distill["train.weight_decay"]) == pytest.approx(chosen["weight_decay"])
    assert stages["distill"].data.metrics["temperature"] == pytest.approx(chosen["T"])
    assert [m.step for m in client.get_metric_history(stages["distill"].info.run_id, "val_acc")] == [0, 1]


def test_finished_distillations_are_queryable_from_the_store(tuned):
    summary, uri, _ = tuned
    records = recall(MlflowClient(uri))
    assert sorted(r.source for r in records) == ["distill", "trial", "trial", "trial"]
    distill = next(r for r in records if r.source == "distill")
    assert distill.task.dataset == "digits" and distill.task.num_classes == 10
    assert distill.task.student_family == "mlp" and distill.task.methods == ("kd",)
    assert distill.task.size_ratio > 10 and distill.epochs == 2
    assert distill.config == pytest.approx(summary["config_manager"]["chosen"])
    assert distill.retention == pytest.approx(distill.val_acc / distill.task.teacher_acc[0])
    import mlflow  # any process can query the memory with plain MLflow
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string="tags.memory = 'kd' and metrics.`meta.log_classes` > 2")
    assert len(found) == 4


def test_proposals_come_from_the_memory_when_similar_runs_exist(tuned, teacher_checkpoint):
    summary, uri, tmp_path = tuned
    client = MlflowClient(uri)
    teacher = next(s for s in summary["stages"] if s["name"] == "teacher_mlp")
    known = teacher_result(teacher["metrics"]["val_acc"], int(teacher["metrics"]["params"]))
    wider = digits_config(tmp_path, teacher_checkpoint, "student.options.hidden=24")  # a new, similar task
    proposals = proposed(wider, known, client)
    assert {p.source for p in proposals} == {"memory:knn"}
    best = max(recall(client), key=lambda r: r.retention)  # one similar task: its best configurations, best first
    assert proposals[0].config == pytest.approx(best.config) and best.run_id in proposals[0].basis
    assert len(proposals) == 3  # four records, three distinct configurations (distill ran the best trial's)
    cold = digits_config(tmp_path, teacher_checkpoint, "student.options.hidden=24", "config_manager.memory=false")
    assert [p.source for p in proposed(cold, known, client)] == ["defaults"]
    other = digits_config(tmp_path, teacher_checkpoint, "config_manager.memory_experiments=[elsewhere]")
    assert [p.source for p in proposed(other, known, client)] == ["defaults"]


# --- a killed search resumes -------------------------------------------------------------------------------------

def finished_trials(client: MlflowClient, budget: int) -> tuple[list, list]:
    """(trial runs that logged their last epoch, trial runs that logged any epoch) in the experiment ``cm``."""
    experiment = client.get_experiment_by_name("cm")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'trial' and metrics.epochs_run >= 1")
    return [r for r in runs if r.data.metrics["epochs_run"] >= budget], runs


def test_a_killed_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path, teacher_checkpoint):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = digits_overrides(tmp_path, teacher_checkpoint, "config_manager.budget_epochs=3",
                                 "config_manager.max_concurrent=1",
                                 f"ray.address={ray_session.get_runtime_context().gcs_address}")
    code_version.cache_clear()  # the driver below hashes the sources now; so must this process, for equal keys
    code_version()
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hpmkd.cli import main; sys.exit(main())", "run",
         str(ROOT / "conf" / "smoke.yaml"), "--tracking-uri", uri, *[f"--set={o}" for o in overrides]],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(uri)
    try:  # kill the driver once a trial has finished and the next one has trained an epoch
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline:
            assert driver.poll() is None, f"the driver ended early:\n{driver.stdout.read()}"
            done, started = finished_trials(client, 3)
            if len(done) >= 1 and len(started) >= 2:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the search never got to its second trial")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = time.time() * 1000
    # Finished before the kill, as far as Tune knew: a trial whose successor had started (one trial at a time, so Tune
    # had recorded its end). The newest trial may have logged its last epoch while Tune had not yet recorded its
    # report; the resumed search then retrains that epoch from its previous checkpoint, which is allowed.
    newest = max(started, key=lambda r: r.info.start_time).info.run_id
    before = {r.data.tags["trial_id"]: r.info.run_id for r in done if r.info.run_id != newest}
    assert before

    summary = run_experiment(load_config(ROOT / "conf" / "smoke.yaml", overrides), tracking_uri=uri)

    tune = next(s for s in summary["stages"] if s["name"] == "tune")
    assert tune["status"] == "FINISHED" and tune["metrics"]["trials"] == 3
    tune_run = client.get_run(tune["run_id"])
    trials = client.search_runs([tune_run.info.experiment_id], "tags.kind = 'trial'")
    if list((tmp_path / "runs" / "ray").glob(f"cm-tune-*{SET_ASIDE_INFIX}*")):
        # the kill landed while Tune copied a state file, cutting it off: the search was set aside and ran again
        assert tune_run.data.tags["restored"] == "false" and tune["metrics"]["trials_restored"] == 0
        assert sorted(t.info.status for t in trials).count("FINISHED") == 3
        assert all(t.info.status == "FAILED" for t in trials if t.info.run_id in before.values())
        return
    assert tune["metrics"]["trials_restored"] >= 2
    assert tune_run.data.tags["restored"] == "true"
    assert len(trials) == 3  # the same three trials, none started again under a new id
    assert all(t.info.status == "FINISHED" and t.data.tags["mlflow.parentRunId"] == tune["run_id"] for t in trials)
    for trial_id, run_id in before.items():  # finished before the kill: kept as they were, not trained again
        history = client.get_metric_history(run_id, "val_acc")
        assert sorted(m.step for m in history) == [0, 1, 2], trial_id
        assert all(m.timestamp <= killed_at for m in history), trial_id
    for trial in trials:
        assert client.get_run(trial.info.run_id).data.metrics["epochs_run"] == 3
    assert next(s for s in summary["stages"] if s["name"] == "distill")["status"] == "FINISHED"
    searches = list((tmp_path / "runs" / "ray").glob("cm-tune-*"))
    assert searches and not list(searches[0].glob("*/checkpoint_*"))  # trial checkpoints pruned once it finished
