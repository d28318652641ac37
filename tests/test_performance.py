"""Where a stage's time goes (phases in MLflow and the results), live progress fed by the workers' own epoch reports,
and the scheduler's duration estimates learnt from recorded runs (critical path first)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from conftest import train_digits_teacher
from mlflow import MlflowClient

from hpmkd.cli import library_messages_to, parser
from hpmkd.components.estimates import PRIOR_FIXED_S, PRIOR_S_PER_ROW_EPOCH, PastStage, estimate, estimate_all
from hpmkd.components.graph import Stage, StageResult
from hpmkd.components.progress import EpochReport, LineDisplay, StageProgress
from hpmkd.components.scheduler import critical_path, run_graph, upward_rank
from hpmkd.components.stage_params import ChainPlanRecord, TrainModel
from hpmkd.components.tracking import child_runs
from hpmkd.config import DataConfig, TrainConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.models.ref import ModelRef
from hpmkd.phases import Phases
from hpmkd.pipelines.runner import run_experiment
from hpmkd.registry import ConfigError
from hpmkd.training import StageEnv, StageSpec, train_stage

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "conf" / "smoke.yaml"
MLP = ModelRef("mlp", {"hidden": 16, "depth": 1})


def train(name: str, epochs: int, model: str = "mlp", deps: tuple[str, ...] = ()) -> Stage:
    return Stage(name, TrainModel(ModelRef(model, {}), TrainConfig(epochs=epochs), teacher=name), list(deps))


# --- phases ---------------------------------------------------------------------------------------------------------


def test_phases_accumulate_and_become_stage_phase_metrics():
    phases = Phases()
    phases.add("epochs", 1.5)
    phases.add("epochs", 0.5)
    with phases.timed("report"):
        pass
    with pytest.raises(RuntimeError), phases.timed("test"):
        raise RuntimeError("the block's time is kept when it raises")
    assert list(phases.seconds) == ["epochs", "report", "test"]
    assert phases.seconds["epochs"] == 2.0
    assert set(phases.metrics()) == {"stage_phase.epochs_s", "stage_phase.report_s", "stage_phase.test_s"}


def test_the_training_loop_times_its_own_phases():
    reported: list[float] = []
    spec = StageSpec("phases", 0, DataConfig(name="digits"), MLP, TrainConfig(epochs=2, batch_size=64))
    out = train_stage(spec, StageEnv(report=lambda metrics, state: reported.append(metrics["epoch_time_s"])))
    phases = out["phases"]
    assert set(phases) == {"setup", "epochs", "report", "test"}
    assert all(v >= 0 for v in phases.values())
    assert phases["epochs"] >= sum(reported)  # the epochs' own times, plus the callbacks after validation


# --- progress -------------------------------------------------------------------------------------------------------


def test_a_stage_row_shows_epoch_loss_accuracy_and_eta():
    row = StageProgress("distill")
    assert row.eta_s() is None
    row.apply(EpochReport("distill", 0, 4, 0.9, 0.5, 10.0))
    row.apply(EpochReport("distill", 1, 4, 0.7, 0.6, 20.0))
    assert row.done == 2 and row.eta_s() == 30.0  # mean epoch 15 s, 2 epochs left
    assert row.line() == "stage distill: epoch 2/4 loss 0.7000 val_acc 0.6000 eta 0:30"


def test_quiet_progress_is_one_log_line_per_epoch(caplog):
    display = LineDisplay()
    row = StageProgress("teacher")
    with caplog.at_level(logging.INFO, logger="hpmkd"):
        for epoch in range(3):
            row.apply(EpochReport("teacher", epoch, 3, 1.0 / (epoch + 1), 0.5, 1.0))
            display.epoch(row)
    assert [r.getMessage() for r in caplog.records] == [
        "stage teacher: epoch 1/3 loss 1.0000 val_acc 0.5000 eta 0:02",
        "stage teacher: epoch 2/3 loss 0.5000 val_acc 0.5000 eta 0:01",
        "stage teacher: epoch 3/3 loss 0.3333 val_acc 0.5000 eta 0:00",
    ]


def test_run_takes_quiet_and_verbose_and_library_messages_go_to_a_file(tmp_path):
    args = parser().parse_args(["run", "x.yaml", "--quiet", "--verbose"])
    assert args.quiet and args.verbose
    path = library_messages_to(str(tmp_path / "logs" / "hpmkd.log"))
    try:
        logging.getLogger("ray.train").warning("worker group started")
        logging.getLogger("mlflow.store").info("creating tables")
        for handler in logging.getLogger("ray").handlers:
            handler.flush()
        text = Path(path).read_text()
        assert "worker group started" in text and "ray.train" in text
    finally:
        for name in ("ray", "mlflow", "alembic", "py.warnings"):
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = [], True
        logging.captureWarnings(False)


def test_library_messages_are_held_while_the_run_is_checked(tmp_path, capfd):
    from hpmkd.cli import hold_library_messages

    try:
        held = hold_library_messages()
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        assert capfd.readouterr().err == ""  # the checks' chatter is not shown
        path = library_messages_to(str(tmp_path / "hpmkd.log"), held)  # the run passed its checks
        logging.getLogger("ray.tune").info("trial started")
        for handler in logging.getLogger("ray").handlers:
            handler.flush()
        lines = Path(path).read_text().splitlines()
        assert [line.split(" ", 2)[2] for line in lines] == [
            "mlflow.store.db.utils INFO Creating initial MLflow database tables...", "ray.tune INFO trial started"]

        refused = hold_library_messages()  # a run refused by its checks writes no file, shows warnings as they come
        logging.getLogger("mlflow.store").info("chatter")
        logging.getLogger("ray").warning("a warning worth seeing")
        assert capfd.readouterr().err == "a warning worth seeing\n"
        refused.close()  # what the interpreter's exit does to it: nothing more is shown
        assert capfd.readouterr().err == ""
    finally:
        for name in ("ray", "mlflow", "alembic", "py.warnings"):
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = [], True
        logging.captureWarnings(False)


def test_a_quiet_run_reads_artifacts_back_without_progress_bars(tmp_path, capfd, monkeypatch):
    """A reused stage reads its files back from MLflow, which drew a progress bar per file on stderr."""
    from mlflow import MlflowClient

    from hpmkd.cli import ARTIFACT_PROGRESS_BAR, hold_library_messages

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("bars", str(tmp_path / "artifacts"))).info.run_id
    (tmp_path / "record.json").write_text("{}")
    client.log_artifact(run_id, str(tmp_path / "record.json"))
    monkeypatch.setenv(ARTIFACT_PROGRESS_BAR, "true")  # MLflow's default (the variable is restored after the test)
    capfd.readouterr()
    client.download_artifacts(run_id, "record.json", str(tmp_path / "loud"))
    assert "Downloading artifacts" in capfd.readouterr().err
    try:
        monkeypatch.delenv(ARTIFACT_PROGRESS_BAR)  # unset, as in a user's shell
        hold_library_messages().close()
        client.download_artifacts(run_id, "record.json", str(tmp_path / "quiet"))
        assert capfd.readouterr().err == ""
    finally:
        for name in ("ray", "mlflow", "alembic", "py.warnings"):
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = [], True
        logging.captureWarnings(False)


# --- estimates and the scheduler -------------------------------------------------------------------------------------


def test_estimates_come_from_the_most_similar_past_runs():
    past = [PastStage("train_teacher", "mlp", 1000.0, 12.0, 10.0),  # 0.01 s per row-epoch, 2 s fixed
            PastStage("train_teacher", "mlp", 2000.0, 23.0, 20.0),  # 0.01, 3 s
            PastStage("train_teacher", "cnn", 1000.0, 52.0, 50.0),  # 0.05, 2 s
            PastStage("distill", "cnn", 1000.0, 104.0, 100.0)]      # 0.1, 4 s
    assert estimate(train("t", epochs=4, model="mlp"), 1000, past) == pytest.approx(2.5 + 0.01 * 4000)
    distil = Stage("d", TrainModel(ModelRef("mlp", {}), TrainConfig(epochs=2)), [])
    assert distil.kind == "train_student"
    assert estimate(distil, 100, past) == pytest.approx(2.5 + 0.01 * 200)  # no train_student run: same model
    assert estimate(train("t", epochs=3), 10, []) == PRIOR_FIXED_S + PRIOR_S_PER_ROW_EPOCH * 30
    plan = Stage("plan", ChainPlanRecord({}), [])
    assert estimate(plan, 10, [PastStage("chain_plan", None, 0.0, 0.25, None)]) == 0.25


def test_ready_stages_start_critical_path_first():
    # a (short, nothing after it) and b (short, but c waits for it): with one CPU, b starts first
    stages = [train("a", 1), train("b", 1), train("c", 1, deps=("b",))]
    estimates = {"a": 30.0, "b": 10.0, "c": 50.0}
    assert upward_rank(stages, estimates) == {"a": 30.0, "b": 60.0, "c": 50.0}
    assert critical_path(stages, estimates) == ["b", "c"]
    started: list[str] = []
    lock = threading.Lock()

    def run_stage(stage: Stage, inputs: dict[str, StageResult]) -> StageResult:
        with lock:
            started.append(stage.name)
        return StageResult(stage.name, stage.kind, None, "FINISHED", 0.0)

    results, error = run_graph(stages, run_stage, capacity_cpus=1.0, estimates=estimates)
    assert error is None and started[0] == "b"
    assert {n: r.estimate_s for n, r in results.items()} == estimates
    started.clear()
    run_graph(stages, run_stage, capacity_cpus=1.0)  # no estimates: the pipeline's order
    assert started[0] == "a"


def test_an_unknown_stage_order_is_refused():
    with pytest.raises(ConfigError, match="ray.order"):
        load_config(SMOKE, ["ray.order=fastest"])


# --- end to end: a real run on Ray --------------------------------------------------------------------------------


class RecordingDisplay:
    """A display that keeps what it was shown."""

    def __init__(self) -> None:
        self.starts: list[str] = []
        self.epochs: list[tuple[str, int, int, float]] = []
        self.ends: list[tuple[str, str]] = []

    def started(self, stage: StageProgress) -> None:
        self.starts.append(stage.name)

    def epoch(self, stage: StageProgress) -> None:
        self.epochs.append((stage.name, stage.done, stage.epochs, stage.train_loss))

    def finished(self, stage: StageProgress, status: str) -> None:
        self.ends.append((stage.name, status))

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def recorded_run(ray_session, tmp_path_factory):
    """A teacher and a distillation on digits, through Ray Train, with a progress display."""
    root = tmp_path_factory.mktemp("perf")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(SMOKE, [
        "experiment=perf", "data={name: digits}", "distill.baseline=false", "mlflow.log_models=false",
        "teachers=[{name: mlp, model: mlp, options: {hidden: 32, depth: 1}, train: {epochs: 3}}]",
        "student={model: mlp, options: {hidden: 16, depth: 1}}", "train={epochs: 2, batch_size: 64, lr: 0.05}",
        f"output_dir={root / 'runs'}"])
    display = RecordingDisplay()
    summary = run_experiment(cfg, tracking_uri=uri, display=display)
    return summary, uri, display, cfg


def test_progress_receives_every_epoch_from_the_workers(recorded_run):
    summary, uri, display, _ = recorded_run
    client = MlflowClient(uri)
    runs = child_runs(client, client.get_experiment_by_name("perf").experiment_id, summary["parent_run_id"])
    for stage, epochs in (("teacher_mlp", 3), ("distill", 2)):
        shown = [(done, total, loss) for name, done, total, loss in display.epochs if name == stage]
        logged = [m.value for m in sorted(client.get_metric_history(runs[stage].info.run_id, "train_loss"),
                                          key=lambda m: m.step)]
        assert [(d, t) for d, t, _ in shown] == [(e + 1, epochs) for e in range(epochs)]
        assert [loss for _, _, loss in shown] == pytest.approx(logged)  # the worker's own numbers
    assert sorted(display.starts) == ["distill", "teacher_mlp"]
    assert sorted(display.ends) == [("distill", "FINISHED"), ("teacher_mlp", "FINISHED")]


def test_each_stage_records_its_phases_in_mlflow_and_the_results(recorded_run):
    summary, uri, _, cfg = recorded_run
    client = MlflowClient(uri)
    rows = training_rows(cfg)
    runs = child_runs(client, client.get_experiment_by_name("perf").experiment_id, summary["parent_run_id"])
    expected = {"claim", "worker_start", "setup", "epochs", "report", "test", "fit_end", "copy_out", "record_files",
                "total"}
    for row in summary["stages"]:
        metrics = runs[row["name"]].data.metrics
        recorded = {k[len("stage_phase."):-2] for k in metrics if k.startswith("stage_phase.")}
        assert expected <= recorded, row["name"]
        assert metrics["stage_phase.total_s"] == pytest.approx(row["phases"]["total"])
        assert metrics["stage_phase.total_s"] >= metrics["stage_phase.epochs_s"] + metrics["stage_phase.worker_start_s"]
        assert metrics["work.rows"] == rows
        assert metrics["work.epochs"] == {"teacher_mlp": 3, "distill": 2}[row["name"]]
        assert row["estimate_s"] > 0
    assert "teacher_outputs" in next(r for r in summary["stages"] if r["name"] == "distill")["phases"]
    assert summary["schedule"]["critical_path"] == ["teacher_mlp", "distill"]
    assert summary["schedule"]["critical_path_actual_s"] == pytest.approx(sum(r["wall_s"] for r in summary["stages"]))


def training_rows(cfg) -> int:
    return len(load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed)).train)


def test_estimates_learn_from_the_recorded_runs(recorded_run):
    summary, uri, _, cfg = recorded_run
    client = MlflowClient(uri)
    rows = training_rows(cfg)
    stages = [train("mlp", 3, model="mlp"), train("mlp_longer", 30, model="mlp"), train("cnn", 3, model="cnn_small")]
    estimates = estimate_all(stages, rows, client)
    teacher = next(r for r in summary["stages"] if r["name"] == "teacher_mlp")
    # the same stage again: the recorded run's own fixed cost and rate, i.e. its recorded time
    assert estimates["mlp"] == pytest.approx(teacher["phases"]["total"])
    rate = teacher["phases"]["epochs"] / (3 * rows)
    assert estimates["mlp_longer"] == pytest.approx(estimates["mlp"] + rate * 27 * rows)
    # an unseen model: the same kind's recorded runs (the mlp teacher), not the prior
    assert estimates["cnn"] == pytest.approx(estimates["mlp"])
    assert critical_path(stages, estimates)[0] == "mlp_longer"


def test_tune_trials_are_shown_as_rows_of_their_stage(ray_session, tmp_path):
    """A search's trials report their epochs like stages do, each on a row ``tune/<trial id>``."""
    teacher = train_digits_teacher(tmp_path, hidden=32, depth=1, epochs=2)
    cfg = load_config(SMOKE, [
        "experiment=perf-tune", "data={name: digits}", "distill.baseline=false", "mlflow.log_models=false",
        f"teachers=[{{name: mlp, model: mlp, options: {{hidden: 32, depth: 1}}, checkpoint: {teacher}}}]",
        "student={model: mlp, options: {hidden: 16, depth: 1}}", "train={epochs: 1, batch_size: 64, lr: 0.05}",
        "config_manager={enabled: true, trials: 2, proposals: 2, budget_epochs: 2, scheduler: fifo}",
        f"output_dir={tmp_path / 'runs'}"])
    display = RecordingDisplay()
    run_experiment(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", display=display)
    trials = {name for name, *_ in display.epochs if name.startswith("tune/")}
    assert len(trials) == 2
    for trial in trials:
        assert [(done, total) for name, done, total, _ in display.epochs if name == trial] == [(1, 2), (2, 2)]
    assert {name for name, _ in display.ends} >= trials | {"tune"}


def test_the_model_export_warm_up_runs_once_and_the_export_after_it_loads(tmp_path):
    """The warm-up thread is started once per process, ends, and leaves a real export working (the model it logs
    loads and predicts as the network does)."""
    import mlflow
    import torch

    from hpmkd.components import tracking

    tracking.warm_model_export()
    tracking.warm_model_export()
    assert len(tracking._WARMING) == 1
    tracking._WARMING[0].join(timeout=120)
    assert not tracking._WARMING[0].is_alive()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(uri, "warm")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 2, 2)
    tracker.log_model(run_id, net, x.numpy())
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert torch.allclose(loaded(x), net(x))
