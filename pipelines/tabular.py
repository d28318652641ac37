"""Estimator teachers in every pipeline: the ``tabular`` config section and the ``fit_teacher`` stage that makes
a teacher whose ``model`` is an estimator name (:data:`hpmkd.estimators.ESTIMATORS`).

.. code-block:: yaml

    tabular:
      teacher_fit: oof     # oof: training rows get out-of-fold teacher outputs; in_sample: the full teacher's
      folds: 5             # stratified folds of the training split (seeded by the experiment's seed)

The section is checked against the whole experiment before anything runs: out-of-fold outputs are stored for the
training rows as they are, so they need ``data.augment: none`` and a stored teacher-output source (``auto`` or
``cache``); estimator teachers have no features, so every method must read logits only; and every class needs at
least ``folds`` training rows (the data set is loaded to count them: a table's errors surface here too).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpmkd.components.graph import Stage
from hpmkd.components.stage_params import FitTeacher
from hpmkd.config import SECTIONS, ExperimentConfig
from hpmkd.config_schema import join
from hpmkd.data import load_dataset
from hpmkd.data.loading import data_shape
from hpmkd.estimator_teacher import EstimatorTeacher
from hpmkd.losses import LOSSES
from hpmkd.models.ref import DataShape, on_meta
from hpmkd.oof import TeacherFit, check_folds
from hpmkd.pipelines.registry import TEACHER_STAGES, worker_cpus
from hpmkd.registry import ConfigError
from hpmkd.teachers import teacher_taps


@SECTIONS.register("tabular")
@dataclass
class TabularConfig:
    """How estimator teachers label the training rows (module docstring)."""

    teacher_fit: TeacherFit = "oof"
    folds: int = 5

    def check(self, path: str) -> None:
        if self.folds < 2:
            raise ConfigError(f"{join(path, 'folds')}: out-of-fold outputs need at least 2 folds, got {self.folds}.")

    def check_with(self, cfg: ExperimentConfig) -> None:
        estimators = [t.name for t in cfg.teachers if EstimatorTeacher.serves(t.ref)]
        if not estimators:
            return
        for i, t in enumerate(cfg.teachers):
            if t.name in estimators and t.checkpoint:
                raise ConfigError(f"teachers.{i}.checkpoint: estimator teachers are fitted by the pipeline (their "
                                  f"out-of-fold outputs need the folds refitted); remove the checkpoint.")
        feature_methods = feature_readers(cfg)
        if feature_methods:
            raise ConfigError(f"distill.methods: {', '.join(feature_methods)} read(s) teacher features, but "
                              f"{', '.join(estimators)} (estimator teacher(s)) serve predictions only; use methods "
                              f"that read logits (kd, dkd).")
        if self.teacher_fit != "oof":
            return
        if cfg.data.augment != "none":
            raise ConfigError("data.augment: out-of-fold teacher outputs score the training rows as they are; set "
                              "data.augment: none (or tabular.teacher_fit: in_sample).")
        if cfg.distill.teacher_outputs in ("online", "bank"):
            raise ConfigError(f"distill.teacher_outputs: {cfg.distill.teacher_outputs!r} cannot serve stored "
                              f"out-of-fold outputs; use auto or cache (or tabular.teacher_fit: in_sample).")
        splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
        check_folds(splits.train.y.numpy(), self.folds, splits.class_names)


def feature_readers(cfg: ExperimentConfig) -> list[str]:
    """The ``distill.methods`` that would read features of an estimator teacher: each is built (on the meta device)
    with the teachers' taps, estimators having none; a method that cannot be built without them reads them too."""
    shape = DataShape(*data_shape(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.options))
    estimators = [i for i, t in enumerate(cfg.teachers) if EstimatorTeacher.serves(t.ref)]
    context = dict(num_classes=shape.num_classes, num_teachers=len(cfg.teachers), num_train=1,
                   student_taps=cfg.student.ref.taps(shape),
                   teacher_taps=[teacher_taps(t.ref, shape) for t in cfg.teachers])
    readers = []
    for name, (_, options) in cfg.distill.method_options().items():
        try:
            with on_meta():
                reads = LOSSES.build(name, options, f"distill.methods.{name}", **context).teacher_tap_names()
        except (ValueError, IndexError, KeyError):
            readers.append(name)
            continue
        if any(reads[i] for i in estimators):
            readers.append(name)
    return readers


@TEACHER_STAGES.register(EstimatorTeacher.kind)
def estimator_teacher_stage(cfg: ExperimentConfig, index: int) -> Stage:
    """``fit_teacher``: the estimator fitted on the training split (out of fold per ``tabular``), on the CPUs of a
    training stage."""
    t = cfg.teachers[index]
    params = FitTeacher(t.name, t.ref, cfg.tabular.teacher_fit, cfg.tabular.folds)
    return Stage(f"teacher_{t.name}", params, cpus=worker_cpus(cfg))
