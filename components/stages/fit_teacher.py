"""The ``fit_teacher`` stage kind: an estimator teacher (:class:`~hpmkd.components.stage_params.FitTeacher`) fitted
on the training split in a Ray task holding the stage's CPUs (its thread option and OpenMP/BLAS pools use them),
with out-of-fold outputs on the training rows when ``fit`` is ``oof`` (:mod:`hpmkd.oof`).

The stage saves the estimator in its safe format (``checkpoint/model.skops`` or the booster's own file) and the
out-of-fold outputs (``checkpoint/train_outputs.npz``), measures the full estimator on validation and test like any
teacher (``val_acc``, ``test_acc``, ``test_loss`` and every registered test metric: ``test_auc``, ``test_ece``,
``test_brier``), and records the leak the folds avoid: the mean top probability and the NLL of the training rows'
outputs in sample (``train_confidence_in_sample``, ``train_nll_in_sample``) and out of fold
(``train_confidence_oof``, ``train_nll_oof``). Its :class:`ModelArtifact` points at the estimator file, and at the
stored outputs through ``train_outputs``, which the teacher-output cache serves to students for the training rows
(:mod:`hpmkd.components.teacher_outputs`).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from hpmkd import checkpoint
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageResult
from hpmkd.components.placement import cluster_nodes, placement, placement_tags
from hpmkd.components.stage_params import FitTeacher
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun
from hpmkd.estimator_teacher import EstimatorPredictor, EstimatorTeacher, FittedEstimator
from hpmkd.estimators import estimator_size, file_name, load_estimator, predict_log_proba, save_estimator
from hpmkd.evaluation import measure, predict_final
from hpmkd.oof import FoldOutputs, fit_teacher

#: the stored out-of-fold outputs' file name
TRAIN_OUTPUTS = "train_outputs.npz"


def training_fit(log_probs: np.ndarray, y: np.ndarray, name: str) -> dict[str, float]:
    """Mean top probability and NLL of a teacher's outputs on the training rows."""
    return {f"train_confidence_{name}": float(np.exp(log_probs.max(1)).mean()),
            f"train_nll_{name}": float(-log_probs[np.arange(len(y)), y].mean())}


def fit_to_files(params: FitTeacher, x: np.ndarray, y: np.ndarray, *, seed: int, threads: int,
                 class_names: list[str], path: str, outputs: str) -> tuple[bool, str]:
    """Fit the teacher (run as a Ray task), save it to ``path`` and its out-of-fold outputs, if any, to
    ``outputs``; whether there are stored outputs, and the Ray node id the task ran on."""
    fitted = fit_teacher(params.model.model, params.model.options, x, y, fit=params.fit, folds=params.folds,
                         seed=seed, threads=threads, class_names=class_names)
    save_estimator(params.model.model, fitted.estimator, path)
    if fitted.train_outputs is not None:
        fitted.train_outputs.save(outputs)
    return fitted.train_outputs is not None, ray.get_runtime_context().get_node_id()


@STAGE_KINDS.register("fit_teacher")
class FitTeacherKind(StageKind):
    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: FitTeacher = stage.params
        splits, name = ctx.splits, params.model.model
        threads = max(1, int(stage.cpus))
        x, y = splits.train.x.numpy(), splits.train.y.numpy()
        folder = ctx.out_dir / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        path, outputs = folder / file_name(name), folder / TRAIN_OUTPUTS
        began = time.perf_counter()
        task = ray.remote(fit_to_files).options(num_cpus=stage.cpus)
        stored, node_id = ray.get(task.remote(params, x, y, seed=ctx.cfg.seed, threads=threads,
                                              class_names=splits.class_names, path=str(path), outputs=str(outputs)))
        fit_s = time.perf_counter() - began
        where = placement([node_id], cluster_nodes())
        ctx.tracker.set_tags(run.run_id, placement_tags(where))
        _, estimator = load_estimator(path)  # what is measured is what the teacher actors will serve
        ctx.tracker.log_artifact(run.run_id, path, "checkpoint")
        leak = training_fit(predict_log_proba(estimator, x, threads), y, "in_sample")
        if stored:
            ctx.tracker.log_artifact(run.run_id, outputs, "checkpoint")
            leak.update(training_fit(FoldOutputs.load(outputs).log_probs, y, "oof"))
        predictor = EstimatorPredictor(EstimatorTeacher(FittedEstimator(name, estimator), threads))
        batch, cpu = ctx.cfg.train.eval_batch_size, torch.device("cpu")
        predicted = predict_final(predictor, splits, batch, cpu, ctx.cfg.evaluation)
        size = estimator_size(estimator, path)
        metrics = {**predicted.split_scores(), "params": float(size), "fit_s": fit_s, **leak,
                   **measure(predicted, ctx.cfg.evaluation)}
        artifact = ModelArtifact(params.teacher, params.model, str(path), checkpoint.file_digest(path), size,
                                 {k: metrics[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss")},
                                 str(outputs) if stored else None)
        return StageOutcome(metrics, artifact, placement=where)
