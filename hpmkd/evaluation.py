"""Measuring a predictor on a split: accuracy and NLL for model selection (:func:`evaluate`), and the registered test
metrics every final stage records once, for its selected predictor (:func:`test_metrics`).

A test metric is an entry of :data:`METRICS`: ``metric(**context) -> {name: value}``; the stage records each value
as ``test_<name>``. The context an entry may declare (as keyword arguments; it gets only those it declares) is
``predictions``, the predictor's log predictive distribution over the whole split (:class:`Predictions`), and, for
metrics that run the predictor again (on corrupted copies of the split, or to time it), ``predictor``, ``split``
(the test :class:`~hpmkd.data.source.BatchSource`), ``batch_size`` and ``device``. Calibration, uncertainty, F1,
AUC, robustness or speed metrics are one registered entry each; an entry may decline a task (return ``{}``, e.g. a
binary-only metric on ten classes, or an image corruption on tabular rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.data.source import BatchSource
from hpmkd.registry import Registry


@dataclass
class Predictions:
    """A predictor's log predictive distribution ``log_probs`` ``[N, C]`` over a split, and the labels ``y`` ``[N]``."""

    log_probs: Tensor
    y: Tensor

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @property
    def num_classes(self) -> int:
        return int(self.log_probs.shape[1])


METRICS: Registry[Callable[..., dict[str, float]]] = Registry(
    "metric", context=("predictions", "predictor", "split", "batch_size", "device"))


@torch.no_grad()
def evaluate(predictor: nn.Module, split: BatchSource, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of ``predictor`` (a model, whose logits are its scores, or any
    :mod:`hpmkd.predictors` predictor) on ``split``."""
    was_training = predictor.training
    predictor.eval()
    correct, loss_sum = 0, 0.0
    for x, y, _ in split.batches(batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        scores = predictor(x)
        loss_sum += F.cross_entropy(scores, y, reduction="sum").item()
        correct += (scores.argmax(1) == y).sum().item()
    predictor.train(was_training)
    n = max(1, len(split))
    return correct / n, loss_sum / n


@torch.no_grad()
def predict(predictor: nn.Module, split: BatchSource, batch_size: int, device: torch.device) -> Predictions:
    """``predictor``'s log predictive distribution over every row of ``split``, in order."""
    was_training = predictor.training
    predictor.eval()
    log_probs, labels = [], []
    for x, y, _ in split.batches(batch_size, shuffle=False):
        log_probs.append(F.log_softmax(predictor(x.to(device)), -1).cpu())
        labels.append(y)
    predictor.train(was_training)
    return Predictions(torch.cat(log_probs), torch.cat(labels))


def test_metrics(predictions: Predictions, predictor: nn.Module | None = None, split: BatchSource | None = None,
                 batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, float]:
    """Every registered metric, as ``test_<name>``, on ``predictions`` (and, for the metrics that need them, the
    ``predictor`` and the test ``split`` they came from; without them those metrics give nothing)."""
    from hpmkd.config import load_plugins  # metrics registered by plugin modules

    load_plugins()
    context = {"predictions": predictions, "predictor": predictor, "split": split, "batch_size": batch_size,
               "device": torch.device(device)}
    out: dict[str, float] = {}
    for name in METRICS.names():
        out.update({f"test_{k}": float(v) for k, v in METRICS.build(name, {}, "metric", **context).items()})
    return out


@METRICS.register("brier")
def brier(predictions: Predictions) -> dict[str, float]:
    """Multi-class Brier score (Brier 1950): ``(1/N) Σ_i Σ_c (p_ic − 1[y_i = c])²``; 0 is perfect, 2 the worst."""
    onehot = F.one_hot(predictions.y, predictions.num_classes).to(predictions.probs.dtype)
    return {"brier": float(((predictions.probs - onehot) ** 2).sum(1).mean())}
