"""The ``hpmkd`` pipeline and its six component switches (``components.<name>: false``,
:mod:`hpmkd.pipelines.switches`).

Every switch is shown to change the computation: the stage graph (``config_manager``, ``chain``), the teacher
weights and the temperature of a real in-process distillation (``attention``, ``meta_temperature``; no Ray), the
schedule of a stage graph (``parallel``), and whether a rerun recomputes its stages (``memory``, on a small ``kd``
run). One end-to-end run of the pipeline on digits (two teachers given as checkpoints, a planned one-assistant
chain, a two-trial search) with real Ray and a real MLflow store.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hpmkd.components.config_manager import memory_records
from hpmkd.components.graph import StageResult
from hpmkd.components.scheduler import run_graph
from hpmkd.components.tracking import child_runs
from hpmkd import checkpoint
from hpmkd.config import DataConfig, TrainConfig, load_config
from hpmkd.config_schema import flatten, to_dict
from hpmkd.pipelines import PIPELINES, plan_experiment
from hpmkd.pipelines.switches import COMPONENTS, SWITCHES, ComponentsConfig, effective_config
from hpmkd.data import load_dataset
from hpmkd.registry import ConfigError
from hpmkd.teachers import LocalTeachers
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.pipelines.runner import run_experiment
from hpmkd.models.ref import ModelRef

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "conf" / "default.yaml"
DIGITS = DataConfig(name="digits")
#: two teachers of one family but different sizes, and the student; the chain is planned from teacher ``a``
TEACHERS = {"a": ModelRef("mlp", {"hidden": 128, "depth": 2}), "b": ModelRef("mlp", {"hidden": 64, "depth": 1})}
STUDENT = "student={model: mlp, options: {hidden: 16, depth: 1}}"


def default_with(*extra: str):
    """``conf/default.yaml`` (its distill recipe, chain and configuration manager) as written, plus ``extra``."""
    return load_config(DEFAULT, list(extra))


def changed_keys(before, after) -> dict[str, tuple]:
    """The flattened config keys whose values differ between two configs."""
    a, b = flatten(before.as_dict()), flatten(after.as_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# --- the components section --------------------------------------------------------------------------------------

#: per switch, the config keys its plain counterpart sets in conf/default.yaml (besides ``components.<name>``)
COUNTERPARTS = {
    "config_manager": {"config_manager.enabled": (True, False)},
    "chain": {"chain.assistants": (None, "[]")},
    "attention": {"distill.aggregator.name": ("attention", "mean_logits")},
    "meta_temperature": {"distill.temperature.schedule": ("meta", "fixed"), "distill.temperature.T_min": (2.0, None),
                         "distill.temperature.T_max": (6.0, None)},
    "parallel": {"ray.parallel": (True, False)},
    "memory": {"reuse": (True, False), "config_manager.memory": (True, False)},
}


@pytest.mark.parametrize("name", COMPONENTS)
def test_each_switch_replaces_exactly_its_component_and_is_idempotent(name):
    written = default_with(f"components.{name}=false")
    effective = effective_config(written)
    assert changed_keys(written, effective) == COUNTERPARTS[name]
    assert effective_config(effective) == effective
    assert effective_config(default_with()) == default_with()  # every switch on: the config as written


def test_the_components_section_is_checked_like_any_other():
    assert COMPONENTS == ("config_manager", "chain", "attention", "meta_temperature", "parallel", "memory")
    assert list(to_dict(ComponentsConfig())) == list(COMPONENTS) and SWITCHES.names() == sorted(COMPONENTS)
    with pytest.raises(ConfigError, match=r"components\.atention: unknown key\. Did you mean 'attention'"):
        default_with("components.atention=false")
    with pytest.raises(ConfigError, match=r"components\.chain: expected bool"):
        default_with("components.chain=3")
    fixed = effective_config(default_with("components.meta_temperature=false"))
    assert fixed.distill.temperature == {"schedule": "fixed", "T": 4.0}  # the meta schedule's initial T


# --- config_manager and chain: the stage graph -------------------------------------------------------------------

def graph(*extra: str) -> dict[str, list[str]]:
    """The default's stage graph (name -> dependencies) with ``extra`` overrides."""
    return {s.name: s.deps for s in plan_experiment(default_with(*extra)).stages}


def test_config_manager_switch_removes_the_tune_stage():
    on, off = graph(), graph("components.config_manager=false")
    assert on["tune"] == ["teacher_cnn", "teacher_mlp"] and "tune" in on["assistant_1"] and "tune" in on["distill"]
    assert "tune" not in off
    assert off["assistant_1"] == ["teacher_cnn", "teacher_mlp", "chain_plan"]  # the measured plan decides on it
    assert off["distill"] == ["teacher_cnn", "teacher_mlp", "assistant_1"]
    assert off["chain_plan"] == ["teacher_cnn", "student_alone"]


def test_chain_switch_removes_the_assistants_and_the_student_distils_from_the_teachers():
    on, off = graph(), graph("components.chain=false")
    assert on["distill"] == ["teacher_cnn", "teacher_mlp", "assistant_1", "tune"]
    assert not [name for name in off if name.startswith("assistant_")]
    assert off["distill"] == ["teacher_cnn", "teacher_mlp", "tune"]
    plan = plan_experiment(default_with("components.chain=false"))
    direct = {s.name: s for s in plan.stages}["distill"]
    # exactly the kd pipeline's distill stage (same settings, same content key)
    assert direct.params == PIPELINES.get("kd")(plan.cfg)[-1].params


# --- attention and meta_temperature: a real distillation, in process ---------------------------------------------

@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    """Teachers ``a`` and ``b`` trained on digits in this process (4 and 2 epochs), and ``noise``: ``b``'s model at
    its random initialisation (a useless teacher). Saved as checkpoint files."""
    folder = tmp_path_factory.mktemp("teachers")
    for name, epochs in (("a", 4), ("b", 2)):
        states = []
        spec = StageSpec(f"teacher_{name}", 0, DIGITS, TEACHERS[name], TrainConfig(epochs=epochs, batch_size=64))
        train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
        torch.save(states[-1]["best"]["model"], folder / f"{name}.pt")
    torch.manual_seed(1)
    splits = load_dataset("digits", **DIGITS.loader_kwargs(0))
    torch.save(TEACHERS["b"].build(splits.shape).state_dict(), folder / "noise.pt")
    return {name: folder / f"{name}.pt" for name in ("a", "b", "noise")}


def distil_in_process(teacher_files: dict[str, Path], *extra: str) -> list[dict[str, float]]:
    """The per-epoch metrics of the default's distillation recipe (effective config) on digits, 4 epochs, with two
    teachers run in this process: ``a`` (trained) and, as ``b``, the useless ``noise``."""
    cfg = effective_config(default_with("data={name: digits}", STUDENT, "train={epochs: 4, batch_size: 64}", *extra))
    splits = load_dataset("digits", **cfg.data.loader_kwargs(cfg.seed))
    models = []
    for name, model_cfg in TEACHERS.items():
        model = model_cfg.build(splits.shape)
        model.load_state_dict(checkpoint.read_model_state(teacher_files["noise" if name == "b" else name]))
        models.append(model)
    spec = StageSpec("distill", cfg.seed, cfg.data, ModelRef(cfg.student.model, cfg.student.options),
                     cfg.recipe().train, distill=cfg.distill, teacher_names=list(TEACHERS),
                     teacher_models=list(TEACHERS.values()))
    return train_stage(spec, StageEnv(teachers=LocalTeachers(list(TEACHERS), models)))["history"]


@pytest.fixture(scope="module")
def all_on(teacher_files):
    return distil_in_process(teacher_files)


def test_attention_switch_learned_per_sample_weights_against_the_plain_mean(teacher_files, all_on):
    learned = [epoch["teacher_weight.a"] for epoch in all_on]
    assert all(abs(w - 0.5) > 0.02 for w in learned)  # produced by the attention network, not uniform
    assert learned[-1] > learned[0] + 0.1  # and it learns to trust the trained teacher more than the useless one
    for epoch in all_on:
        assert epoch["teacher_weight.a"] + epoch["teacher_weight.b"] == pytest.approx(1.0)
        assert epoch["loss.aggregator.attn_label"] > 0  # the attention network's own loss term
    mean = distil_in_process(teacher_files, "components.attention=false")
    assert all(epoch["teacher_weight.a"] == epoch["teacher_weight.b"] == 0.5 for epoch in mean)
    assert not any(key.startswith("loss.aggregator") for key in mean[0])


def test_meta_temperature_switch_learned_temperature_against_a_fixed_one(teacher_files, all_on):
    learned = [epoch["temperature"] for epoch in all_on]
    assert len(set(learned)) == len(learned) and learned[0] != 4.0  # moves every epoch, away from its start
    assert all(2.0 < t < 6.0 for t in learned)
    fixed = distil_in_process(teacher_files, "components.meta_temperature=false")
    assert [epoch["temperature"] for epoch in fixed] == [4.0] * len(fixed)


# --- parallel: the schedule ---------------------------------------------------------------------------------------

def schedule(*extra: str) -> dict[str, tuple[float, float]]:
    """Run the default's stage graph (effective config) with the scheduler the runner uses; every stage sleeps
    0.3 s. Returns each stage's (start, end) in seconds."""
    cfg = effective_config(default_with(*extra))
    times: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()
    origin = time.perf_counter()

    def run_stage(stage, inputs) -> StageResult:
        began = time.perf_counter() - origin
        time.sleep(0.3)
        with lock:
            times[stage.name] = (began, time.perf_counter() - origin)
        return StageResult(stage.name, stage.kind, None, "FINISHED", 0.3)

    results, error = run_graph(plan_experiment(cfg).stages, run_stage, capacity_cpus=2.0, parallel=cfg.ray.parallel)
    assert error is None and all(r.status == "FINISHED" for r in results.values())
    return times


def overlapping(times: dict[str, tuple[float, float]]) -> set[frozenset[str]]:
    names = sorted(times)
    return {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]
            if times[a][0] < times[b][1] - 0.05 and times[b][0] < times[a][1] - 0.05}


def test_parallel_switch_runs_independent_stages_side_by_side_or_one_at_a_time():
    side_by_side = overlapping(schedule())
    assert frozenset(("teacher_cnn", "teacher_mlp")) in side_by_side  # two 1-CPU teachers on 2 CPUs
    assert overlapping(schedule("components.parallel=false")) == set()


# --- the pipeline end to end, and memory ------------------------------------------------------------------------

def digits_run(tmp_path: Path, teacher_files: dict[str, Path], *extra: str):
    """The default on digits: both teachers loaded from their checkpoints, the student 21.6x smaller than ``a`` (the
    teacher a chain is planned from), 4 epochs per stage, no student alone, and ``extra``."""
    teachers = ", ".join(f"{{name: {n}, model: {m.model}, options: {{hidden: {m.options['hidden']}, depth: "
                         f"{m.options['depth']}}}, checkpoint: {teacher_files[n]}}}" for n, m in TEACHERS.items())
    return default_with("data={name: digits}", f"teachers=[{teachers}]", STUDENT, "chain.plan_from=a",
                        "train={epochs: 4, batch_size: 64}",
                        "distill.baseline=false", "mlflow.log_models=false", f"output_dir={tmp_path / 'runs'}", *extra)


def run_and_read(cfg, uri: str):
    summary = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    return summary, parent, child_runs(client, parent.info.experiment_id, parent.info.run_id)


@pytest.fixture(scope="module")
def e2e(ray_session, teacher_files, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a planned one-assistant chain from teacher a (max_gap 8 over 21.6x), kept by the measured rule at a tiny
    # min_link_gain, and a 2-trial search on half the training split
    cfg = digits_run(tmp_path, teacher_files, "experiment=hpmkd-e2e", "chain.max_gap=8", "distill.baseline=true",
                     "chain.min_link_gain=0.001", "config_manager.trials=2", "config_manager.trial_fraction=0.5",
                     "config_manager.scheduler=fifo")
    return run_and_read(cfg, uri)


def test_hpmkd_chain_links_distil_from_the_teachers_and_the_previous_link(e2e):
    summary, parent, runs = e2e
    assert set(runs) == {"teacher_a", "teacher_b", "student_alone", "chain_plan", "tune", "assistant_1", "distill"}
    plan = runs["chain_plan"].data
    teacher, alone = (runs[name].data.metrics["selected_val_acc"] for name in ("teacher_a", "student_alone"))
    gap = (teacher - alone) / alone
    assert plan.metrics["capacity_gap"] == pytest.approx(gap) and plan.metrics["assistants_kept"] == 1
    assert "pays for itself and is trained" in plan.tags["chain_decision"]
    assert all(run.info.status == "FINISHED" for run in runs.values()) and parent.info.status == "FINISHED"
    assistant, student = runs["assistant_1"].data, runs["distill"].data
    assert [assistant.params[f"teachers.{i}"] for i in range(2)] == ["teacher_a", "teacher_b"]
    assert [student.params[f"teachers.{i}"] for i in range(3)] == ["teacher_a", "teacher_b", "assistant_1"]
    assert assistant.params["options.hidden"] == "75" and assistant.params["chain.index"] == "1"
    # the student's ensemble: both teachers and the assistant, weighed by the attention network, at a learned T
    assert {k for k in student.metrics if k.startswith("teacher_weight.")} == \
        {"teacher_weight.a", "teacher_weight.b", "teacher_weight.assistant_1"}
    assert student.params["distill.aggregator.name"] == "attention"
    assert student.params["distill.temperature.schedule"] == "meta"
    assert student.tags["teacher_outputs"] == "cache" and student.params["cache.assistant_1"]
    # the tune stage searched from the teachers, and both links ran with its choice
    chosen = summary["config_manager"]["chosen"]
    assert float(assistant.params["distill.temperature.T"]) == pytest.approx(chosen["T"])
    assert float(student.params["distill.temperature.T"]) == pytest.approx(chosen["T"])
    assert summary["student"]["stage"] == "distill" and summary["student"]["params"] == 1210
    assert summary["student"]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert parent.data.params["components.attention"] == "True"


def test_a_measured_chain_plan_drops_an_assistant_that_does_not_pay_for_itself(ray_session, teacher_files, tmp_path):
    """With min_link_gain 0.5 the gap between teacher a and the student alone pays for no assistant: assistant_1
    trains nothing, and the student distils from the two teachers only (not from a copy of one of them)."""
    cfg = digits_run(tmp_path, teacher_files, "experiment=measured", "chain.max_gap=8", "distill.baseline=true",
                     "chain.min_link_gain=0.5", "components.config_manager=false")
    summary, parent, runs = run_and_read(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "FINISHED"
    plan, skipped, student = runs["chain_plan"].data, runs["assistant_1"], runs["distill"].data
    assert plan.metrics["assistants_planned"] == 1 and plan.metrics["assistants_kept"] == 0
    assert "does not pay for itself" in plan.tags["chain_decision"]
    assert skipped.data.tags["chain_status"] == "skipped" and "keeps 0 of 1" in skipped.data.tags["skipped_because"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(skipped.info.run_id,
                                                                                  "train_loss") == []
    assert student.tags["teachers_left_out"] == "assistant_1"
    assert {k for k in student.metrics if k.startswith("teacher_weight.")} == {"teacher_weight.a", "teacher_weight.b"}
    assert summary["student"]["stage"] == "distill" and summary["student"]["test_acc"] > 0.5


def stage_reuse(runs) -> dict[str, bool]:
    return {name: run.data.tags.get("reused") == "true" for name, run in runs.items()}


def test_memory_switch_a_rerun_reuses_finished_stages_only_with_memory(ray_session, teacher_files, tmp_path):
    """A small ``kd`` run (two loaded teachers, one distillation), then the same config twice: with memory every
    stage is reused; without, every stage is recomputed, and the configuration manager would read no past runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = digits_run(tmp_path, teacher_files, "experiment=memory", "pipeline=kd", "components.config_manager=false")
    _, _, first = run_and_read(cfg, uri)
    keys = {name: run.data.tags["stage_key"] for name, run in first.items()}
    assert set(keys) == {"teacher_a", "teacher_b", "distill"} and not any(stage_reuse(first).values())

    _, _, again = run_and_read(cfg, uri)
    assert stage_reuse(again) == {name: True for name in keys}
    assert {name: run.data.tags["stage_key"] for name, run in again.items()} == keys
    client = MlflowClient(uri)
    assert client.get_metric_history(again["distill"].info.run_id, "val_acc") == []  # nothing trained

    forgetful = digits_run(tmp_path, teacher_files, "experiment=memory", "pipeline=kd",
                           "components.config_manager=false", "components.memory=false")
    assert memory_records(forgetful, client) and memory_records(effective_config(forgetful), client) == []
    _, parent, recomputed = run_and_read(forgetful, uri)
    assert stage_reuse(recomputed) == {name: False for name in keys}
    assert {name: run.data.tags["stage_key"] for name, run in recomputed.items()} == keys  # the same stages
    assert len(client.get_metric_history(recomputed["distill"].info.run_id, "val_acc")) == 4  # trained again
    assert parent.data.params["reuse"] == "False" and parent.data.params["config_manager.memory"] == "False"
