"""ROC-AUC, registered in :data:`hpmkd.evaluation.METRICS` (this module is listed in
:data:`hpmkd.config.PLUGIN_MODULES`), so every final stage records it as ``test_auc`` next to ``test_ece``
(:mod:`hpmkd.uncertainty_metrics`), ``test_acc`` (accuracy), ``test_loss`` (the mean
negative log-likelihood, scikit-learn's ``log_loss``) and ``test_brier``.
"""

from __future__ import annotations

import numpy as np

from hpmkd.evaluation import METRICS, Predictions


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
