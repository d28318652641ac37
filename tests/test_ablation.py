"""``hpmkd ablate``: the statistics against numbers computed by hand, and one real ablation end to end (the full
pipeline and ``no_meta_temperature`` over 2 seeds on digits) in a real SQLite MLflow store: tagged variants, teacher
stages reused across the variants of a seed, the table and figures from the records, a resume that runs nothing,
and a failed variant that is recorded and reported while the ablation goes on."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient
from scipy import stats

import hpmkd.pipelines.ablate
from conftest import train_digits_teacher
from hpmkd.components.report import write_report
from hpmkd.components.report.ablation import (ABLATION_TAG, CONSTANT, HELPS, HURTS, NO_DIFFERENCE, NO_RUN, NO_SIGNIFICANT,
                                        UNTESTED, VARIANT_TAG, ablation_table, paired_test)
from hpmkd.components.report.ablation_files import ablation_markdown, write_ablation
from hpmkd.components.report.records import ExperimentRecords, PipelineRecord, load_experiment
from hpmkd.components.tracking import Tracker, child_runs
from hpmkd.cli import main
from hpmkd.registry import ConfigError
from hpmkd.pipelines.ablate import plan_ablation

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "conf" / "smoke.yaml"

# --- statistics, from hand-made records (no MLflow, no Ray) ------------------------------------------------------

FULL_ACC = {"0": 0.80, "1": 0.82, "2": 0.81}
VARIANT_ACC = {
    "no_attention": {"0": 0.78, "1": 0.81, "2": 0.78},       # differences -0.02 -0.01 -0.03: p ~ 0.07
    "no_memory": {"0": 0.70, "1": 0.715, "2": 0.71},         # -0.10 -0.105 -0.10: helps
    "no_chain": {"0": 0.85, "1": 0.88, "2": 0.86},           # +0.05 +0.06 +0.05: hurts
    "no_parallel": dict(FULL_ACC),                           # identical
    "no_config_manager": {"0": 0.79, "1": 0.81, "2": 0.80},  # -0.01 in every seed: no spread
    "no_meta_temperature": {"2": 0.83},                      # one seed only
}


def record(variant: str, seed: str, acc: float | None, start: int, status: str = "FINISHED",
           error: str | None = None, ablation: str = "abl") -> PipelineRecord:
    metrics = {} if acc is None else {"student_test_acc": acc, "retention": acc / 0.9, "wall_s": 10.0 + start}
    return PipelineRecord(f"run-{variant}-{seed}-{start}", f"hpmkd-seed{seed}", "hpmkd", seed, status, start, start + 1,
                          metrics, {"seed": seed}, {ABLATION_TAG: ablation, VARIANT_TAG: variant}, error, ())


@pytest.fixture
def table():
    runs = [record("full", s, a, i) for i, (s, a) in enumerate(FULL_ACC.items())]
    runs += [record(v, s, a, 10 + 10 * j + i) for j, (v, accs) in enumerate(VARIANT_ACC.items())
             for i, (s, a) in enumerate(accs.items())]
    runs += [record("no_meta_temperature", "0", None, 100, "FAILED", "loss became NaN"),
             record("no_memory", "1", None, 101, "FAILED", "a later failure does not hide the finished run"),
             record("full", "0", 0.1, 102, ablation="another ablation")]
    return ablation_table(ExperimentRecords("exp", "1", tuple(runs)), "abl")


def by_name(table):
    return {row.name: row for row in table.variants}


def test_variants_are_in_order_with_mean_and_sample_std_over_seeds(table):
    rows = by_name(table)
    assert list(rows) == ["full", *VARIANT_ACC]
    assert table.seeds == ("0", "1", "2")
    full = rows["full"]
    assert [r.seed for r in full.results] == ["0", "1", "2"]
    assert full.test_acc.mean == pytest.approx(0.81) and full.test_acc.std == pytest.approx(0.01) and full.test_acc.n == 3
    assert full.retention.mean == pytest.approx(0.81 / 0.9)
    assert full.wall_s.mean == pytest.approx(11.0) and full.wall_s.std == pytest.approx(1.0)
    assert full.paired is None  # the other ablation's run does not count
    memory = rows["no_memory"]  # the newest run of a seed counts, but a later failure does not replace a finished run
    assert memory.test_acc.mean == pytest.approx(np.mean([0.70, 0.715, 0.71]))
    assert memory.test_acc.std == pytest.approx(np.std([0.70, 0.715, 0.71], ddof=1))


def test_paired_differences_and_t_test_match_a_hand_computation(table):
    for name, accs in VARIANT_ACC.items():
        test = by_name(table)[name].paired
        seeds = [s for s in FULL_ACC if s in accs]
        d = np.array([accs[s] - FULL_ACC[s] for s in seeds])
        assert test.seeds == tuple(seeds)
        assert test.differences == pytest.approx(d.tolist())
        assert test.difference.mean == pytest.approx(d.mean())
        if len(d) < 2 or np.ptp(d) < 1e-9:  # no spread: no test
            assert test.t is None and test.p is None
            continue
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        assert test.difference.std == pytest.approx(d.std(ddof=1))
        assert test.t == pytest.approx(t)
        assert test.p == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    attention = by_name(table)["no_attention"].paired
    assert attention.difference.mean == pytest.approx(-0.02) and attention.difference.std == pytest.approx(0.01)
    assert attention.t == pytest.approx(-0.02 / (0.01 / math.sqrt(3)))  # -3.464
    assert attention.p == pytest.approx(0.0742, abs=1e-4)


def test_verdicts(table):
    verdicts = {row.name: row.paired.verdict for row in table.variants if row.paired}
    assert verdicts == {"no_attention": NO_SIGNIFICANT, "no_memory": HELPS, "no_chain": HURTS,
                        "no_parallel": NO_DIFFERENCE, "no_config_manager": CONSTANT, "no_meta_temperature": UNTESTED}
    assert paired_test(["0"], [0.5], [0.4]).p is None  # fewer than 2 pairs: no test


def test_pairs_without_a_finished_run_are_listed(table):
    assert [(u.variant, u.seed, u.status, u.error) for u in table.unfinished] == [
        ("no_meta_temperature", "0", "FAILED", "loss became NaN"), ("no_meta_temperature", "1", NO_RUN, None)]


def test_files(table, tmp_path):
    files = write_ablation(table, tmp_path)
    assert {f.name for f in files} == {"ablation.md", "ablation.csv", "ablation.json", "ablation_accuracy.png",
                                       "ablation_differences.png"}
    text = (tmp_path / "ablation.md").read_text()
    assert "**memory** helps" in text and "**chain** hurts" in text
    assert "**attention**: no significant difference at p < 0.05" in text and "p = 0.0742" in text
    assert "**meta_temperature**: not testable yet: 1 paired seed(s)" in text
    assert "| no_attention | attention | 0, 1, 2 | 79.00 ± 1.73 |" in text
    assert "loss became NaN" in text
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "ablation.csv").open())}
    assert float(rows["no_chain"]["diff_mean"]) == pytest.approx(0.16 / 3) and rows["no_chain"]["verdict"] == HURTS
    assert rows["full"]["p"] == "" and rows["no_parallel"]["t"] == ""
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["alpha"] == 0.05 and data["variants"][1]["paired"]["p"] == pytest.approx(0.0742, abs=1e-4)
    for figure in files[3:]:
        assert imread(figure).shape[2] in (3, 4)


def test_plan_errors_come_before_anything_runs():
    with pytest.raises(ConfigError, match="Did you mean 'attention'"):
        plan_ablation(SMOKE, 2, ["atention"])
    with pytest.raises(ConfigError, match="already off"):
        plan_ablation(SMOKE, 2, ["attention"], ["components.attention=false"])
    with pytest.raises(ConfigError, match="at least 1 seed"):
        plan_ablation(SMOKE, 0)
    plan = plan_ablation(SMOKE, 3, ["memory", "attention"], ["seed=7"])
    assert [v.name for v in plan.variants] == ["full", "no_attention", "no_memory"] and plan.seeds == (0, 1, 2)
    assert plan.config_for(plan.variants[2], 1).components.memory is False
    assert plan_ablation(SMOKE, 1, ["memory"], ["output_dir=/elsewhere"]).ablation_id == plan.ablation_id
    assert plan_ablation(SMOKE, 1, ["memory"], ["train.lr=0.1"]).ablation_id != plan.ablation_id


# --- end to end: a real ablation on digits ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A small MLP teacher for digits, trained in-process and saved as a checkpoint (loaded by each pipeline run)."""
    return train_digits_teacher(tmp_path_factory.mktemp("teacher"), hidden=64, depth=1, epochs=3)


@pytest.fixture(scope="module")
def ablation(ray_session, teacher, tmp_path_factory):
    """``hpmkd ablate`` with the full pipeline (KD with the meta temperature) and ``no_meta_temperature`` (fixed T)
    over seeds 0 and 1: 4 pipeline runs, each a loaded teacher and one distillation on Ray Train."""
    root = tmp_path_factory.mktemp("ablate")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = ["experiment=ablate", "data={name: digits}", "distill.baseline=false", "mlflow.log_models=false",
            f"teachers=[{{name: mlp, model: mlp, options: {{hidden: 64, depth: 1}}, checkpoint: {teacher}}}]",
            "student={model: mlp, options: {hidden: 16, depth: 1}}", "train={epochs: 2, batch_size: 64, lr: 0.05}",
            "distill.temperature={schedule: meta, T: 4.0, meta_lr: 0.5}", f"output_dir={root / 'runs'}"]
    args = ["ablate", str(SMOKE), "--seeds", "2", "--tracking-uri", uri, *[f"--set={s}" for s in sets]]
    assert main([*args, "--components", "meta_temperature", "--output", str(root / "out")]) == 0
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("ablate").experiment_id
    return {"args": args, "uri": uri, "client": client, "experiment_id": experiment_id, "root": root,
            "runs": pipeline_runs(client, experiment_id)}


def pipeline_runs(client: MlflowClient, experiment_id: str) -> dict[tuple[str, str], object]:
    runs = client.search_runs([experiment_id], "tags.kind = 'pipeline'")
    return {(r.data.tags[VARIANT_TAG], r.data.tags["seed"]): r for r in runs}


def test_each_variant_and_seed_is_one_tagged_pipeline_run(ablation):
    runs = ablation["runs"]
    assert sorted(runs) == [("full", "0"), ("full", "1"), ("no_meta_temperature", "0"), ("no_meta_temperature", "1")]
    assert len({r.data.tags[ABLATION_TAG] for r in runs.values()}) == 1
    for (variant, _), run in runs.items():
        assert run.info.status == "FINISHED"
        removed = variant == "no_meta_temperature"
        assert run.data.params["components.meta_temperature"] == str(not removed)
        assert run.data.params["distill.temperature.schedule"] == ("fixed" if removed else "meta")


def test_teacher_stages_are_reused_across_the_variants_of_a_seed(ablation):
    client, experiment_id = ablation["client"], ablation["experiment_id"]
    for seed in ("0", "1"):
        full = child_runs(client, experiment_id, ablation["runs"]["full", seed].info.run_id)
        removed = child_runs(client, experiment_id, ablation["runs"]["no_meta_temperature", seed].info.run_id)
        assert "reused" not in full["teacher_mlp"].data.tags
        assert removed["teacher_mlp"].data.tags["reused"] == "true"
        assert removed["teacher_mlp"].data.tags["reused_from"] == full["teacher_mlp"].info.run_id
        assert "reused" not in removed["distill"].data.tags  # the distillation differs: computed


def test_the_table_is_the_records(ablation):
    out, runs = ablation["root"] / "out", ablation["runs"]
    data = json.loads((out / "ablation.json").read_text())
    acc = {key: run.data.metrics["student_test_acc"] for key, run in runs.items()}
    full, removed = data["variants"]
    assert [r["test_acc"] for r in full["results"]] == [acc["full", "0"], acc["full", "1"]]
    assert removed["name"] == "no_meta_temperature" and removed["paired"]["seeds"] == ["0", "1"]
    d = [acc["no_meta_temperature", s] - acc["full", s] for s in ("0", "1")]
    assert removed["paired"]["differences"] == pytest.approx(d)
    assert removed["test_acc"]["mean"] == pytest.approx(np.mean([acc["no_meta_temperature", s] for s in "01"]))
    assert "**meta_temperature**" in (out / "ablation.md").read_text()
    assert len(list(csv.DictReader((out / "ablation.csv").open()))) == 2
    for name in ("ablation_accuracy.png", "ablation_differences.png"):
        assert imread(out / name).shape[2] in (3, 4)
    client = ablation["client"]
    (logged,) = client.search_runs([ablation["experiment_id"]], "tags.kind = 'ablation'")
    assert logged.data.tags[ABLATION_TAG] == data["ablation_id"]
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "ablation")} >= {
        "ablation/ablation.md", "ablation/ablation.csv", "ablation/ablation.json", "ablation/ablation_accuracy.png"}


def test_the_report_shows_the_ablation(ablation):
    text = write_report(ablation["uri"], ablation["root"] / "report", ["ablate"]).read_text()
    part = text.split("### Ablation\n")[1].split("\n### ")[0]
    assert "| no_meta_temperature | meta_temperature | 0, 1 |" in part
    records = load_experiment(ablation["client"], "ablate", ablation["experiment_id"])
    table = ablation_table(records, next(iter(ablation["runs"].values())).data.tags[ABLATION_TAG])
    assert ablation_markdown(table, {}).split("\n\n")[1] in part  # the same table as ablation.md's


def test_a_rerun_resumes_and_a_failed_variant_is_reported(ablation, monkeypatch, capsys):
    """The same ablation again, now also removing ``memory``: the finished pairs are skipped (no new pipeline run);
    ``no_memory`` fails in both seeds (a runner that records its pipeline run FAILED, as a failed stage would) and
    the ablation goes on, then reports both failures (exit status 1) in its output and table."""
    client, experiment_id = ablation["client"], ablation["experiment_id"]
    stage_runs = len(client.search_runs([experiment_id], "tags.kind = 'stage'"))
    calls = []

    def failing_runner(cfg, *, tracking_uri, ray_init, tags):
        calls.append((tags[VARIANT_TAG], cfg.seed))
        with Tracker(tracking_uri, cfg.experiment).run("hpmkd-failing", {**tags, "kind": "pipeline",
                                                                         "seed": str(cfg.seed)}):
            raise RuntimeError("stage distill failed: simulated worker crash")

    monkeypatch.setattr(hpmkd.pipelines.ablate, "run_experiment", failing_runner)
    out = ablation["root"] / "again"
    assert main([*ablation["args"], "--components", "meta_temperature", "memory", "--output", str(out)]) == 1
    assert calls == [("no_memory", 0), ("no_memory", 1)]  # nothing else ran
    assert len(client.search_runs([experiment_id], "tags.kind = 'stage'")) == stage_runs
    runs = pipeline_runs(client, experiment_id)
    assert {k: r.info.run_id for k, r in runs.items() if k[0] != "no_memory"} == {
        k: r.info.run_id for k, r in ablation["runs"].items()}
    assert {r.info.status for k, r in runs.items() if k[0] == "no_memory"} == {"FAILED"}
    err = capsys.readouterr().err
    assert "FAILED: no_memory seed 0" in err and "simulated worker crash" in err
    text = (out / "ablation.md").read_text()
    assert "| no_memory | 0 | FAILED |" in text and "| no_memory | 1 | FAILED |" in text
    assert "**meta_temperature**" in text and "**memory**: not testable yet: 0 paired seed(s)" in text
    assert len(client.search_runs([experiment_id], "tags.kind = 'ablation'")) == 2
