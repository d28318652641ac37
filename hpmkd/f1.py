"""F1 test metrics (scikit-learn's ``f1_score``): macro-F1 for every classification task, and the binary F1 of class
1 for two classes, as HumP-KD reports its fire classifiers (Mainuddin et al., arXiv 2606.14684).

``macro_f1 = (1/K) Σ_k F1_k`` with ``F1_k = 2·P_k·R_k / (P_k + R_k)`` (per-class precision and recall of the
predicted class ``argmax p``; a class never predicted nor present scores 0, scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from hpmkd.evaluation import METRICS, Predictions


def macro_f1(predicted: Tensor | np.ndarray, labels: Tensor | np.ndarray, num_classes: int) -> float:
    """The macro-averaged F1 of ``predicted`` classes against ``labels`` over classes ``0 .. num_classes − 1``."""
    from sklearn.metrics import f1_score  # imported on first use: configs are read without scikit-learn

    return float(f1_score(np.asarray(labels), np.asarray(predicted), labels=list(range(num_classes)), average="macro",
                          zero_division=0))


@METRICS.register("f1")
def f1(predictions: Predictions) -> dict[str, float]:
    """``macro_f1``; with two classes also ``f1`` (binary, positive class 1)."""
    predicted = predictions.log_probs.argmax(1).numpy()
    labels = predictions.y.numpy()
    out = {"macro_f1": macro_f1(predicted, labels, predictions.num_classes)}
    if predictions.num_classes == 2:
        from sklearn.metrics import f1_score

        out["f1"] = float(f1_score(labels, predicted, pos_label=1, average="binary", zero_division=0))
    return out
