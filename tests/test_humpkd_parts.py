"""HumP-KD's three parts as registered pieces: uncertainty-aware KD (variance weights and the confidence that scales
the KD term), the hierarchical feature builder's fused mask (and teachers without spatial features), and the
three-stage schedule (the loop callback, on a real in-process distillation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpmkd.callbacks import CALLBACKS, Callback
from hpmkd.config import DataConfig, DistillConfig, TrainConfig, config_from_data
from hpmkd.config_schema import from_dict
from hpmkd.distill_batch import DistillBatch, ModelTaps, TeacherOutputs
from hpmkd.distiller import Distiller
from hpmkd.ensemble import AGGREGATORS
from hpmkd.losses import LOSSES
from hpmkd.losses.hierarchical import fused_mask
from hpmkd.loss_schedule import LossSchedule
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.teachers import LocalTeachers, load_teacher, TeacherSpec
from hpmkd.training import StageEnv, StageSpec, train_stage
from tests.conftest import train_digits_teacher


def variance(**options):
    return AGGREGATORS.build("variance", options, num_teachers=3, num_classes=3, input_shape=(2,))


# --- uncertainty-aware KD ----------------------------------------------------------------------------------------

def test_variance_weights_favour_agreeing_teachers_and_confidence_falls_as_they_disagree():
    # per sample (column), teachers 0 and 1 agree and teacher 2 moves further away, sample after sample
    z = torch.tensor([[[4.0, 0, 0]] * 4, [[4.0, 0.2, 0]] * 4,
                      [[4.0, 0, 0], [2.0, 2.0, 0], [0.0, 4.0, 0], [0.0, 0, 8.0]]])  # [M=3, B=4, C=3]
    out = variance(tau=1.0, nu=0.1)(z, torch.zeros(4, dtype=torch.long), torch.zeros(4, 2), torch.zeros(4, 3),
                                    torch.tensor(1.0))
    assert torch.allclose(out.weights.sum(1), torch.ones(4))
    assert (out.weights[1:, 2] < out.weights[1:, 0]).all() and (out.weights[1:, 2] < out.weights[1:, 1]).all()
    c = out.confidence
    assert c[0] == pytest.approx(math.exp(-((F.softmax(z[:, 0], -1) - F.softmax(z[:, 0], -1).mean(0)) ** 2)
                                           .sum(-1).mean().item() / 0.1), rel=1e-5)
    assert (c[1:] < c[:-1]).all() and 0 < float(c.min()) and float(c.max()) <= 1


def kd(num_teachers: int):
    taps = ModelTaps((), "e", "c")
    return LOSSES.build("kd", {}, num_classes=3, num_teachers=num_teachers, num_train=4, student_taps=taps,
                        teacher_taps=[taps] * num_teachers)


def batch(z_s, z_t, weights, mix, confidence=None):
    b = z_s.shape[0]
    return DistillBatch(torch.zeros(b, 2), torch.zeros(b, dtype=torch.long), torch.arange(b), z_s, {},
                        TeacherOutputs(z_t), weights, mix, torch.tensor(2.0), confidence=confidence)


def test_the_confidence_scales_the_kd_term_per_sample():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 3), torch.randn(2, 4, 3)
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9], [0.4, 0.6]])
    c = torch.tensor([1.0, 0.5, 0.25, 0.0])
    target = (w.t()[:, :, None] * F.softmax(z_t / 2, -1)).sum(0)
    kl = (target * (target.log() - F.log_softmax(z_s / 2, -1))).sum(1)
    value = kd(2)(batch(z_s, z_t, w, "probs", c))["kd"]
    assert value.item() == pytest.approx(float((4 * c * kl).mean()), rel=1e-5)
    assert kd(2)(batch(z_s, z_t, w, "probs"))["kd"].item() == pytest.approx(float((4 * kl).mean()), rel=1e-5)


def test_the_distiller_hands_the_variance_confidence_to_kd_and_other_aggregators_none():
    torch.manual_seed(1)
    student = torch.nn.Linear(2, 3)
    taps = ModelTaps((), "", "")
    x, y, z_t = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 5, 3)
    values = {}
    for name in ("variance", "mean_probs"):
        recipe = DistillConfig(ce_weight=0.0, methods={"kd": {"weight": 1.0}}, aggregator={"name": name})
        distiller = Distiller(student, recipe, num_classes=3, num_train=5, input_shape=(2,), student_taps=taps,
                              teacher_taps=[taps] * 3)
        distiller.setup(x, y, torch.arange(5), TeacherOutputs(z_t))
        values[name] = distiller(x, y, torch.arange(5), TeacherOutputs(z_t))
    out = values["variance"]
    q = F.softmax(z_t / 4, -1)
    u = ((q - q.mean(0)) ** 2).sum(-1)
    assert torch.allclose(out.confidence, torch.exp(-u.mean(0) / 0.1), rtol=1e-5)
    target = (F.softmax(-u / 0.1, 0)[:, :, None] * q).sum(0)
    kl = (target * (target.log() - F.log_softmax(student(x) / 4, -1))).sum(1)
    assert out.terms["kd.kd"].item() == pytest.approx(float((16 * out.confidence * kl.detach()).mean()), rel=1e-4)
    assert values["mean_probs"].confidence is None


# --- the hierarchical feature builder ----------------------------------------------------------------------------

def peaked(points: list[tuple[int, int]], channels: int = 3, size: int = 4) -> torch.Tensor:
    """A [1, C, size, size] map whose energy sits at ``points``."""
    f = torch.full((1, channels, size, size), 0.05)
    for r, c in points:
        f[0, :, r, c] = 1.0
    return f


def test_the_fused_mask_concentrates_where_the_teachers_attention_agrees():
    # both teachers attend to (0, 0) at every level; each also attends to a place of its own
    a = [peaked([(0, 0), (3, 3)]), peaked([(0, 0), (6, 6)], size=8)]  # level 2 at twice the resolution
    b = [peaked([(0, 0), (0, 3)]), peaked([(0, 0), (0, 3)])]
    mask = fused_mask([a, b], torch.tensor([[0.5, 0.5]]), (4, 4), "nearest")
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert mask[0, 0, 0] == pytest.approx(1.0)
    assert mask[0, 3, 3] == pytest.approx(0.5 + 0.5 * 0.05 ** 2, rel=1e-4)  # one teacher of two
    assert mask[0, 1, 1] < 0.01  # neither
    assert int(mask.flatten().argmax()) == 0


def test_a_teacher_without_spatial_features_takes_no_part_in_the_feature_term():
    student_taps = ModelTaps(("s",), "e", "c")
    with_maps, without = ModelTaps(("t",), "e", "c"), ModelTaps((), "e", "c")
    torch.manual_seed(2)
    f_s, f_t = torch.randn(3, 2, 4, 4), torch.randn(3, 5, 2, 2)

    def build(taps):
        return LOSSES.build("hierarchical", {}, num_classes=3, num_teachers=len(taps), num_train=3,
                            student_taps=student_taps, teacher_taps=taps)

    def make(weights, n):
        return DistillBatch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.arange(3), torch.zeros(3, 3),
                            {"s": f_s}, TeacherOutputs(torch.zeros(n, 3, 3), [{"t": f_t}] + [{}] * (n - 1)),
                            weights, "probs", torch.tensor(1.0))

    both = build([with_maps, without])
    assert both.feature_teachers == [0] and both.teacher_tap_names() == [{"t"}, set()]
    alone = build([with_maps])
    mixed = make(torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), 2)
    both.setup(mixed)
    alone.setup(make(torch.ones(3, 1), 1))
    alone.load_state_dict(both.state_dict())
    # the feature teacher's weights are renormalised to 1: the same loss as with that teacher alone
    assert both(mixed)["hierarchical"].item() == pytest.approx(alone(make(torch.ones(3, 1), 1))["hierarchical"].item())
    with pytest.raises(ConfigError, match="no teacher of this stage declares feature taps"):
        build([without])


# --- the three-stage schedule ------------------------------------------------------------------------------------

SCHEDULE = {"phases": [{"start": 0.0, "active": ["kd"]}, {"start": 0.34, "active": {"kd": 1.0, "pkt": 0.5}},
                       {"start": 0.67, "active": ["kd", "pkt"]}]}


def test_phase_boundaries_and_the_ramp():
    schedule = from_dict(LossSchedule, SCHEDULE, "distill.schedule")
    assert schedule.boundaries(30) == [0, 11, 21]  # ceil(0.34 * 30), ceil(0.67 * 30)
    assert schedule.multipliers_at(10, 30, ["kd", "pkt"]) == {"kd": 1.0, "pkt": 0.0}
    assert schedule.multipliers_at(11, 30, ["kd", "pkt"]) == {"kd": 1.0, "pkt": 0.5}
    assert schedule.multipliers_at(21, 30, ["kd", "pkt"]) == {"kd": 1.0, "pkt": 1.0}
    ramped = from_dict(LossSchedule, {**SCHEDULE, "ramp": 0.1}, "distill.schedule")  # 3 steps of 30
    assert [ramped.multipliers_at(s, 30, ["pkt"])["pkt"] for s in (10, 11, 12, 13, 14)] == pytest.approx(
        [0.0, 0.5 / 3, 1.0 / 3, 0.5, 0.5])


@pytest.mark.parametrize("schedule, message", [
    ({"phases": [{"start": 0.0, "active": ["kdd"]}]}, r"'kdd' is not a method of distill\.methods\. Did you mean"),
    ({"phases": [{"start": 0.2, "active": ["kd"]}]}, r"phases\.0\.start: the first phase starts at 0"),
    ({"phases": [{"start": 0.0, "active": ["kd"]}, {"start": 0.0, "active": ["kd"]}]}, "increase strictly"),
    ({"phases": [{"start": 0.0, "active": ["kd"]}]}, r"method 'pkt' is active in no phase"),
])
def test_schedule_errors_name_the_key(schedule, message):
    data = {"experiment": "x", "pipeline": "kd", "teachers": [{"name": "t", "model": "mlp"}],
            "student": {"model": "mlp"},
            "distill": {"methods": {"kd": {"weight": 1.0}, "pkt": {"weight": 1.0}}, "schedule": schedule}}
    with pytest.raises(ConfigError, match=message):
        config_from_data(data)


class WeightLog(Callback):
    """The method weights each step ran with, and whether each term was computed."""

    steps: list[tuple[int, dict[str, float], set[str]]] = []

    @classmethod
    def applies(cls, state):
        return state.spec.name == "scheduled"

    def after_backward(self, state):
        self.steps.append((state.step, dict(state.objective.method_weights), set(state.out.terms)))


def test_the_schedule_switches_terms_at_the_right_steps_in_a_real_distillation(monkeypatch, tmp_path):
    monkeypatch.setitem(CALLBACKS._entries, "zz_weight_log", WeightLog)
    WeightLog.steps = []
    data = DataConfig(name="digits", max_train=320)
    teacher_path = train_digits_teacher(tmp_path, hidden=32, depth=1, epochs=1)
    teacher_ref = ModelRef("mlp", {"hidden": 32, "depth": 1})
    recipe = from_dict(DistillConfig, {"ce_weight": 1.0, "methods": {"kd": {"weight": 0.9}, "pkt": {"weight": 2.0}},
                                       "schedule": SCHEDULE}, "distill")
    spec = StageSpec("scheduled", 0, data, ModelRef("mlp", {"hidden": 16, "depth": 1}),
                     TrainConfig(epochs=3, batch_size=32), distill=recipe, teacher_names=["t"],
                     teacher_models=[teacher_ref])
    from hpmkd.data import load_dataset

    splits = load_dataset("digits", **data.loader_kwargs(0))
    teacher = load_teacher(TeacherSpec("t", teacher_ref, splits.shape), teacher_path)
    result = train_stage(spec, StageEnv(teachers=LocalTeachers(["t"], [teacher])))
    total = 3 * math.ceil(len(splits.train) / 32)
    assert [s for s, _, _ in WeightLog.steps] == list(range(total))
    first_pkt = math.ceil(0.34 * total)
    full_pkt = math.ceil(0.67 * total)
    for step, weights, terms in WeightLog.steps:
        expected = 0.0 if step < first_pkt else (1.0 if step < full_pkt else 2.0)
        assert weights == {"kd": 0.9, "pkt": expected}, step
        assert ("pkt.pkt" in terms) == (expected > 0), step  # a term with weight 0 is not computed
    assert [h["weight.pkt"] for h in result["history"]] == [0.0, 1.0, 2.0]
    assert np.isfinite(result["test_acc"])
