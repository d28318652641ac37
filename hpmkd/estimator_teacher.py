"""Estimator teachers: a fitted scikit-learn (or LightGBM / XGBoost / CatBoost) classifier as a teacher provider.

Registered in :data:`hpmkd.teachers.PROVIDERS` as ``sklearn``; this module is listed in
:data:`hpmkd.config.PLUGIN_MODULES`, so configs, Ray actors (a fresh process) and the cache fill see it. The
provider serves every :data:`hpmkd.estimators.ESTIMATORS` name, reads a fitted estimator's file safely in the driver
(skops with scikit-learn types only, or the booster's own model file; never a pickle), and answers a batch with
``log p(y | x)``, which the distiller treats as the teacher's logits (``softmax(log p) = p``). It has no features:
methods that read teacher features cannot use it. Served on as many threads as the process was given CPUs (a
teacher actor sets torch's thread count from its ``ray.teacher_cpus``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.estimators import ESTIMATORS, check_options, load_estimator, predict_log_proba, set_threads
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.teachers import PROVIDERS, TeacherSpec

#: what an estimator teacher offers feature methods: nothing
NO_FEATURES = ModelTaps(feature_taps=(), embedding_tap="", classifier_tap="")


@dataclass
class FittedEstimator:
    """What :meth:`EstimatorTeacher.read` returns: the estimator's name and the fitted estimator."""

    name: str
    estimator: Any


@PROVIDERS.register("sklearn")
class EstimatorTeacher:
    """A fitted estimator serving log-probabilities (see the module docstring)."""

    kind: ClassVar[str] = "sklearn"

    def __init__(self, fitted: FittedEstimator, threads: int = 1):
        self.name = fitted.name
        self.threads = max(1, threads)
        self.estimator = set_threads(fitted.name, fitted.estimator, self.threads)

    @staticmethod
    def serves(ref: ModelRef) -> bool:
        return ref.model in ESTIMATORS

    @staticmethod
    def check(ref: ModelRef, path: str) -> None:
        """The options are the estimator's (its signature and constraints); its package is installed."""
        check_options(ref.model, ref.options, path)

    @staticmethod
    def read(path: str) -> FittedEstimator:
        """The fitted estimator in ``path``, read safely (:func:`hpmkd.estimators.load_estimator`)."""
        return FittedEstimator(*load_estimator(path))

    @classmethod
    def build(cls, spec: TeacherSpec, payload: FittedEstimator) -> "EstimatorTeacher":
        if payload.name != spec.model.model:
            raise ValueError(f"teacher {spec.name!r} is a {spec.model.model}, but its file holds a {payload.name}.")
        return cls(payload, torch.get_num_threads())

    @staticmethod
    def taps(ref: ModelRef, shape: DataShape) -> ModelTaps:
        return NO_FEATURES

    @staticmethod
    def size(ref: ModelRef, shape: DataShape) -> int | None:
        """Unknown until fitted (a forest's size depends on the data)."""
        return None

    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        if taps:
            raise ValueError(f"a {self.name} teacher serves predictions only, not the features {list(taps)}; use "
                             f"logit methods (kd, dkd) with estimator teachers.")
        return torch.from_numpy(predict_log_proba(self.estimator, x.detach().cpu().numpy(), self.threads)), {}

    def to(self, device: torch.device | str) -> "EstimatorTeacher":
        return self



class EstimatorPredictor(nn.Module):
    """A fitted estimator as a :mod:`hpmkd.predictors` predictor (scores: its log-probabilities), so that
    :func:`hpmkd.evaluation.evaluate` and :func:`~hpmkd.evaluation.predict` measure it like any model."""

    def __init__(self, teacher: EstimatorTeacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher.forward(x)[0]
