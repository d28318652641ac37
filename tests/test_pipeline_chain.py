"""End to end: the ``takd`` and ``smskd`` pipelines on a Fashion-MNIST subset, with real Ray and a real MLflow store.

One teacher is trained once, in this process (no Ray), and given to both pipelines as a checkpoint (a
``load_teacher`` stage), so that the Ray Train fits spent here are the chain's and SMSKD's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs
from hpmkd import checkpoint
from hpmkd.config import DataConfig, TrainConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.distill_batch import DistillBatch, TeacherOutputs
from hpmkd.losses import LOSSES
from hpmkd.models import create_model, model_taps
from hpmkd.models.state import state_digest
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.pipelines.runner import run_experiment
from hpmkd.models.ref import ModelRef

ROOT = Path(__file__).resolve().parent.parent
DATA = {"max_train": 1200, "max_val": 300, "max_test": 600}
TEACHER = ModelRef("cnn", {"width": 12, "stem_stride": 2})
TINY = [f"data.{k}={v}" for k, v in DATA.items()] + [
    "train.epochs=2", "train.batch_size=32", "mlflow.log_models=false", "distill.baseline=false",
]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A small CNN teacher trained for 3 epochs in this process; its selected weights as a checkpoint file."""
    states = []
    spec = StageSpec("teacher", 0, DataConfig(**DATA), TEACHER, TrainConfig(epochs=3, batch_size=32))
    train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(states[-1]["best"]["model"], path)
    return path


def experiment(conf: str, tmp_path: Path, teacher: Path, *extra: str):
    teachers = f"teachers=[{{name: cnn, model: {TEACHER.model}, options: {json.dumps(TEACHER.options)}, checkpoint: {teacher}}}]"
    cfg = load_config(ROOT / "conf" / conf, [*TINY, teachers, f"output_dir={tmp_path / 'runs'}", *extra])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    return summary, client, child_runs(client, parent.info.experiment_id, parent.info.run_id)


def model_file(client: MlflowClient, run, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return client.download_artifacts(run.info.run_id, f"checkpoint/{checkpoint.MODEL_FILE}", str(folder))


def options(run) -> dict[str, str]:
    """A stage run's model options, from its params (``options.<key>``)."""
    return {k.removeprefix("options."): v for k, v in run.data.params.items() if k.startswith("options.")}


# ----------------------------------------------------------------------------------------------------------- takd
@pytest.fixture(scope="module")
def takd_run(ray_session, teacher_checkpoint, tmp_path_factory):
    """A planned chain of 3 assistants (max_gap 2 over 8x compression) with the ε rule set so high (a relative gain
    of 100%) that the chain stops after assistant 2: assistant 3 is skipped and the student distils from
    assistant 2."""
    tmp_path = tmp_path_factory.mktemp("takd")
    summary, client, runs = experiment("takd.yaml", tmp_path, teacher_checkpoint, "chain.max_gap=2.0",
                                       "chain.epsilon=1.0")
    return summary, client, runs, tmp_path


def test_takd_records_every_stage_as_a_nested_run_and_the_plan(takd_run):
    summary, client, runs, tmp_path = takd_run
    names = {"teacher_cnn", "chain_plan", "assistant_1", "assistant_2", "assistant_3", "distill"}
    assert set(runs) == names
    assert all(runs[n].info.status == "FINISHED" for n in names)
    assert summary["student"]["stage"] == "distill" and summary["student"]["model"] == "cnn"
    plan_run = runs["chain_plan"]
    assert plan_run.data.params["plan.steps"] == "4"
    folder = tmp_path / "plan"
    folder.mkdir()
    plan = json.loads(Path(client.download_artifacts(plan_run.info.run_id, "chain_plan.json", str(folder))).read_text())
    assert [m["role"] for m in plan["models"]] == ["teacher", "assistant", "assistant", "assistant", "student"]
    assert max(plan["ratios"]) <= 2.0
    assert {"chain_plan.json", "chain_plan.txt"} <= {a.path for a in client.list_artifacts(plan_run.info.run_id)}
    for i, planned in enumerate(plan["models"][1:3], start=1):  # the trained assistants are the planned models
        run = runs[f"assistant_{i}"]
        assert options(run) == {k: str(v) for k, v in planned["options"].items()}
        assert run.data.metrics["params"] == planned["params"]


def test_each_chain_step_distils_from_its_predecessor(takd_run, teacher_checkpoint):
    summary, client, runs, tmp_path = takd_run
    folder = tmp_path / "weights"
    digest = {name: checkpoint.file_digest(model_file(client, runs[name], folder / name))
              for name in ("assistant_1", "assistant_2")}
    first = runs["assistant_1"]
    assert first.data.params["teachers.0"] == "teacher_cnn" and first.data.params["chain.index"] == "1"
    assert first.data.tags["teacher_weights"] == checkpoint.file_digest(teacher_checkpoint)
    second = runs["assistant_2"]
    assert second.data.params["teachers.0"] == "assistant_1"
    assert second.data.tags["teacher_weights"] == digest["assistant_1"]
    # relative validation gain over its own teacher, as recorded
    gain = (second.data.metrics["selected_val_acc"] - first.data.metrics["selected_val_acc"]) / first.data.metrics["selected_val_acc"]
    assert second.data.metrics["chain_gain"] == pytest.approx(gain)
    assert second.data.tags["chain_status"] == "trained"


def test_the_epsilon_rule_skips_the_rest_of_the_chain_and_the_student_learns_from_the_last_link(takd_run):
    summary, client, runs, tmp_path = takd_run
    folder = tmp_path / "weights"
    assert "chain.epsilon" not in runs["assistant_2"].data.params  # the rule never tests link 1: link 2 always runs
    skipped = runs["assistant_3"]
    assert skipped.data.params["chain.epsilon"] == "1.0"
    assert runs["assistant_2"].data.metrics["chain_gain"] < 1.0
    assert skipped.data.tags["chain_status"] == "skipped"
    assert skipped.data.tags["forwarded_from"] == "assistant_2"
    assert skipped.data.metrics["chain_skipped"] == 1.0 and "chain_gain" not in skipped.data.metrics
    assert client.get_metric_history(skipped.info.run_id, "train_loss") == []  # nothing was trained
    assert skipped.data.metrics["selected_val_acc"] == runs["assistant_2"].data.metrics["selected_val_acc"]
    second = checkpoint.file_digest(model_file(client, runs["assistant_2"], folder / "a2"))
    assert checkpoint.file_digest(model_file(client, skipped, folder / "a3")) == second
    student = runs["distill"]
    assert student.data.params["teachers.0"] == "assistant_3"
    assert student.data.tags["teacher_weights"] == second
    assert options(student) == {"width": "4", "stem_stride": "2"} and "chain.index" not in student.data.params
    assert summary["student"]["test_acc"] > 0.3  # 10 classes: chance is 0.1


# ----------------------------------------------------------------------------------------------------------- smskd
@pytest.fixture(scope="module")
def smskd_run(ray_session, teacher_checkpoint, tmp_path_factory):
    """Two stages: FitNet hints, then KD anchored to the frozen stage-1 student (TCP weighting ``one_minus_tcp``)."""
    tmp_path = tmp_path_factory.mktemp("smskd")
    summary, client, runs = experiment("smskd.yaml", tmp_path, teacher_checkpoint, "student.options={width: 6, stem_stride: 2}")
    return summary, client, runs, tmp_path


def test_smskd_stages_are_nested_runs_each_with_its_method_and_validation_accuracy(smskd_run):
    summary, client, runs, _ = smskd_run
    assert set(runs) == {"teacher_cnn", "smskd_1", "smskd_2"}
    first, second = runs["smskd_1"], runs["smskd_2"]
    assert set(first.data.params) >= {"distill.methods.fitnet.weight"} and "distill.methods.kd.weight" not in first.data.params
    assert first.data.params["distill.ce_weight"] == "1.0"
    assert second.data.params["distill.methods.kd.weight"] == "0.5"
    assert second.data.params["distill.methods.reference.mode"] == "one_minus_tcp"
    assert "distill.methods.fitnet.weight" not in second.data.params
    for run in (first, second):
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2
        assert 0.3 < run.data.metrics["selected_val_acc"] <= 1.0
    assert len(client.get_metric_history(first.info.run_id, "loss.fitnet.hint")) == 2
    reference_loss = [m.value for m in client.get_metric_history(second.info.run_id, "loss.reference.reference")]
    assert len(reference_loss) == 2 and all(v >= 0 for v in reference_loss)
    assert summary["student"]["stage"] == "smskd_2"


def test_smskd_stage_starts_from_the_previous_student_and_its_reference_stays_frozen(smskd_run, teacher_checkpoint):
    summary, client, runs, tmp_path = smskd_run
    first, second = runs["smskd_1"], runs["smskd_2"]
    assert second.data.params["init_from"] == "smskd_1" and second.data.params["reference"] == "smskd_1"
    assert "init_from" not in first.data.params and "reference_weights" not in first.data.tags
    previous = model_file(client, first, tmp_path / "s1")
    assert second.data.tags["init_weights"] == checkpoint.file_digest(previous)
    assert second.data.tags["reference_weights"] == checkpoint.file_digest(previous)
    assert second.data.tags["teacher_weights"] == checkpoint.file_digest(teacher_checkpoint)
    # the reference's state after training (digest taken in the Ray Train worker) equals the stage-1 weights ...
    assert second.data.tags["reference_state_sha256"] == state_digest(checkpoint.read_model_state(previous))
    # ... while the student trained from those weights moved away from them
    final = checkpoint.read_model_state(model_file(client, second, tmp_path / "s2"))
    assert state_digest(final) != state_digest(checkpoint.read_model_state(previous))


@pytest.mark.parametrize("mode", ["one_minus_tcp", "tcp", "uniform"])
def test_tcp_weights_follow_the_trained_teachers_true_class_probability(teacher_checkpoint, mode):
    """On real validation images and the trained teacher: ``one_minus_tcp`` anchors most where the teacher is
    unsure of the true class, ``tcp`` where it is sure, ``uniform`` everywhere alike."""
    splits = load_dataset("fashion_mnist", **DataConfig(**DATA).loader_kwargs(0))
    teacher = create_model(TEACHER.model, 10, 1, (1, 28, 28), **TEACHER.options).eval()
    teacher.load_state_dict(checkpoint.read_model_state(teacher_checkpoint))
    x, y = splits.val.x[:256], splits.val.y[:256]
    with torch.no_grad():
        logits = teacher(x)
    tcp = logits.softmax(-1).gather(1, y[:, None])[:, 0]
    taps = model_taps(teacher)
    loss = LOSSES.build("reference", {"mode": mode}, num_classes=10, num_teachers=1, num_train=len(splits.train),
                        student_taps=taps, teacher_taps=[taps])
    batch = DistillBatch(x=x, y=y, index=torch.arange(len(y)), student_logits=logits, student_features={},
                         teachers=TeacherOutputs(logits[None]), teacher_weights=torch.ones(len(y), 1), mix="logits",
                         temperature=torch.tensor(4.0), reference_logits=logits)
    weights = loss.sample_weights(batch)
    expected = {"one_minus_tcp": 1 - tcp, "tcp": tcp, "uniform": torch.ones_like(tcp)}[mode]
    torch.testing.assert_close(weights, expected)
    wrong = logits.argmax(1) != y
    assert 0 < wrong.sum() < len(y)  # the teacher is good but not perfect on these images
    gap = weights[wrong].mean() - weights[~wrong].mean()
    assert {"one_minus_tcp": gap > 0.3, "tcp": gap < -0.3, "uniform": gap == 0}[mode]
