"""``mtbkd`` end to end on a tiny Fashion-MNIST subset with a real Ray and real MLflow stores: two teachers, two
posterior chains side by side, pooled; the posterior samples, the uncertainty metrics recorded for every student
(clean and shifted), R-hat across the chains, the report's section; a chain whose worker is killed mid-sampling
resumes to the very samples of an uninterrupted run (the single chain of a one-chain run in another store, which
computes what the first chain of the two-chain run does); a rerun reuses every stage."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from hpmkd import checkpoint
from hpmkd.components.report import write_report
from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.evaluation import evaluate
from hpmkd.data import load_dataset
from hpmkd.pipelines.runner import run_experiment
from hpmkd.predictors import WeightSamples, load_predictor
from conftest import kill_a_stage_worker

ROOT = Path(__file__).resolve().parent.parent
# 20 sampling epochs of about 0.1 s each: a window of 2 s for the watcher below to kill the chain in (5 left it
# 0.4 s, which a watcher slowed by a loaded machine missed)
MODE_EPOCHS, SAMPLE_EPOCHS = 2, 20
TINY = ["data.max_train=600", "data.max_val=200", "data.max_test=400", f"train.epochs={MODE_EPOCHS}",
        "train.batch_size=32", "teachers.0.train={epochs: 1}", "teachers.1.train={epochs: 1}", "distill.baseline=false",
        f"mtbkd.sample_epochs={SAMPLE_EPOCHS}", "mtbkd.burn_in=6", "mtbkd.samples=4", "mtbkd.sampler={lr: 2.0e-6}",
        "mlflow.log_models=false"]
SAMPLES, CHAINS = 4, 2
UNCERTAINTY = ("acc", "nll", "ece", "brier", "error_auroc", "selective_acc", "set_coverage", "set_size")


def config(root: Path, *extra: str):
    return load_config(ROOT / "conf" / "mtbkd.yaml", [*TINY, f"output_dir={root / 'runs'}", *extra])


def kill_chain_mid_sampling(uri: str, stop: threading.Event) -> list[int]:
    """Once the chain ``mtbkd`` has logged a sampling epoch (``posterior_phase`` 1) and not yet its last, SIGKILL the
    stage's worker (the stages run one at a time, so it is the chain's). The window is every sampling epoch but the
    first and the last (:data:`SAMPLE_EPOCHS`), so that a fast machine cannot finish the chain between two looks."""
    client, killed = MlflowClient(uri), []
    while not stop.is_set() and not killed:
        time.sleep(0.1)
        try:
            experiment = client.get_experiment_by_name("fashion-mnist-mtbkd")
            runs = client.search_runs([experiment.experiment_id], "tags.stage = 'mtbkd' and "
                                      "metrics.posterior_phase >= 1 and attributes.status = 'RUNNING'")
        except Exception:  # the store is created a moment later
            continue
        logged = len(client.get_metric_history(runs[0].info.run_id, "val_acc")) if runs else 0
        if MODE_EPOCHS < logged < MODE_EPOCHS + SAMPLE_EPOCHS:
            pid = kill_a_stage_worker()
            if pid is not None:
                killed.append(pid)
    return killed


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Run A (uninterrupted, then again), run B (one chain, one stage at a time, its worker killed mid-sampling)."""
    root = tmp_path_factory.mktemp("mtbkd")
    uri_a, uri_b = f"sqlite:///{root / 'a.db'}", f"sqlite:///{root / 'b.db'}"
    first = run_experiment(config(root / "a"), tracking_uri=uri_a)
    again = run_experiment(config(root / "a"), tracking_uri=uri_a)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=lambda: killed.extend(kill_chain_mid_sampling(uri_b, stop)))
    watcher.start()
    try:
        killed_run = run_experiment(config(root / "b", "mtbkd.chains=1", "ray.parallel=false", "ray.max_failures=2"),
                                    tracking_uri=uri_b)
    finally:
        stop.set()
        watcher.join()
    return {"root": root, "uri": uri_a, "uri_b": uri_b, "first": first, "again": again, "killed_run": killed_run,
            "killed": killed}


def stage_runs(uri: str, summary: dict) -> dict:
    client = MlflowClient(uri)
    return child_runs(client, client.get_experiment_by_name("fashion-mnist-mtbkd").experiment_id,
                      summary["parent_run_id"])


def payload_of(uri: str, run, folder: Path) -> dict:
    path = MlflowClient(uri).download_artifacts(run.info.run_id, "checkpoint/model.pt", str(folder))
    return checkpoint.load(path)


def test_the_chains_are_sampled_and_pooled_into_one_posterior(runs, tmp_path):
    summary = runs["first"]
    assert [(s["name"], s["kind"], s["status"]) for s in summary["stages"]] == [
        ("teacher_cnn", "train_teacher", "FINISHED"), ("teacher_mlp", "train_teacher", "FINISHED"),
        ("mtbkd_chain_1", "posterior_chain", "FINISHED"), ("mtbkd_chain_2", "posterior_chain", "FINISHED"),
        ("mtbkd", "pool_predictors", "FINISHED")]
    assert summary["student"]["stage"] == "mtbkd"
    stages = stage_runs(runs["uri"], summary)
    chains = [payload_of(runs["uri"], stages[f"mtbkd_chain_{k}"], tmp_path / str(k)) for k in (1, 2)]
    pooled = payload_of(runs["uri"], stages["mtbkd"], tmp_path / "pool")
    assert all(c["predictor"] == "weight_samples" and len(c["members"]) == SAMPLES for c in chains)
    assert pooled["predictor"] == "weight_samples" and len(pooled["members"]) == CHAINS * SAMPLES
    for mine, theirs in zip(pooled["members"], chains[0]["members"] + chains[1]["members"], strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # the chains start from their own initialisations; within a chain only the classifier head is sampled
    assert not torch.equal(chains[0]["members"][0]["stem.0.weight"], chains[1]["members"][0]["stem.0.weight"])
    first, last = chains[0]["members"][0], chains[0]["members"][-1]
    assert torch.equal(first["stem.0.weight"], last["stem.0.weight"]) and not torch.equal(first["fc.weight"],
                                                                                         last["fc.weight"])
    client = MlflowClient(runs["uri"])
    chain = stages["mtbkd_chain_1"]
    phases = [m.value for m in sorted(client.get_metric_history(chain.info.run_id, "posterior_phase"),
                                      key=lambda m: m.step)]
    lrs = [m.value for m in sorted(client.get_metric_history(chain.info.run_id, "lr"), key=lambda m: m.step)]
    assert phases == [0] * MODE_EPOCHS + [1] * SAMPLE_EPOCHS
    assert lrs[MODE_EPOCHS:] == [pytest.approx(2e-6)] * SAMPLE_EPOCHS
    assert chain.data.metrics["posterior_samples"] == SAMPLES
    assert chain.data.params["sampling.samples"] == str(SAMPLES) and chain.data.params["sampling.params"] == "head"


def test_every_student_records_the_uncertainty_metrics_and_the_pool_its_rhat(runs, tmp_path):
    stages = stage_runs(runs["uri"], runs["first"])
    for name in ("mtbkd_chain_1", "mtbkd_chain_2", "mtbkd", "teacher_cnn"):
        metrics = stages[name].data.metrics
        for prefix in ("test_", "test_noise_", "test_blur_"):
            assert {f"{prefix}{k}" for k in UNCERTAINTY} <= metrics.keys(), (name, prefix)
    pool = stages["mtbkd"].data.metrics
    assert pool["test_mutual_information"] > 0 and pool["pooled_members"] == CHAINS * SAMPLES
    assert pool["val_loglik_rhat"] > 0 and pool["val_loglik_rhat"] != stages["mtbkd_chain_1"].data.metrics[
        "val_loglik_rhat"]
    # the recorded numbers are the pooled predictor's, recomputed here from its file
    cfg = config(runs["root"] / "a")
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    path = MlflowClient(runs["uri"]).download_artifacts(stages["mtbkd"].info.run_id, "checkpoint/model.pt",
                                                        str(tmp_path))
    predictor = load_predictor(path, cfg.student.ref, splits.shape)
    assert isinstance(predictor, WeightSamples)
    acc, nll = evaluate(predictor, splits.test, 256, torch.device("cpu"))
    assert pool["test_acc"] == pytest.approx(acc) and pool["test_nll"] == pytest.approx(nll, rel=1e-5)


def test_a_chain_killed_mid_sampling_resumes_to_the_same_samples(runs, tmp_path):
    assert runs["killed"], "the watcher never found the chain's worker to kill"
    resumed = stage_runs(runs["uri_b"], runs["killed_run"])["mtbkd"]
    assert resumed.data.metrics["resumed_at_epoch"] > MODE_EPOCHS  # restarted from a checkpoint in the sampling phase
    uninterrupted = stage_runs(runs["uri"], runs["first"])["mtbkd_chain_1"]
    mine = payload_of(runs["uri_b"], resumed, tmp_path / "b")["members"]
    theirs = payload_of(runs["uri"], uninterrupted, tmp_path / "a")["members"]
    assert len(mine) == len(theirs) == SAMPLES
    for a, b in zip(mine, theirs):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_rerun_reuses_every_stage(runs):
    again = runs["again"]
    assert all(s["reused"] for s in again["stages"])
    assert again["student"]["test_acc"] == runs["first"]["student"]["test_acc"]


def test_the_report_shows_the_uncertainty_section_with_a_reliability_diagram(runs):
    out = runs["root"] / "report"
    text = write_report(runs["uri"], out, ["fashion-mnist-mtbkd"]).read_text()
    part = text.split("### Uncertainty and calibration\n")[1].split("\n### ")[0]
    pool = stage_runs(runs["uri"], runs["first"])["mtbkd"].data.metrics
    rows = [line for line in part.splitlines() if line.startswith("| mtbkd |")]
    assert [r.split("|")[3].strip() for r in rows] == ["clean", "blur", "noise"]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == f"{pool['test_acc'] * 100:.2f}" and cells[5] == f"{pool['test_ece']:.4f}"
    assert cells[-1] == f"{pool['val_loglik_rhat']:.3f}"
    figure = out / "fashion-mnist-mtbkd-reliability.png"
    assert "![reliability diagrams](fashion-mnist-mtbkd-reliability.png)" in part and imread(figure).shape[0] > 100
