"""Fitting an estimator teacher, with out-of-fold outputs on the training split (plain NumPy / scikit-learn).

A teacher that scores the rows it was fitted on leaks their labels into its outputs: a forest's in-sample
probabilities are sharper than on unseen rows, and in-context tabular foundation models collapse to near one-hot
vectors. The tabular foundation-model distillation study (Tanna et al., "Distilling Tabular Foundation Models for
Structured Health Data", arXiv 2605.18702) therefore labels the student's training rows *out of fold*::

    folds = StratifiedKFold(n_splits=K, shuffle=True, random_state=seed) on (X_train, y_train)
    for each fold k:  f_k = fit(X_train[fold != k], y_train[fold != k])
                      P_oof[fold == k] = f_k.predict_proba(X_train[fold == k])

so each training row's output comes from a model that never saw it, while the teacher that scores validation and
test rows (and is served) is fitted on the whole training split. ``teacher_fit: in_sample`` skips the folds: the
training rows are then scored by that full teacher, which is what every other teacher does and what measures the
leak. K = 5 is our default (the paper's K is not stated in its abstract).

:class:`FoldOutputs` (the out-of-fold log-probabilities, each row's fold and the plan) is saved as a ``.npz`` read
back with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from hpmkd.estimators import build_estimator, predict_log_proba
from hpmkd.registry import ConfigError

TeacherFit = Literal["oof", "in_sample"]


@dataclass(frozen=True)
class FoldPlan:
    """``folds`` stratified folds of the training split, shuffled with ``seed``."""

    folds: int
    seed: int

    @property
    def name(self) -> str:
        """What names the plan in a cache key: ``oof:folds=5:seed=0``."""
        return f"oof:folds={self.folds}:seed={self.seed}"

    def assign(self, y: np.ndarray) -> np.ndarray:
        """Each row's fold ``[N]`` (``StratifiedKFold(folds, shuffle=True, random_state=seed)``)."""
        from sklearn.model_selection import StratifiedKFold

        fold = np.empty(len(y), dtype=np.int64)
        splitter = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros((len(y), 1)), y)):
            fold[held_out] = k
        return fold


def check_folds(y: np.ndarray, folds: int, class_names: Sequence[str], path: str = "tabular.folds") -> None:
    """Every class has at least ``folds`` training rows (else a fold's model would miss a class); a
    :class:`ConfigError` naming the classes otherwise."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(class_names))
    short = [f"{class_names[c]!r} ({int(n)} rows)" for c, n in enumerate(counts) if n < folds]
    if short:
        raise ConfigError(f"{path}: out-of-fold teacher outputs need every class in every fold, but in the training "
                          f"split class {', '.join(short)} has fewer rows than the {folds} folds. Lower {path} "
                          f"(at least 2), give that class more rows (data.max_train), or set "
                          f"tabular.teacher_fit: in_sample.")


@dataclass
class FoldOutputs:
    """Out-of-fold teacher outputs on the training split: ``log_probs`` ``[N, C]``, ``fold`` ``[N]`` (the fold
    whose model, fitted without it, scored each row) and the plan."""

    log_probs: np.ndarray
    fold: np.ndarray
    plan: FoldPlan

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        with open(tmp, "wb") as fh:
            np.savez(fh, log_probs=self.log_probs, fold=self.fold,
                     plan=np.array([self.plan.folds, self.plan.seed], dtype=np.int64))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FoldOutputs":
        with np.load(path, allow_pickle=False) as data:
            folds, seed = (int(v) for v in data["plan"])
            return cls(data["log_probs"], data["fold"], FoldPlan(folds, seed))


@dataclass
class FittedTeacher:
    """An estimator fitted on the whole training split, and its out-of-fold outputs there (``None`` in sample)."""

    estimator: Any
    train_outputs: FoldOutputs | None


def fit_teacher(name: str, options: dict[str, Any], x: np.ndarray, y: np.ndarray, *, fit: TeacherFit, folds: int,
                seed: int, threads: int = 1, class_names: Sequence[str] | None = None) -> FittedTeacher:
    """Fit estimator ``name`` on the training rows ``x`` ``[N, D]``, ``y`` ``[N]`` (module docstring); the
    estimator's seed option (unless given) is ``seed``, its thread option and OpenMP/BLAS pools ``threads``."""
    from threadpoolctl import threadpool_limits

    x = np.array(x, dtype=np.float32).reshape(len(x), -1)  # own, writable copies (Ray hands read-only views)
    y = np.array(y, dtype=np.int64)

    def fitted(rows: np.ndarray) -> Any:
        with threadpool_limits(limits=max(1, threads)):
            return build_estimator(name, options, threads=threads, seed=seed).fit(x[rows], y[rows])

    full = fitted(np.arange(len(y)))
    if fit == "in_sample":
        return FittedTeacher(full, None)
    check_folds(y, folds, class_names or [str(c) for c in range(int(y.max()) + 1)])
    plan = FoldPlan(folds, seed)
    fold = plan.assign(y)
    log_probs = np.empty((len(y), len(full.classes_)), dtype=np.float32)
    for k in range(folds):
        held_out = fold == k
        log_probs[held_out] = predict_log_proba(fitted(np.flatnonzero(~held_out)), x[held_out], threads)
    return FittedTeacher(full, FoldOutputs(log_probs, fold, plan))
