"""Test metrics for classifiers beyond accuracy and NLL: ROC-AUC and the expected calibration error, registered in
:data:`hpmkd.evaluation.METRICS` (this module is listed in :data:`hpmkd.config.PLUGIN_MODULES`), so every final
stage records them as ``test_auc`` and ``test_ece`` next to ``test_acc`` (accuracy), ``test_loss`` (the mean
negative log-likelihood, scikit-learn's ``log_loss``) and ``test_brier``.
"""

from __future__ import annotations

import numpy as np

from hpmkd.evaluation import METRICS, Predictions

#: equal-width confidence bins of the ECE (Guo et al. 2017; torchmetrics' ``CalibrationError`` default is 15)
ECE_BINS = 15


@METRICS.register("auc")
def auc(predictions: Predictions) -> dict[str, float]:
    """ROC-AUC with scikit-learn's ``roc_auc_score``: binary, the positive class's probability; several classes,
    the macro average of one-vs-rest AUCs over the classes present in the labels (probabilities renormalised over
    them). Declined (``{}``) when the labels hold a single class."""
    from sklearn.metrics import roc_auc_score

    y = predictions.y.numpy()
    probs = predictions.probs.double().numpy()
    present = np.unique(y)
    if len(present) < 2:
        return {}
    if predictions.num_classes == 2:
        return {"auc": float(roc_auc_score(y, probs[:, 1]))}
    if len(present) == 2:
        return {"auc": float(roc_auc_score(y == present[1], probs[:, present[1]]))}
    kept = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    return {"auc": float(roc_auc_score(y, kept, multi_class="ovr", average="macro", labels=present))}


@METRICS.register("ece")
def ece(predictions: Predictions) -> dict[str, float]:
    """Top-label expected calibration error (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
    ``Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|`` over :data:`ECE_BINS` equal-width bins of the top probability
    (bins ``(b/15, (b+1)/15]``, as torchmetrics' ``CalibrationError(norm="l1")``). scikit-learn has no ECE."""
    probs = predictions.probs.double().numpy()
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = (predicted == predictions.y.numpy()).astype(np.float64)
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    gap = np.abs(np.bincount(bins, correct, ECE_BINS) - np.bincount(bins, confidence, ECE_BINS))
    return {"ece": float(gap.sum() / max(1, len(bins)))}
