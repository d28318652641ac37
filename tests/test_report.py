"""``hpmkd report`` on a real MLflow store: one tiny real ``kd`` run (and its fully reused rerun), plus a second
seed and a failed run recorded by hand with MlflowClient; the report's numbers must be the store's."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from hpmkd.components.report import REPORT_FILE, write_report
from hpmkd.components.report.records import load_experiments, open_store
from hpmkd.components.report import plots
from hpmkd.components.report.sections import compression_points, timeline_bars
from hpmkd.components.tracking import child_runs
from hpmkd.cli import main
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.max_train=600", "data.max_val=200", "data.max_test=400", "train.epochs=1", "train.batch_size=32",
        "distill.train={epochs: 2}", "mlflow.log_models=false"]
SEED1 = {"student_test_acc": 0.5, "retention": 0.9, "compression": 12.0, "wall_s": 30.0}
ERROR = "worker lost: out of memory (marked by the test)"


@pytest.fixture(scope="module")
def store(ray_session, tmp_path_factory):
    """A store with: the tiny run (seed 0), the same run again (every stage reused), a hand-made seed-1 run of the
    same configuration, a hand-made FAILED seed-2 run, and an experiment ``bare`` whose one run has no stages."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [*TINY, f"output_dir={root / 'runs'}"])
    first = run_experiment(cfg, tracking_uri=uri)
    again = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(first["parent_run_id"])
    params = dict(parent.data.params)
    seed1 = pipeline_run(client, parent.info.experiment_id, {**params, "seed": "1"}, "1")
    client.log_batch(seed1, metrics=[Metric(k, v, 0, 0) for k, v in SEED1.items()], synchronous=True)
    client.set_terminated(seed1, "FINISHED")
    failed = pipeline_run(client, parent.info.experiment_id, {**params, "seed": "2"}, "2")
    client.set_tag(failed, "error", ERROR)
    client.set_terminated(failed, "FAILED")
    bare = client.create_experiment("bare")
    client.set_terminated(pipeline_run(client, bare, {"seed": "0"}, "0"), "FINISHED")
    out = root / "out"
    path = write_report(uri, out, ["smoke", "bare"])
    return {"uri": uri, "client": client, "first": first, "again": again, "seed1": seed1, "failed": failed,
            "out": out, "text": path.read_text(), "experiment_id": parent.info.experiment_id}


def pipeline_run(client: MlflowClient, experiment_id: str, params: dict[str, str], seed: str) -> str:
    """A pipeline run recorded by hand (tags as :mod:`hpmkd.pipelines.runner` sets them), left RUNNING."""
    run_id = client.create_run(experiment_id, run_name=f"kd-seed{seed}",
                               tags={"kind": "pipeline", "pipeline": "kd", "seed": seed}).info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)
    return run_id


def experiment_text(text: str, name: str) -> str:
    """The part of the report about experiment ``name``."""
    return text.split(f"## Experiment `{name}`")[1].split("\n## ")[0]


def section_text(text: str, title: str) -> str:
    return text.split(f"### {title}\n")[1].split("\n### ")[0]


def table_rows(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text`` as dicts by column title."""
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_runs_table_shows_the_recorded_numbers(store):
    runs = section_text(experiment_text(store["text"], "smoke"), "Pipeline runs")
    rows = {r["run"][-9:-1]: r for r in table_rows(runs)}
    client = store["client"]
    for summary in (store["first"], store["again"]):
        row = rows[summary["parent_run_id"][:8]]
        stages = child_runs(client, store["experiment_id"], summary["parent_run_id"])
        student = stages["distill"].data.metrics["test_acc"]
        assert float(row["student test acc (%)"]) == pytest.approx(student * 100, abs=0.005)
        parent = client.get_run(summary["parent_run_id"]).data.metrics
        assert float(row["retention"]) == pytest.approx(parent["retention"], abs=0.0005)
        assert float(row["compression (×)"]) == pytest.approx(parent["compression"], abs=0.05)
        assert (row["seed"], row["status"], row["config"]) == ("0", "FINISHED", "A")
    assert rows[store["seed1"][:8]]["config"] == "A"  # same params apart from the seed
    assert rows[store["failed"][:8]]["status"] == "FAILED"


def test_mean_and_std_over_seeds_take_the_newest_finished_run_of_each_seed(store):
    runs = section_text(experiment_text(store["text"], "smoke"), "Pipeline runs")
    table = runs.split("Mean ± std over seeds")[1].split("\n", 1)[1].strip()
    (row,) = table_rows(table)
    assert (row["config"], row["seeds"], row["n"]) == ("A", "0, 1", "2")  # the FAILED seed 2 does not count
    accs = [store["again"]["student"]["test_acc"] * 100, SEED1["student_test_acc"] * 100]
    assert row["student test acc (%)"] == f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"


def test_compression_points_come_from_the_stage_runs(store):
    (smoke,) = load_experiments(open_store(store["uri"]), ["smoke"])
    points = compression_points(smoke)
    # the rerun reused all four stages: each model counts once
    assert sorted(p.group for p in points) == ["distill", "student_alone", "teacher_cnn", "teacher_mlp"]
    stages = child_runs(store["client"], store["experiment_id"], store["first"]["parent_run_id"])
    best = max((stages[n] for n in ("teacher_cnn", "teacher_mlp")), key=lambda r: r.data.metrics["test_acc"])
    distill = next(p for p in points if p.group == "distill")
    assert distill.role == "distilled"
    assert distill.compression == pytest.approx(best.data.metrics["params"] / stages["distill"].data.metrics["params"])
    assert distill.accuracy == stages["distill"].data.metrics["test_acc"]
    assert {p.role for p in points if p.group.startswith("teacher_")} == {"teacher"}


def test_the_figures_are_valid_pngs_linked_from_the_report(store):
    smoke = experiment_text(store["text"], "smoke")
    for name in ("accuracy_vs_compression", "teacher_weights", "temperature", "timeline"):
        path = store["out"] / f"smoke-{name}.png"
        assert f"]({path.name})" in smoke, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100, name


def test_the_timeline_marks_the_reused_stages(store):
    timeline = section_text(experiment_text(store["text"], "smoke"), "Stage timeline")
    rows = table_rows(timeline.split("\n\n", 2)[2])
    first_ids = {s["name"]: s["run_id"][:8] for s in store["first"]["stages"]}
    again = store["again"]["parent_run_id"][:6]
    reused = {r["stage"]: r["reused"] for r in rows if r["pipeline run"].endswith(again)}
    assert reused == {name: f"yes ({run_id})" for name, run_id in first_ids.items()}
    first = store["first"]["parent_run_id"][:6]
    assert {r["reused"] for r in rows if r["pipeline run"].endswith(first)} == {"no"}


def test_the_timeline_shows_the_node_each_stage_trained_on(store):
    """The nodes come from the stage runs' ``placement.nodes`` tags: in the table, and in the figure's fill colours
    and legend (the session's one Ray node)."""
    stages = child_runs(store["client"], store["experiment_id"], store["first"]["parent_run_id"])
    recorded = {name: run.data.tags.get("placement.nodes") for name, run in stages.items()}
    assert all(recorded.values()), recorded  # every stage of the smoke pipeline trains on Ray Train
    (node,) = set(recorded.values())
    timeline = section_text(experiment_text(store["text"], "smoke"), "Stage timeline")
    first = store["first"]["parent_run_id"][:6]
    rows = [r for r in table_rows(timeline.split("\n\n", 2)[2]) if r["pipeline run"].endswith(first)]
    assert {r["stage"]: r["nodes"] for r in rows} == recorded

    (smoke,) = load_experiments(open_store(store["uri"]), ["smoke"])
    mine = [p for p in smoke.pipelines if p.run_id == store["first"]["parent_run_id"]]
    bars, _ = timeline_bars(mine)
    assert {b.row.split(" · ")[-1]: b.nodes for b in bars} == {name: (node,) for name in recorded}
    ax = plots.timeline_figure(bars).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == node and "finished" in legend and plots.NO_NODE not in legend
    colour = plots.node_colours(bars)[node]
    assert {to_hex(p.get_facecolor()[:3]) for p in ax.patches} == {to_hex(colour)}


def test_a_stage_on_several_nodes_is_split_into_a_strip_per_node():
    bars = [plots.Bar("a", 0.0, 5.0, "FINISHED", False, ("head", "node1")),
            plots.Bar("b", 1.0, 3.0, "FAILED", False, ("node1",)),
            plots.Bar("c", 2.0, 4.0, "KILLED", True, ())]
    ax = plots.timeline_figure(bars).axes[0]
    colours = plots.node_colours(bars)
    fills = [(to_hex(p.get_facecolor()[:3]), round(p.get_height(), 3), p.get_hatch()) for p in ax.patches]
    assert fills == [(to_hex(colours["head"]), 0.4, None), (to_hex(colours["node1"]), 0.4, None),
                     (to_hex(colours["node1"]), 0.8, "xx"), (to_hex(plots.NO_NODE_COLOUR), 0.8, "..//")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["head", "node1", plots.NO_NODE, "finished",
                                                                    "failed", "killed", "reused"]
    assert to_hex(ax.patches[2].get_edgecolor()[:3]) == to_hex("tab:red")


def test_the_failed_run_is_listed_with_its_error(store):
    failures = section_text(experiment_text(store["text"], "smoke"), "Failed and killed runs")
    (row,) = table_rows(failures)
    assert (row["level"], row["status"], row["error"]) == ("pipeline", "FAILED", ERROR)
    assert row["pipeline run"].endswith(store["failed"][:6])


def test_missing_data_is_said_not_drawn(store):
    bare = experiment_text(store["text"], "bare")
    assert "No stage in this experiment recorded `teacher_weight.*`" in bare
    assert "No stage in this experiment recorded a `temperature` metric" in bare
    assert "No stage runs recorded." in bare
    assert "No student stage in this experiment recorded calibration metrics" in bare
    assert "No failed or killed runs." in bare
    assert not list(store["out"].glob("bare-*.png"))


def test_the_cli_logs_nothing_unless_asked(store, tmp_path):
    client = store["client"]
    before = len(client.search_runs([store["experiment_id"]]))
    assert main(["report", "--tracking-uri", store["uri"], "--experiment", "smoke", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / REPORT_FILE).is_file()
    assert len(client.search_runs([store["experiment_id"]])) == before
    assert main(["report", "--tracking-uri", store["uri"], "--experiment", "smoke", "--out", str(tmp_path / "b"),
                 "--log"]) == 0
    (logged,) = client.search_runs([store["experiment_id"]], "tags.kind = 'report'")
    files = {a.path for a in client.list_artifacts(logged.info.run_id, "report")}
    assert files == {"report/report.md", *(f"report/smoke-{n}.png" for n in
                                           ("accuracy_vs_compression", "teacher_weights", "temperature", "timeline",
                                            "reliability"))}


def test_an_unknown_experiment_is_an_error_listing_the_known_ones(store, tmp_path, capsys):
    assert main(["report", "--tracking-uri", store["uri"], "--experiment", "smok", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'smok'" in err and "smoke" in err and "bare" in err
    assert not (tmp_path / REPORT_FILE).exists()
