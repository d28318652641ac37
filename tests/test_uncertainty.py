"""The calibration and uncertainty metrics every final stage records, against values computed by hand on fixed
predictions; the per-input quantities, credible intervals and prediction sets; the shifted test sets; and the
synthetic Gaussian-mixture task whose class probabilities are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpmkd.data import load_dataset
from hpmkd.evaluation import SHIFTS, EvaluationConfig, Predictions, evaluate, final_test_metrics, predict_final
from hpmkd.evaluation import test_metrics as metrics_of
from hpmkd.predictors import Ensemble, SingleModel, WeightSamples
from hpmkd.uncertainty import conformal_threshold, credible_intervals, prediction_sets, uncertainty

#: six predictions over three classes, labels, and what each metric is by hand
PROBS = torch.tensor([[0.90, 0.05, 0.05], [0.62, 0.28, 0.10], [0.20, 0.70, 0.10],
                      [0.42, 0.33, 0.25], [0.10, 0.12, 0.78], [0.50, 0.45, 0.05]], dtype=torch.float64)
Y = torch.tensor([0, 1, 1, 2, 2, 0])


def predictions(probs=PROBS, y=Y, **extra) -> Predictions:
    return Predictions(probs.log(), y, **extra)


def test_nll_brier_and_accuracy_by_hand():
    out = metrics_of(predictions(), EvaluationConfig(shifts={}))
    picked = [0.90, 0.28, 0.70, 0.25, 0.78, 0.50]
    assert out["test_nll"] == pytest.approx(-sum(math.log(p) for p in picked) / 6)
    brier = [(0.1**2 + 0.05**2 + 0.05**2), (0.62**2 + 0.72**2 + 0.1**2), (0.2**2 + 0.3**2 + 0.1**2),
             (0.42**2 + 0.33**2 + 0.75**2), (0.1**2 + 0.12**2 + 0.22**2), (0.5**2 + 0.45**2 + 0.05**2)]
    assert out["test_brier"] == pytest.approx(sum(brier) / 6)
    assert out["test_acc"] == pytest.approx(4 / 6)  # rows 1 and 3 are wrong


def test_ece_and_the_reliability_bins_by_hand():
    """Five bins [b/5, (b+1)/5): confidences 0.9, 0.62, 0.7, 0.42, 0.78, 0.5 fall in bins 4, 3, 3, 2, 3, 2."""
    out = metrics_of(predictions(), EvaluationConfig(ece_bins=5, shifts={}))
    correct = {0.9: 1, 0.62: 0, 0.7: 1, 0.42: 0, 0.78: 1, 0.5: 1}
    bins = {4: [0.9], 3: [0.62, 0.7, 0.78], 2: [0.42, 0.5]}
    ece = sum(len(c) / 6 * abs(np.mean([correct[v] for v in c]) - np.mean(c)) for c in bins.values())
    assert out["test_ece"] == pytest.approx(ece, abs=1e-6)
    for b, members in bins.items():
        assert out[f"test_reliability.{b}.conf"] == pytest.approx(np.mean(members))
        assert out[f"test_reliability.{b}.acc"] == pytest.approx(np.mean([correct[v] for v in members]))
        assert out[f"test_reliability.{b}.frac"] == pytest.approx(len(members) / 6)
    assert "test_reliability.0.conf" not in out and "test_reliability.5.conf" not in out  # empty bins: not recorded
    certain = metrics_of(predictions(probs=torch.eye(3, dtype=torch.float64), y=torch.arange(3)),
                         EvaluationConfig(ece_bins=5, shifts={}))
    assert certain["test_reliability.5.frac"] == 1.0 and certain["test_ece"] == 0.0  # confidence 1: its own bin


def test_error_auroc_and_selective_accuracy_by_hand():
    out = metrics_of(predictions(), EvaluationConfig(selective_coverage=0.5, shifts={}))
    entropy = -(PROBS * PROBS.log()).sum(1)
    errors = [1, 3]
    right = [0, 2, 4, 5]
    pairs = [(entropy[e] > entropy[r]) + 0.5 * (entropy[e] == entropy[r]) for e in errors for r in right]
    assert out["test_error_auroc"] == pytest.approx(float(sum(pairs)) / len(pairs))
    keep = entropy.argsort()[:3]  # the 3 (= ⌈0.5 · 6⌉) least uncertain
    assert out["test_selective_acc"] == pytest.approx(float((PROBS[keep].argmax(1) == Y[keep]).double().mean()))
    perfect = metrics_of(predictions(y=PROBS.argmax(1)), EvaluationConfig(shifts={}))
    assert "test_error_auroc" not in perfect and perfect["test_selective_acc"] == 1.0


def test_prediction_sets_are_calibrated_on_validation():
    """Calibration scores 1 − p_y; with n = 6 and coverage 0.5 the threshold is the ⌈7 · 0.5⌉ = 4th smallest."""
    scores = sorted(1 - PROBS[torch.arange(6), Y])
    q = conformal_threshold(PROBS.log(), Y, 0.5)
    assert q == pytest.approx(float(scores[3]))
    sets = prediction_sets(PROBS.log(), q)
    torch.testing.assert_close(sets, PROBS >= 1 - q)
    out = metrics_of(predictions(calibration=predictions()), EvaluationConfig(set_coverage=0.5, shifts={}))
    assert out["test_set_coverage"] == pytest.approx(float(sets[torch.arange(6), Y].double().mean()))
    assert out["test_set_size"] == pytest.approx(float(sets.sum(1).double().mean()))
    assert conformal_threshold(PROBS.log(), Y, 0.95) == 1.0  # 6 calibration rows cannot certify 95 %: every class
    assert "test_set_coverage" not in metrics_of(predictions(), EvaluationConfig(shifts={}))  # no calibration


def test_split_conformal_sets_reach_their_coverage_on_exchangeable_data():
    torch.manual_seed(0)
    logits = torch.randn(4000, 5) * 2
    y = torch.distributions.Categorical(logits=logits).sample()
    cal, test = slice(0, 2000), slice(2000, 4000)
    q = conformal_threshold(F.log_softmax(logits[cal], 1), y[cal], 0.9)
    covered = prediction_sets(F.log_softmax(logits[test], 1), q)[torch.arange(2000), y[test]].double().mean()
    assert 0.88 <= covered <= 0.93


def test_epistemic_quantities_of_several_members():
    members = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]]], dtype=torch.float64).log()
    mean = torch.logsumexp(members, 0) - math.log(2)
    found = uncertainty(mean, members)
    h = lambda p: -sum(v * math.log(v) for v in p)  # noqa: E731
    assert found.predictive_entropy.tolist() == pytest.approx([math.log(2), math.log(2)])
    assert found.expected_entropy.tolist() == pytest.approx([h([0.9, 0.1]), math.log(2)])
    assert found.mutual_information.tolist() == pytest.approx([math.log(2) - h([0.9, 0.1]), 0.0], abs=1e-12)
    assert found.deviance.tolist() == pytest.approx([2 * h([0.9, 0.1]), 2 * math.log(2)])
    out = metrics_of(Predictions(mean, torch.tensor([0, 1]), members), EvaluationConfig(shifts={}))
    assert out["test_mutual_information"] == pytest.approx((math.log(2) - h([0.9, 0.1])) / 2)
    single = metrics_of(Predictions(mean, torch.tensor([0, 1])), EvaluationConfig(shifts={}))
    assert "test_mutual_information" not in single and "test_predictive_entropy" in single


def test_credible_intervals_and_their_coverage_of_known_probabilities():
    draws = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)  # the members' probability of class 0
    members = torch.stack([draws, 1 - draws], -1)[:, None, :].log()  # [S = 99, N = 1, C = 2]
    lower, upper = credible_intervals(members, level=0.9)
    assert lower[0, 0].item() == pytest.approx(float(np.quantile(draws.numpy(), 0.05)))
    assert upper[0, 0].item() == pytest.approx(float(np.quantile(draws.numpy(), 0.95)))
    mean = torch.logsumexp(members, 0) - math.log(99)
    inside = Predictions(mean, torch.tensor([0]), members, true_probs=torch.tensor([[0.5, 0.5]]))
    outside = Predictions(mean, torch.tensor([0]), members, true_probs=torch.tensor([[0.999, 0.001]]))
    options = EvaluationConfig(credible_level=0.9, shifts={})
    assert metrics_of(inside, options)["test_ci_coverage"] == 1.0
    assert metrics_of(outside, options)["test_ci_coverage"] == 0.0
    assert metrics_of(inside, options)["test_ci_width"] == pytest.approx(float(upper[0, 0] - lower[0, 0]))


def test_shifts_are_fixed_and_blur_declines_tabular_rows():
    x = torch.randn(6, 1, 8, 8)
    noise = SHIFTS.build("noise", {"sigma": 0.5})
    once, again = noise(x, torch.arange(6)), noise(x[3:], torch.arange(3, 6))
    torch.testing.assert_close(once[3:], again)  # a row's draw depends on its index only, not on its batch
    assert (once - x).std().item() == pytest.approx(0.5, rel=0.2)
    blurred = SHIFTS.build("blur", {"sigma": 1.0})(x, torch.arange(6))
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert SHIFTS.build("blur", {})(torch.randn(4, 7), torch.arange(4)) is None


def test_every_final_stage_records_the_metrics_clean_and_shifted():
    splits = load_dataset("digits")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    out = final_test_metrics(SingleModel(net), splits, 256, torch.device("cpu"))
    for prefix in ("test_", "test_noise_", "test_blur_"):
        assert {f"{prefix}{k}" for k in ("acc", "nll", "ece", "brier", "error_auroc", "selective_acc",
                                         "set_coverage", "set_size")} <= out.keys()
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(3)]
    ensemble = final_test_metrics(Ensemble(members), splits, 256, torch.device("cpu"))
    samples = final_test_metrics(WeightSamples(members[0], [m.state_dict() for m in members]), splits, 256,
                                 torch.device("cpu"))
    assert ensemble["test_mutual_information"] == pytest.approx(samples["test_mutual_information"], rel=1e-5)
    tabular = final_test_metrics(SingleModel(nn.Linear(4, 3)), load_dataset("iris"), 64, torch.device("cpu"))
    assert "test_noise_nll" in tabular and not any(k.startswith("test_blur_") for k in tabular)


def test_the_gaussian_mixture_knows_its_class_probabilities():
    from scipy.stats import multivariate_normal

    from hpmkd.data.gaussian_mixture import gaussian_mixture, mixture_means

    options = {"classes": 3, "components": 2, "dim": 2, "separation": 2.0, "scale": 1.0, "seed": 0}
    splits = load_dataset("gaussian_mixture", options=options)
    assert splits.num_classes == 3 and splits.input_shape == (2,) and splits.test.true_probs.shape == (2000, 3)
    means = mixture_means(3, 2, 2, 2.0, 0)
    raw = gaussian_mixture(**options).test_x[:5]  # Bayes' rule on the raw test inputs with scipy's densities
    dens = np.array([[sum(multivariate_normal(means[c, k], np.eye(2)).pdf(x) for k in range(2)) for c in range(3)]
                     for x in raw])
    np.testing.assert_allclose(splits.test.true_probs[:5].numpy(), dens / dens.sum(1, keepdims=True), rtol=1e-5)
    # labels are drawn from those probabilities: frequencies match them where the truth is confident
    probs, y = splits.test.true_probs, splits.test.y
    confident = probs.max(1).values > 0.9
    assert (probs[confident].argmax(1) == y[confident]).double().mean() > 0.9
    assert probs.max(1).values.mean() == pytest.approx(float((probs.argmax(1) == y).double().mean()), abs=0.03)


def test_temperature_scaling_recovers_the_temperature_of_overconfident_scores():
    from hpmkd.calibration import TemperatureScaled, fit_temperature

    torch.manual_seed(0)
    logits = torch.randn(5000, 4) * 2
    y = torch.distributions.Categorical(logits=logits).sample()
    sharpened = torch.log_softmax(logits * 3, -1)  # calibrated at T = 3
    assert fit_temperature(sharpened, y) == pytest.approx(3.0, rel=0.05)
    net = nn.Linear(4, 4)
    scaled = TemperatureScaled(SingleModel(net), 2.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(F.softmax(scaled(x), -1), F.softmax(net(x) / 2.0, -1))


def test_predictions_carry_the_accuracy_and_loss_that_evaluate_gives():
    """A final stage reads each split once: the predictions' accuracy and loss are evaluate's, to the bit, for one
    network and for predictors of several members."""
    splits = load_dataset("digits")
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(3)]
    for predictor in (SingleModel(members[0]), Ensemble(members),
                      WeightSamples(members[0], [m.state_dict() for m in members])):
        predicted = predict_final(predictor, splits, 100, torch.device("cpu"), EvaluationConfig(shifts={}))
        assert (predicted.test.accuracy, predicted.test.loss) == evaluate(predictor, splits.test, 100,
                                                                          torch.device("cpu"))
        assert predicted.split_scores()["val_loss"] == evaluate(predictor, splits.val, 100, torch.device("cpu"))[1]


def test_posterior_outputs_of_a_weight_sample_predictor():
    from hpmkd.uncertainty import posterior_outputs

    torch.manual_seed(1)
    members = [nn.Linear(4, 3) for _ in range(5)]
    predictor = WeightSamples(members[0], [m.state_dict() for m in members])
    x = torch.randn(6, 4)
    out = posterior_outputs(predictor, x, set_threshold=0.5, level=0.8)
    member_probs = torch.stack([F.softmax(m(x), -1) for m in members]).detach()
    torch.testing.assert_close(out.probs, member_probs.mean(0))
    torch.testing.assert_close(out.lower, torch.quantile(member_probs, 0.1, dim=0))
    torch.testing.assert_close(out.upper, torch.quantile(member_probs, 0.9, dim=0))
    torch.testing.assert_close(out.sets, member_probs.mean(0) >= 0.5)
    assert (out.uncertainty.mutual_information > 0).all()
    single = posterior_outputs(SingleModel(members[0]), x)
    assert single.lower is None and single.sets is None
    torch.testing.assert_close(single.uncertainty.mutual_information, torch.zeros(6))


def test_a_weight_sample_predictor_moves_and_casts_its_samples_with_it():
    torch.manual_seed(2)
    members = [nn.Linear(4, 3) for _ in range(2)]
    predictor = WeightSamples(members[0], [m.state_dict() for m in members]).double()
    assert all(v.dtype == torch.float64 for s in predictor.samples for v in s.values())
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.stack([F.softmax(m.double()(x), -1) for m in members]).mean(0)
    torch.testing.assert_close(predictor(x).exp(), expected)
