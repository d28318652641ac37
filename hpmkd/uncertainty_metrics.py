"""The calibration and uncertainty metrics every final stage records (entries of :data:`hpmkd.evaluation.METRICS`),
and the shifted test sets they are recorded on too (entries of :data:`hpmkd.evaluation.SHIFTS`).

Metrics (``test_<name>``; each also as ``test_<shift>_<name>`` on every shifted test split):

* ``acc``, ``nll``: accuracy and mean negative log-likelihood of the predictive distribution;
* ``ece``: expected calibration error of the top-label confidence, ``evaluation.ece_bins`` (15) equal-width bins
  ``[b/B, (b+1)/B)``, L1 (Guo et al. 2017, "On Calibration of Modern Neural Networks"; torchmetrics
  ``multiclass_calibration_error``), and the reliability diagram's bins, the same ones: ``reliability.<bin>.conf`` /
  ``.acc`` / ``.frac`` (mean confidence, accuracy and share of the inputs of each bin; empty bins are not recorded);
* ``error_auroc``: AUROC of the predictive entropy as a detector of the predictor's own errors (scikit-learn
  ``roc_auc_score``; not recorded when every prediction is right, or every one wrong);
* ``selective_acc``: accuracy on the ``evaluation.selective_coverage`` (90 %) least uncertain inputs (lowest
  predictive entropy);
* ``set_coverage``, ``set_size``: coverage and mean size of the prediction sets calibrated on the validation split
  to ``evaluation.set_coverage`` (95 %) (:func:`hpmkd.uncertainty.conformal_threshold`);
* ``predictive_entropy`` (every predictor), ``expected_entropy``, ``mutual_information``, ``deviance`` (predictors of
  several members: posterior samples, ensembles): means over the inputs (:mod:`hpmkd.uncertainty`);
* ``ci_coverage``, ``ci_width``: with known class probabilities (a synthetic data set) and several members, the
  share of (input, class) pairs whose true probability lies in the members' ``evaluation.credible_level`` (95 %)
  credible interval, and the intervals' mean width.

Shifts (fixed severities, ``evaluation.shifts``): ``noise`` adds Gaussian noise of standard deviation ``sigma`` to
the normalised inputs, the same draw for a row every time (seeded by its index); ``blur`` is a Gaussian blur of
standard deviation ``sigma`` pixels and ``motion_blur`` a horizontal box of a ``fraction`` of the image width
(images only). Corruptions after Hendrycks & Dietterich 2019 (ImageNet-C).

torchmetrics, scikit-learn's metrics and torchvision are imported when a metric is computed: importing them costs
seconds, and this module is loaded whenever a config is read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.evaluation import METRICS, SHIFTS, EvaluationConfig, Predictions
from hpmkd.uncertainty import conformal_threshold, credible_intervals, prediction_sets, uncertainty

#: seed of the noise shift's draws (row ``i`` uses ``NOISE_SEED + i``)
NOISE_SEED = 20_240_611


@METRICS.register("acc")
def accuracy(predictions: Predictions) -> dict[str, float]:
    """``(1/N) Σ_i 1[argmax_c p_ic = y_i]``."""
    return {"acc": float((predictions.log_probs.argmax(1) == predictions.y).double().mean())}


@METRICS.register("nll")
def nll(predictions: Predictions) -> dict[str, float]:
    """``−(1/N) Σ_i log p_i,y_i``."""
    return {"nll": float(-predictions.log_probs.gather(1, predictions.y[:, None]).double().mean())}


@METRICS.register("ece")
def ece(predictions: Predictions, evaluation: EvaluationConfig) -> dict[str, float]:
    """``ECE = Σ_b (n_b / N) |acc_b − conf_b|`` over equal-width bins of the top-label confidence, and the bins."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = predictions.probs.float()
    out = {"ece": float(multiclass_calibration_error(probs, predictions.y, predictions.num_classes,
                                                     n_bins=evaluation.ece_bins, norm="l1"))}
    confidence, predicted = probs.max(1)
    correct = (predicted == predictions.y).double()
    # torchmetrics' binning: bin b holds confidences in [b/B, (b+1)/B), and bin B those equal to 1
    edges = torch.linspace(0, 1, evaluation.ece_bins + 1, dtype=confidence.dtype)
    bins = torch.bucketize(confidence, edges, right=True) - 1
    width = len(str(evaluation.ece_bins))
    for b in bins.unique().tolist():
        member = bins == b
        key = f"reliability.{b:0{width}d}"
        out |= {f"{key}.conf": float(confidence[member].double().mean()), f"{key}.acc": float(correct[member].mean()),
                f"{key}.frac": float(member.double().mean())}
    return out


@METRICS.register("error_auroc")
def error_auroc(predictions: Predictions) -> dict[str, float]:
    """AUROC of the predictive entropy for telling the predictor's errors (positives) from its right answers."""
    from sklearn.metrics import roc_auc_score

    errors = (predictions.log_probs.argmax(1) != predictions.y).numpy()
    if errors.all() or not errors.any():
        return {}
    return {"error_auroc": float(roc_auc_score(errors, uncertainty(predictions.log_probs).predictive_entropy.numpy()))}


@METRICS.register("selective_acc")
def selective_accuracy(predictions: Predictions, evaluation: EvaluationConfig) -> dict[str, float]:
    """Accuracy on the ``⌈coverage · N⌉`` inputs of lowest predictive entropy (ties kept in input order)."""
    keep = max(1, math.ceil(evaluation.selective_coverage * len(predictions.y)))
    order = torch.sort(uncertainty(predictions.log_probs).predictive_entropy, stable=True).indices[:keep]
    correct = predictions.log_probs[order].argmax(1) == predictions.y[order]
    return {"selective_acc": float(correct.double().mean())}


@METRICS.register("prediction_sets")
def set_metrics(predictions: Predictions, evaluation: EvaluationConfig) -> dict[str, float]:
    """Coverage ``(1/N) Σ_i 1[y_i ∈ S_i]`` and mean size ``(1/N) Σ_i |S_i|`` of the sets calibrated on validation."""
    calibration = predictions.calibration
    if calibration is None or len(calibration.y) == 0:
        return {}
    sets = prediction_sets(predictions.log_probs,
                           conformal_threshold(calibration.log_probs, calibration.y, evaluation.set_coverage))
    covered = sets.gather(1, predictions.y[:, None])[:, 0]
    return {"set_coverage": float(covered.double().mean()), "set_size": float(sets.sum(1).double().mean())}


@METRICS.register("uncertainty")
def mean_uncertainty(predictions: Predictions) -> dict[str, float]:
    """Mean predictive entropy; with several members also the expected entropy, mutual information and deviance."""
    found = uncertainty(predictions.log_probs, predictions.members)
    out = {"predictive_entropy": float(found.predictive_entropy.double().mean())}
    if predictions.members is not None:
        out |= {"expected_entropy": float(found.expected_entropy.double().mean()),
                "mutual_information": float(found.mutual_information.double().mean()),
                "deviance": float(found.deviance.double().mean())}
    return out


@METRICS.register("credible_coverage")
def credible_coverage(predictions: Predictions, evaluation: EvaluationConfig) -> dict[str, float]:
    """Share of (input, class) pairs whose known probability lies in its credible interval; the mean width."""
    if predictions.members is None or predictions.true_probs is None:
        return {}
    lower, upper = credible_intervals(predictions.members, evaluation.credible_level)
    truth = predictions.true_probs.to(lower.dtype)
    inside = (truth >= lower) & (truth <= upper)
    return {"ci_coverage": float(inside.double().mean()), "ci_width": float((upper - lower).double().mean())}


@SHIFTS.register("noise")
def gaussian_noise(sigma: float = 0.5):
    """``x + σ ξ``, ``ξ ~ N(0, I)`` drawn per row from the seed ``NOISE_SEED + index``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")

    def shift(x: Tensor, index: Tensor) -> Tensor:
        generator = torch.Generator()
        noise = torch.stack([torch.randn(x.shape[1:], generator=generator.manual_seed(NOISE_SEED + int(i)))
                             for i in index]) if len(x) else torch.zeros_like(x)
        return x + sigma * noise.to(x.dtype)

    return shift


@SHIFTS.register("blur")
def blur(sigma: float = 1.0):
    """A Gaussian blur of standard deviation ``σ`` pixels, kernel ``2⌈3σ⌉ + 1`` (at most the image's size)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")

    def shift(x: Tensor, index: Tensor) -> Tensor | None:
        from torchvision.transforms.functional import gaussian_blur

        if x.dim() != 4:
            return None
        size = min(2 * math.ceil(3 * sigma) + 1, *(d if d % 2 else d - 1 for d in x.shape[-2:]))
        return gaussian_blur(x, [size, size], [sigma, sigma])

    return shift


@SHIFTS.register("motion_blur")
def motion_blur(fraction: float = 0.16):
    """Horizontal motion blur, as HumP-KD evaluates its fire classifiers (Mainuddin et al., arXiv 2606.14684: the
    abstract names the corruption, not its severity): a box kernel of odd length ``L = max(3, ⌊f·W⌋ | 1)`` for a
    fraction ``f`` of the image width ``W`` (5 px at 28 px and f = 0.16, 35 px at 224 px), replicate padding; images
    only. The kernel sums to 1, so blurring the normalised inputs equals blurring the raw pixels."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")

    def shift(x: Tensor, index: Tensor) -> Tensor | None:
        if x.dim() != 4:
            return None
        length = blur_length(x.shape[-1], fraction)
        kernel = torch.full((x.shape[1], 1, 1, length), 1.0 / length, dtype=x.dtype, device=x.device)
        return F.conv2d(F.pad(x, (length // 2, length // 2, 0, 0), mode="replicate"), kernel, groups=x.shape[1])

    return shift


def blur_length(width: int, fraction: float) -> int:
    """``max(3, ⌊fraction · width⌋ | 1)``: an odd kernel length."""
    return max(3, int(fraction * width) | 1)
