"""Evaluation as HumP-KD reports it: macro and binary F1, the test split under Gaussian noise and motion blur, size
and CPU throughput, and N trials compared with Welch's t-test and the Wilcoxon signed-rank test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from hpmkd.data.base import Split
from hpmkd.efficiency import cpu_fps, size_mb
from hpmkd import evaluation
from hpmkd.evaluation import SHIFTS, EvaluationConfig, Predictions
from hpmkd.trials import compare_trials
from hpmkd.uncertainty_metrics import blur_length


def predictions(predicted: list[int], labels: list[int], classes: int) -> Predictions:
    return Predictions(F.one_hot(torch.tensor(predicted), classes).float().add(1e-3).log(), torch.tensor(labels))


def test_macro_f1_by_hand_and_binary_f1_for_two_classes():
    # class 0: tp 2, fp 1, fn 0 -> F1 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: never predicted nor present -> 0
    out = evaluation.test_metrics(predictions([0, 0, 1, 0], [0, 0, 1, 1], 3))
    assert out["test_macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert "test_f1" not in out and "test_cpu_fps" not in out  # binary F1 needs two classes; speed is opt-in
    binary = evaluation.test_metrics(predictions([0, 0, 1, 0], [0, 0, 1, 1], 2))
    assert binary["test_f1"] == pytest.approx(2 / 3) and binary["test_macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_motion_blur_is_a_horizontal_box_average_with_replicated_edges():
    assert [blur_length(28, f) for f in (0.08, 0.16, 0.24)] == [3, 5, 7]
    assert [blur_length(224, f) for f in (0.08, 0.16, 0.24)] == [17, 35, 53]
    x = torch.tensor([[[[0.0, 3.0, 6.0, 9.0]]]])
    blurred = SHIFTS.build("motion_blur", {"fraction": 0.08}, "shift")(x, torch.arange(1))  # width 4 -> length 3
    assert torch.allclose(blurred, torch.tensor([[[[1.0, 3.0, 6.0, 8.0]]]]))  # (0+0+3)/3, (0+3+6)/3, ... (6+9+9)/3
    assert SHIFTS.build("motion_blur", {}, "shift")(torch.zeros(2, 3), torch.arange(2)) is None  # images only


def test_shifted_f1_and_opt_in_efficiency_run_the_predictor():
    torch.manual_seed(0)
    x = torch.randn(12, 1, 8, 8)
    y = (x[:, 0, :, :4].mean((1, 2)) > x[:, 0, :, 4:].mean((1, 2))).long()  # left half brighter than the right
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1].view(8, 8)[:, :4] = 1.0
        model[1].weight[1].view(8, 8)[:, 4:] = -1.0

    class Splits:
        val = test = Split(x, y)

    options = EvaluationConfig(shifts={"noise": {"sigma": 1.0}, "motion_blur": {"fraction": 0.08}}, efficiency=True)
    out = evaluation.final_test_metrics(model, Splits, 5, torch.device("cpu"), options)
    assert out["test_macro_f1"] == 1.0
    noisy = SHIFTS.build("noise", {"sigma": 1.0}, "shift")(x, torch.arange(12))
    predicted = model(noisy).argmax(1)
    assert out["test_noise_acc"] == pytest.approx(float((predicted == y).float().mean()))
    assert out["test_noise_macro_f1"] == pytest.approx(macro_f1_by_hand(predicted, y, 2))
    blurred = SHIFTS.build("motion_blur", {"fraction": 0.08}, "shift")(x, torch.arange(12))
    assert out["test_motion_blur_acc"] == pytest.approx(float((model(blurred).argmax(1) == y).float().mean()))
    assert out["test_size_mb"] == pytest.approx((64 * 2 + 2) * 4 / 2**20)
    assert out["test_cpu_fps"] > 0
    plain = evaluation.final_test_metrics(model, Splits, 5, torch.device("cpu"), EvaluationConfig(shifts={}))
    assert "test_cpu_fps" not in plain and not any(k.startswith("test_noise") for k in plain)  # opt-in only


def macro_f1_by_hand(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp, fn = int(((predicted == c) & (labels != c)).sum()), int(((predicted != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / classes


def test_size_and_throughput_at_batch_one():
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    assert size_mb(model) == pytest.approx((110 + 10 + 10 + 10 + 10 + 1) * 4 / 2**20, rel=0.02)  # int64 counter: 8 B
    threads = torch.get_num_threads()
    assert cpu_fps(model.eval(), torch.randn(1, 10), threads=1, budget_s=0.05) > 0
    assert torch.get_num_threads() == threads  # restored


def test_trials_are_compared_with_welch_and_wilcoxon():
    method = [0.90, 0.92, 0.91, 0.95, 0.93]
    baseline = [0.85, 0.88, 0.90, 0.86, 0.80]
    out = compare_trials(method, baseline)
    assert out.method_mean == pytest.approx(np.mean(method)) and out.method_std == pytest.approx(np.std(method, ddof=1))
    welch = stats.ttest_ind(method, baseline, equal_var=False)
    assert (out.welch_t, out.welch_p) == pytest.approx((welch.statistic, welch.pvalue))
    # every paired difference positive: W = 0 (the smaller rank sum), exact two-sided p = 2 / 2^5
    assert out.wilcoxon_w == 0 and out.wilcoxon_p == pytest.approx(2 / 32)
    assert out.wins == 5 and out.trials == 5
    tied = compare_trials([0.5, 0.5], [0.5, 0.5])
    assert math.isnan(tied.welch_p) and math.isnan(tied.wilcoxon_p)
    with pytest.raises(ValueError, match="same number of trials"):
        compare_trials([0.5], [0.5, 0.6])
