"""Measuring a predictor on a split: accuracy and NLL for model selection (:func:`evaluate`), and the registered test
metrics every final stage records once, for its selected predictor (:func:`final_test_metrics`).

A test metric is an entry of :data:`METRICS`: ``metric(predictions[, evaluation]) -> {name: value}`` on the predictor's
predictions over the whole split (:class:`Predictions`: the log predictive distribution and labels; with a
posterior or an ensemble, every member's distribution; the predictor's distribution on the validation split, which
calibrates prediction sets; the known class probabilities of a synthetic data set); ``evaluation`` is the experiment's
``evaluation`` section (:class:`EvaluationConfig`). The stage records each value as ``test_<name>``. Calibration,
uncertainty, F1 or AUC metrics are one registered entry each; an entry may decline a task (return ``{}``, e.g. a
binary-only metric on ten classes, or an epistemic measure of a single network).

A *test shift* is an entry of :data:`SHIFTS` (Gaussian noise, blur: :mod:`hpmkd.uncertainty_metrics`): it corrupts
the test inputs at a fixed severity, and every metric is recorded on the shifted split too, as
``test_<shift>_<name>``. ``evaluation.shifts`` names the shifts and their severities.

Predicting and measuring are two steps (:func:`predict_final`, then :func:`measure`), so they can run in different
processes: a Ray stage's worker predicts, and the driver measures what it returned (a few MB of log-probabilities);
the metrics' libraries (scikit-learn, torchmetrics, SciPy: about 1.5 s to import) are then imported once per driver,
not once per worker process (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.config import SECTIONS, load_plugins, positive
from hpmkd.config_schema import join
from hpmkd.data.source import BatchSource
from hpmkd.registry import ConfigError, Registry


@dataclass
class Predictions:
    """A predictor's log predictive distribution ``log_probs`` ``[N, C]`` over a split, and the labels ``y`` ``[N]``.

    ``members``: per-member log-probabilities ``[S, N, C]`` of a predictor made of several (posterior samples, an
    ensemble), ``None`` for one network. ``true_probs``: the known class probabilities ``[N, C]`` (synthetic data).
    ``calibration``: the same predictor's predictions on the validation split (prediction sets are calibrated on it).
    """

    log_probs: Tensor
    y: Tensor
    members: Tensor | None = None
    true_probs: Tensor | None = None
    calibration: Predictions | None = None
    #: the accuracy and mean negative log-likelihood of the predictor's scores on the split, as :func:`evaluate` gives
    #: them (:func:`predict` sets both, from the same forward passes)
    accuracy: float | None = None
    loss: float | None = None

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @property
    def num_classes(self) -> int:
        return int(self.log_probs.shape[1])


@SECTIONS.register("evaluation")
@dataclass
class EvaluationConfig:
    """How every final stage's predictor is measured on the test split (any pipeline; section ``evaluation``).

    ``set_coverage``: target coverage of the prediction sets calibrated on validation; ``selective_coverage``: the
    share of test inputs, the least uncertain, that selective accuracy keeps; ``ece_bins``: equal-width confidence
    bins of the expected calibration error and the reliability diagram; ``credible_level``: level of the per-class
    credible intervals of a posterior's class probabilities; ``shifts``: the shifted test sets, shift name
    (:data:`SHIFTS`) -> its options (severity), ``{}`` for none; ``efficiency``: also record the predictor's size
    and CPU throughput at batch 1 (``test_size_mb``, ``test_cpu_fps``: :mod:`hpmkd.efficiency`; off by default,
    since timing a model costs a fraction of a second per stage and is noisy on a shared machine).
    """

    set_coverage: float = 0.95
    selective_coverage: float = 0.9
    ece_bins: int = 15
    credible_level: float = 0.95
    shifts: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"noise": {"sigma": 0.5}, "blur": {"sigma": 1.0}})
    efficiency: bool = False

    def check(self, path: str) -> None:
        for key in ("set_coverage", "selective_coverage", "credible_level"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{join(path, key)}: a probability in (0, 1), got {getattr(self, key)}.")
        positive(path, ece_bins=self.ece_bins)
        for name, options in self.shifts.items():
            if not isinstance(options, dict):
                raise ConfigError(f"{join(path, 'shifts')}.{name}: expected the shift's options as a mapping, e.g. "
                                  f"{{sigma: 0.5}}, got {options!r}.")
            SHIFTS.build(name, options, f"{join(path, 'shifts')}.{name}")


METRICS: Registry[Callable[..., dict[str, float]]] = Registry("metric", context=("predictions", "evaluation"))
#: shift name -> ``factory(**severity) -> shift``; ``shift(x, index)`` is the corrupted batch, or ``None`` when the
#: shift does not apply to inputs of that shape (blur on tabular rows)
SHIFTS: Registry[Callable[[Tensor, Tensor], Tensor | None]] = Registry("test shift")


@torch.no_grad()
def evaluate(predictor: nn.Module, split: BatchSource, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of ``predictor`` (a model, whose logits are its scores, or any
    :mod:`hpmkd.predictors` predictor) on ``split``."""
    was_training = predictor.training
    predictor.eval()
    correct, loss_sum = 0, 0.0
    for x, y, _ in split.batches(batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        right, loss = scored(predictor(x), y)
        correct, loss_sum = correct + right, loss_sum + loss
    predictor.train(was_training)
    n = max(1, len(split))
    return correct / n, loss_sum / n


def scored(scores: Tensor, y: Tensor) -> tuple[int, float]:
    """A batch's correct predictions and summed cross-entropy."""
    return int((scores.argmax(1) == y).sum().item()), F.cross_entropy(scores, y, reduction="sum").item()


@torch.no_grad()
def predict(predictor: nn.Module, split: BatchSource, batch_size: int, device: torch.device) -> Predictions:
    """``predictor``'s predictions over every row of ``split``, in order: its log predictive distribution, and each
    member's when it has several (``predictor.outputs(x) -> (scores, member log-probabilities)``); the split's known
    class probabilities when it has them (``split.true_probs``); and its accuracy and loss, as :func:`evaluate` gives
    them."""
    was_training = predictor.training
    predictor.eval()
    log_probs, members, labels = [], [], []
    correct, loss_sum = 0, 0.0
    with_members = hasattr(predictor, "outputs")
    for x, y, _ in split.batches(batch_size, shuffle=False):
        x = x.to(device)
        if with_members:
            scores, member_log_probs = predictor.outputs(x)
            members.append(member_log_probs.cpu())
        else:
            scores = predictor(x)
        right, loss = scored(scores, y.to(device))
        correct, loss_sum = correct + right, loss_sum + loss
        log_probs.append(F.log_softmax(scores, -1).cpu())
        labels.append(y)
    predictor.train(was_training)
    n = max(1, len(split))
    return Predictions(torch.cat(log_probs), torch.cat(labels), torch.cat(members, 1) if members else None,
                       getattr(split, "true_probs", None), accuracy=correct / n, loss=loss_sum / n)


def test_metrics(predictions: Predictions, options: EvaluationConfig | None = None,
                 prefix: str = "test_") -> dict[str, float]:
    """Every registered metric on ``predictions``, as ``<prefix><name>``."""
    load_plugins()  # metrics registered by plugin modules
    options = options or EvaluationConfig()
    out: dict[str, float] = {}
    for name in METRICS.names():
        values = METRICS.build(name, {}, "metric", predictions=predictions, evaluation=options)
        out.update({f"{prefix}{k}": float(v) for k, v in values.items()})
    return out


class ShiftedSource:
    """A :class:`~hpmkd.data.source.BatchSource` whose rows are ``source``'s with ``shift`` applied."""

    def __init__(self, source: BatchSource, shift: Callable[[Tensor, Tensor], Tensor | None]):
        self.source, self.shift = source, shift

    def __len__(self) -> int:
        return len(self.source)

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.source.rows(index)
        return self.shift(x, index), y

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for x, y, index in self.source.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                                               world_size=world_size):
            yield self.shift(x, index), y, index

    def applies(self) -> bool:
        x, _ = self.source.rows(torch.arange(min(1, len(self.source))))
        return self.shift(x, torch.arange(len(x))) is not None


@dataclass
class FinalPredictions:
    """What a final stage's selected predictor predicted, for :func:`measure`: on the test split (``test``, with its
    validation predictions as ``calibration``), on each shifted test split that applies (``shifted``, by shift
    name), and the measures that need the predictor itself rather than its predictions (``measured``: its size and
    throughput, ``evaluation.efficiency``)."""

    test: Predictions
    shifted: dict[str, Predictions] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    def split_scores(self) -> dict[str, float]:
        """``val_acc``, ``val_loss``, ``test_acc``, ``test_loss``: the predictor's accuracy and mean negative
        log-likelihood on the validation and test splits, as :func:`evaluate` gives them, from the forward passes
        that made these predictions."""
        val = self.test.calibration
        return {"val_acc": val.accuracy, "val_loss": val.loss, "test_acc": self.test.accuracy,
                "test_loss": self.test.loss}


def predict_final(predictor: nn.Module, splits: Any, batch_size: int, device: torch.device,
                  options: EvaluationConfig | None = None) -> FinalPredictions:
    """``predictor``'s predictions on the test split and on every shifted test split ``options`` names (see
    :func:`final_test_metrics`), on the CPU."""
    load_plugins()  # shifts registered by plugin modules
    options = options or EvaluationConfig()
    calibration = predict(predictor, splits.val, batch_size, device)
    predicted = FinalPredictions(replace(predict(predictor, splits.test, batch_size, device), calibration=calibration))
    for name, severity in options.shifts.items():
        shifted = ShiftedSource(splits.test, SHIFTS.build(name, severity, f"evaluation.shifts.{name}"))
        if shifted.applies():
            predicted.shifted[name] = replace(predict(predictor, shifted, batch_size, device), true_probs=None,
                                              calibration=calibration)
    if options.efficiency:
        from hpmkd.efficiency import efficiency

        predicted.measured = {f"test_{k}": v for k, v in efficiency(predictor, splits.test).items()}
    return predicted


def measure(predicted: FinalPredictions, options: EvaluationConfig | None = None) -> dict[str, float]:
    """Every registered metric on the test predictions, as ``test_<name>``, and on each shifted split's, as
    ``test_<shift>_<name>``, with the predictor's own measures."""
    out = test_metrics(predicted.test, options)
    for name, predictions in predicted.shifted.items():
        out.update(test_metrics(predictions, options, prefix=f"test_{name}_"))
    return {**out, **predicted.measured}


def final_test_metrics(predictor: nn.Module, splits: Any, batch_size: int, device: torch.device,
                       options: EvaluationConfig | None = None) -> dict[str, float]:
    """What a final stage records about its selected predictor: every metric on the test split (prediction sets
    calibrated on the validation split) as ``test_<name>``, and on each shifted test split as
    ``test_<shift>_<name>`` (the sets keep their validation calibration: how they hold up under shift)."""
    return measure(predict_final(predictor, splits, batch_size, device, options), options)


@METRICS.register("brier")
def brier(predictions: Predictions) -> dict[str, float]:
    """Multi-class Brier score (Brier 1950): ``(1/N) Σ_i Σ_c (p_ic − 1[y_i = c])²``; 0 is perfect, 2 the worst."""
    onehot = F.one_hot(predictions.y, predictions.num_classes).to(predictions.probs.dtype)
    return {"brier": float(((predictions.probs - onehot) ** 2).sum(1).mean())}
