"""The chain planner's choices, the ε rule, and the ``takd`` / ``smskd`` graphs and config errors (no Ray)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from hpmkd.chain import ChainLinkInfo, decide_links, describe_chain, knobs, plan_chain, relative_gain, stops_after
from hpmkd.components.graph import StageParams
from hpmkd.config import load_config
from hpmkd.registry import ConfigError
from hpmkd.pipelines import PIPELINES
from hpmkd.models.ref import DataShape, ModelRef

ROOT = Path(__file__).resolve().parent.parent
FMNIST = {"shape": DataShape(10, (1, 28, 28))}
SMALL = ModelRef("cnn_small", {"stem_stride": 2})  # 103,466 parameters


def size(model: ModelRef) -> int:
    return model.count_params(FMNIST["shape"])


def check_formula(plan, max_gap: float) -> None:
    """Every assistant is the buildable model nearest |θ_T|·r^{i/L}, within a few %; every step within max_gap;
    L is the fewest steps the ideal sizes allow."""
    t, s = plan.teacher.params, plan.student.params
    steps = plan.steps
    assert steps == max(1, math.ceil(math.log(t / s) / math.log(max_gap)))
    for i, assistant in enumerate(plan.assistants, start=1):
        target = t * (s / t) ** (i / steps)
        assert assistant.target == pytest.approx(target)
        assert assistant.params == size(assistant.model)
        assert abs(math.log(assistant.params / target)) < 0.1, (i, assistant.params, target)
    assert all(1 < r <= max_gap for r in plan.ratios)
    assert [m.params for m in plan.models] == sorted((m.params for m in plan.models), reverse=True)


def test_cnn_to_cnn_at_10x_takes_one_assistant_at_the_geometric_mean_size():
    student = ModelRef("cnn", {"width": 10, "stem_stride": 2})  # 10,560: 9.8x
    plan = plan_chain(SMALL, student, max_gap=4.0, **FMNIST)
    check_formula(plan, 4.0)
    (assistant,) = plan.assistants
    assert assistant.model == ModelRef("cnn", {"width": 18, "stem_stride": 2, "depth": 3})
    # width is the only knob (teacher and student both have depth 3) and 18 is the nearest whole width
    for width in (17, 19):
        other = size(replace(assistant.model, options={**assistant.model.options, "width": width}))
        assert abs(math.log(other / assistant.target)) > abs(math.log(assistant.params / assistant.target))
    assert "L = 2 keeps every step within it" in plan.why


def test_cnn_to_cnn_at_50x_takes_two_assistants():
    student = ModelRef("cnn", {"width": 4, "stem_stride": 2})  # 1,854: 55.8x
    plan = plan_chain(SMALL, student, max_gap=4.0, **FMNIST)
    check_formula(plan, 4.0)
    assert plan.steps == 3  # sqrt(55.8) = 7.5 > 4: one assistant would not do
    assert [a.model.options["width"] for a in plan.assistants] == [16, 8]
    assert plan.as_dict()["ratios"] == plan.ratios and plan.as_dict()["steps"] == 3


def test_depth_is_interpolated_geometrically_between_teacher_and_student_of_one_family():
    teacher = ModelRef("cnn_medium")  # width 48, depth 6: 667,354
    student = ModelRef("cnn", {"width": 9})  # depth 3: 8,614 (77x)
    plan = plan_chain(teacher, student, max_gap=4.0, **FMNIST)
    check_formula(plan, 4.0)
    depths = [a.model.options["depth"] for a in plan.assistants]
    assert depths == [round(6 ** (1 - i / 4) * 3 ** (i / 4)) for i in (1, 2, 3)] == [5, 4, 4]
    by_width = plan_chain(teacher, student, max_gap=4.0, scale="width", **FMNIST)
    assert [a.model.options["depth"] for a in by_width.assistants] == [3, 3, 3]
    by_depth = plan_chain(teacher, student, max_gap=4.0, scale="depth", **FMNIST)
    assert all(a.model.options["width"] == 9 for a in by_depth.assistants)
    assert all(r <= 4.0 for r in by_depth.ratios)


def test_resnet_to_resnet_keeps_valid_depths():
    plan = plan_chain(ModelRef("resnet110"), ModelRef("resnet8"), max_gap=3.0, **FMNIST)  # 22.3x
    check_formula(plan, 3.0)
    depths = [a.model.options["depth"] for a in plan.assistants]
    assert depths == [44, 20]  # 110^(2/3)·8^(1/3) = 45.9 and 19.2, snapped to 6n+2
    assert all((d - 2) % 6 == 0 for d in depths)
    assert all(a.model.model == "resnet8" and 0 < a.model.options["width_mult"] <= 1 for a in plan.assistants)


def test_heterogeneous_pair_uses_the_students_family_and_depth():
    teacher = ModelRef("mlp", {"hidden": 512})  # 669,706
    student = ModelRef("cnn", {"width": 9})  # 8,614 (77.7x)
    plan = plan_chain(teacher, student, max_gap=4.0, **FMNIST)
    check_formula(plan, 4.0)
    assert plan.family == "cnn" and plan.steps == 4
    assert all(a.model.model == "cnn" and a.model.options["depth"] == knobs(student)["depth"] for a in plan.assistants)
    assert "another family" in plan.why


@pytest.mark.parametrize("max_gap", [1.6, 2.5, 3.5, 8.0])
def test_no_step_exceeds_max_gap(max_gap):
    plan = plan_chain(ModelRef("cnn", {"width": 32, "depth": 4}), ModelRef("cnn", {"width": 6}),
                      max_gap=max_gap, max_steps=10, **FMNIST)
    assert max(plan.ratios) <= max_gap
    assert plan.steps >= math.log(plan.teacher.params / plan.student.params) / math.log(max_gap)


def test_a_small_enough_gap_needs_no_assistant():
    plan = plan_chain(SMALL, ModelRef("cnn", {"width": 10, "stem_stride": 2}), max_gap=16.0, **FMNIST)
    assert plan.assistants == [] and plan.steps == 1 and "no assistant" in plan.why


def test_planner_errors_name_the_key():
    student = ModelRef("cnn", {"width": 4, "stem_stride": 2})
    with pytest.raises(ConfigError, match=r"chain\.max_steps: no chain of at most 2 steps"):
        plan_chain(SMALL, student, max_gap=4.0, max_steps=2, **FMNIST)
    with pytest.raises(ConfigError, match=r"chain\.max_gap: must be > 1"):
        plan_chain(SMALL, student, max_gap=1.0, **FMNIST)
    with pytest.raises(ConfigError, match=r"student\.model: .*'resnet18'.*chain\.assistants"):
        plan_chain(SMALL, ModelRef("resnet18"), max_gap=4.0, **FMNIST)


def test_a_chain_given_by_hand_is_described_not_refused():
    assistants = [ModelRef("cnn", {"width": 24, "stem_stride": 2})]
    plan = describe_chain(SMALL, assistants, ModelRef("cnn", {"width": 4, "stem_stride": 2}), max_gap=4.0, **FMNIST)
    assert [m.params for m in plan.models] == [103_466, size(assistants[0]), 1_854]
    assert plan.ratios[0] == pytest.approx(103_466 / size(assistants[0]))
    assert "given by hand" in plan.why and "Above max_gap 4.0: step 2" in plan.why


# ----------------------------------------------------------------------------------------------------- the ε rule
def test_epsilon_rule():
    assert relative_gain(0.88, 0.80) == pytest.approx(0.1)
    assert not stops_after(1, -0.5, 0.01)  # never after link 1
    assert stops_after(2, 0.005, 0.01) and not stops_after(2, 0.02, 0.01)
    assert not stops_after(3, -0.5, None)  # rule off
    assert ChainLinkInfo(2, -0.02).stops_chain(-0.01)
    assert not ChainLinkInfo(2, -0.005).stops_chain(-0.01)
    assert ChainLinkInfo(2, skipped=True).stops_chain(None)  # stays stopped


def test_the_measured_first_link_rule_by_hand():
    # G = 0.02 / 0.88 = 0.02273; ln(1.02273) / ln(1.01) = 2.26: two steps carry >= 1 % each, the assistant is kept
    kept = decide_links(1, 0.90, 0.88, 0.01)
    assert (kept.planned, kept.kept) == (1, 1) and kept.gap == pytest.approx(0.02 / 0.88)
    assert "pays for itself and is trained" in kept.why and "0.9000" in kept.why and "0.8800" in kept.why
    # G = 0.005 / 0.895 = 0.00559 < (1.01)^2 - 1 = 0.0201: no assistant
    dropped = decide_links(1, 0.90, 0.895, 0.01)
    assert dropped.kept == 0 and "does not pay for itself" in dropped.why and "0.0201" in dropped.why
    # G = 0.07 / 0.85 = 0.0824; ln(1.0824) / ln(1.02) = 3.996: 3 of the 4 planned steps, so 2 of 3 assistants
    partly = decide_links(3, 0.92, 0.85, 0.02)
    assert partly.kept == 2 and "assistants 1..2 are trained" in partly.why
    assert decide_links(2, 0.85, 0.86, 0.01).kept == 0  # the student alone beats the teacher: nothing to bridge


# -------------------------------------------------------------------------------------------------------- graphs
def config(name: str, *overrides: str):
    return load_config(ROOT / "conf" / name, list(overrides))


def test_a_measured_chain_plan_waits_for_the_teacher_and_the_student_alone():
    cfg = config("takd.yaml", "chain.max_gap=3.0", "chain.min_link_gain=0.01", "distill.baseline=true")
    stages = {s.name: s for s in PIPELINES.get("takd")(cfg)}
    plan = stages["chain_plan"]
    assert plan.deps == ["teacher_cnn", "student_alone"] and plan.params.measured
    assert plan.params.settings()["min_link_gain"] == 0.01 and plan.params.student == "student_alone"
    assert all("chain_plan" in stages[f"assistant_{i}"].deps for i in (1, 2, 3))
    assert "chain_plan" not in stages["distill"].deps
    unmeasured = {s.name: s for s in PIPELINES.get("takd")(config("takd.yaml", "chain.max_gap=3.0"))}
    assert unmeasured["chain_plan"].deps == [] and set(unmeasured["chain_plan"].params.settings()) == {"plan"}
    with pytest.raises(ConfigError, match=r"chain\.min_link_gain: .* distill\.baseline is false"):
        PIPELINES.get("takd")(config("takd.yaml", "chain.min_link_gain=0.01"))  # takd.yaml: no student alone


def test_takd_graph_chains_each_assistant_to_the_one_before():
    cfg = config("takd.yaml", "chain.epsilon=0.0", "chain.max_gap=3.0")
    stages = {s.name: s for s in PIPELINES.get("takd")(cfg)}
    plan = stages["chain_plan"].params.plan
    links = [f"assistant_{i}" for i in range(1, plan["steps"])]
    assert plan["steps"] == 4 and list(stages) == ["teacher_cnn", "chain_plan", *links, "distill"]
    assert stages["assistant_1"].deps == ["teacher_cnn"]
    for before, link in zip(links, links[1:] + ["distill"]):
        assert stages[link].deps == [before] and stages[link].params.teachers == (before,)
    for i, link in enumerate(links, start=1):
        assert stages[link].kind == "chain_link" and stages[link].params.index == i
        assert stages[link].params.student.options == plan["models"][i]["options"]
        assert (stages[link].params.epsilon is not None) == (i >= 3)  # the rule never tests link 1
    assert stages["distill"].kind == "distill"


def test_takd_without_assistants_distils_exactly_like_kd():
    cfg = config("takd.yaml", "chain.assistants=[]")
    takd = PIPELINES.get("takd")(cfg)
    kd = PIPELINES.get("kd")(replace(cfg, pipeline="kd"))
    assert [s.name for s in takd] == ["teacher_cnn", "chain_plan", "distill"]
    assert takd[-1].params.settings() == kd[-1].params.settings()
    assert takd[-1].deps == kd[-1].deps


def test_smskd_graph_and_recipes():
    cfg = config("smskd.yaml", "smskd.stages=[{methods: {at: {weight: 1000}}, ce_weight: 1.0}, "
                 "{methods: {dkd: {weight: 1.0}}}, {methods: {kd: {weight: 0.9}}, train: {epochs: 2}}]",
                 "smskd.reference.mode=tcp")
    stages = {s.name: s for s in PIPELINES.get("smskd")(cfg)}
    assert list(stages) == ["teacher_cnn", "smskd_1", "smskd_2", "smskd_3"]
    first = stages["smskd_1"].params
    assert stages["smskd_1"].deps == ["teacher_cnn"] and first.init_from is None and first.reference is None
    for k in (2, 3):
        stage = stages[f"smskd_{k}"]
        assert stage.deps == ["teacher_cnn", f"smskd_{k - 1}"]
        assert stage.params.init_from == stage.params.reference == f"smskd_{k - 1}"
    settings = [stages[f"smskd_{k}"].params.settings() for k in (1, 2, 3)]
    assert [sorted(s["distill"]["methods"]) for s in settings] == [["at"], ["dkd", "reference"], ["kd", "reference"]]
    assert settings[1]["distill"]["methods"]["reference"] == {"weight": 1.0, "mode": "tcp", "tau_ref": 4.0,
                                                              "normalize": False}
    assert settings[0]["distill"]["ce_weight"] == 1.0 and settings[1]["distill"]["ce_weight"] == 0.5  # from distill
    assert [s["train"]["epochs"] for s in settings] == [5, 5, 2]


def test_smskd_first_stage_is_the_same_stage_as_kd_with_that_method():
    """So a method-alone baseline and SMSKD's first stage share one content key (and one training)."""
    cfg = config("smskd.yaml")
    kd_cfg = config("smskd.yaml", "pipeline=kd", "distill.methods={fitnet: {weight: 10}}", "distill.ce_weight=1.0")
    first: StageParams = PIPELINES.get("smskd")(cfg)[1].params
    assert first.settings() == PIPELINES.get("kd")(kd_cfg)[-1].params.settings()


def test_smskd_ablations_drop_the_init_or_the_reference():
    stages = PIPELINES.get("smskd")(config("smskd.yaml", "smskd.init=scratch", "smskd.reference.weight=0"))
    assert stages[-1].params.init_from is None and stages[-1].params.reference is None
    assert stages[-1].deps == ["teacher_cnn", "smskd_1"]


@pytest.mark.parametrize("name,overrides,match", [
    ("takd.yaml", ["chain.max_gap=1.0"], r"chain\.max_gap: must be > 1"),
    ("takd.yaml", ["chain.scale=height"], r"chain\.scale: 'height' is not allowed"),
    ("takd.yaml", ["chain.assistants=[{model: cnn_tinny}]"], r"chain\.assistants\.0\.model: unknown model 'cnn_tinny'"),
    ("takd.yaml", ["chain.plan_from=mlp"], r"chain\.plan_from: no teacher named 'mlp'"),
    ("takd.yaml", ["distill.methods={reference: {weight: 1}}"], r"distill\.methods\.reference: .*smskd\.reference"),
    ("smskd.yaml", ["smskd.stages=[{ce_weight: 1.0}]"], r"smskd\.stages\.0\.methods: every SMSKD stage names"),
    ("smskd.yaml", ["smskd.stages=[{methods: {kd: {weight: 1}}, teacher_outputs: cache}]"],
     r"smskd\.stages\.0\.teacher_outputs: not a per-stage key"),
    ("smskd.yaml", ["smskd.stages=[{methods: {kd: {weight: 1}}}, {methods: {reference: {weight: 1}}}]"],
     r"smskd\.stages\.1\.methods\.reference: SMSKD adds"),
    ("smskd.yaml", ["smskd.stages=[{methods: {fitnet: {weight: 1, layer: 2}}}]"],
     r"smskd\.stages\.0\.methods\.fitnet\.layer: unknown option"),
    ("smskd.yaml", ["smskd.reference.mode=1-tcp"], r"smskd\.reference\.mode: unknown reference weighting '1-tcp'"),
    ("smskd.yaml", ["smskd.reference.tau_ref=0"], r"smskd\.reference\.tau_ref: must be > 0"),
    ("smskd.yaml", ["smskd.init=warm"], r"smskd\.init: 'warm' is not allowed"),
])
def test_bad_chain_and_smskd_config_is_refused_at_load(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(name, *overrides)


@pytest.mark.parametrize("name,overrides,match", [
    ("smskd.yaml", ["smskd.stages=[]"], r"smskd\.stages: the smskd pipeline needs its stages"),
    ("takd.yaml", ["chain.max_steps=2"], r"chain\.max_steps: no chain of at most 2 steps"),
    ("takd.yaml", ["student.model=resnet18"], r"student\.model: the chain planner"),
])
def test_bad_pipeline_config_is_refused_when_the_graph_is_built(name, overrides, match):
    cfg = config(name, *overrides)
    with pytest.raises(ConfigError, match=match):
        PIPELINES.get(cfg.pipeline)(cfg)
