"""The shared optimisation memory's learning half: every finished distillation, described so that later experiments
can find similar ones (the first half, stage reuse by content key, is in :mod:`hpmkd.components.stages`).

Each finished ``distill`` stage and each Tune trial gets, on its own MLflow run:

* tag ``memory = kd`` (what makes it a record) and tag ``memory.record``: the whole
  :class:`~hpmkd.proposals.MemoryRecord` as JSON (task meta-features, configuration, outcome), which
  :func:`recall` reads back;
* for queries and the UI: metrics ``meta.<feature>`` (:data:`hpmkd.meta_features.NUMERIC_FEATURES`),
  ``hp.<hyperparameter>``, ``memory.val_acc``, ``memory.retention``, ``memory.epochs``, ``memory.train_fraction``,
  and tags ``memory.source``, ``memory.task_id``, ``meta.dataset``, ``meta.student_model``, ``meta.student_family``,
  ``meta.teacher_models``, ``meta.methods``.

Any process that reaches the store can query it, e.g.
``mlflow.search_runs(search_all_experiments=True, filter_string="tags.memory = 'kd' and
metrics.`meta.log_classes` > 2")``.
"""

from __future__ import annotations

import json

from mlflow import MlflowClient
from mlflow.entities import RunTag

from hpmkd.components.graph import StageResult
from hpmkd.components.tracking import log_metrics
from hpmkd.config import ExperimentConfig
from hpmkd.data import DataSplits
from hpmkd.meta_features import NUMERIC_FEATURES, TaskFeatures, label_statistics
from hpmkd.proposals import MemoryRecord
from hpmkd.search_space import recorded_config

MEMORY_TAG = "memory"
MEMORY_KIND = "kd"
RECORD_TAG = "memory.record"
PAGE = 1000


def task_features(cfg: ExperimentConfig, splits: DataSplits, teachers: list[StageResult], n_student: int) -> TaskFeatures:
    """The meta-features of distilling ``cfg.student`` from ``teachers`` (finished stage results) on ``splits``."""
    entropy, imbalance = label_statistics(splits.train.y, splits.num_classes)
    return TaskFeatures(
        dataset=splits.name,
        n_train=len(splits.train),
        num_classes=splits.num_classes,
        input_shape=tuple(splits.input_shape),
        label_entropy=entropy,
        imbalance=imbalance,
        teacher_models=tuple(t.model().model.model for t in teachers),
        teacher_params=tuple(t.model().params for t in teachers),
        teacher_acc=tuple(float(t.metrics["val_acc"]) for t in teachers),
        student_model=cfg.student.model,
        student_params=n_student,
        methods=tuple(sorted(cfg.distill.methods)),
    )


def make_record(task: TaskFeatures, config: dict[str, float], val_acc: float, epochs: int, source: str,
                run_id: str, train_fraction: float = 1.0) -> MemoryRecord:
    """A record whose retention is ``val_acc`` over the best teacher's validation accuracy; ``train_fraction``: the
    share of the training split it trained on (a search trial's)."""
    return MemoryRecord(task, config, val_acc, val_acc / max(max(task.teacher_acc), 1e-12), epochs, source, run_id,
                        train_fraction)


def remember(client: MlflowClient, record: MemoryRecord) -> None:
    """Write ``record`` onto its own run (``record.run_id``), see the module docstring."""
    task = record.task
    tags = {
        MEMORY_TAG: MEMORY_KIND,
        RECORD_TAG: json.dumps(record.to_dict()),
        "memory.source": record.source,
        "memory.task_id": task.task_id(),
        "meta.dataset": task.dataset,
        "meta.student_model": task.student_model,
        "meta.student_family": task.student_family,
        "meta.teacher_models": ",".join(task.teacher_models),
        "meta.methods": ",".join(task.methods),
    }
    client.log_batch(record.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    metrics = {f"meta.{name}": float(v) for name, v in zip(NUMERIC_FEATURES, task.numeric())}
    metrics.update({f"hp.{k}": v for k, v in record.config.items()})
    metrics.update({"memory.val_acc": record.val_acc, "memory.retention": record.retention,
                    "memory.epochs": float(record.epochs), "memory.train_fraction": record.train_fraction})
    log_metrics(client, record.run_id, metrics, step=0)


def remember_stage(client: MlflowClient, run_id: str, cfg: ExperimentConfig, splits: DataSplits,
                   teachers: list[StageResult], metrics: dict[str, float]) -> MemoryRecord:
    """Record a finished ``distill`` stage (its config ``cfg``, its final ``metrics``) in the memory."""
    task = task_features(cfg, splits, teachers, int(metrics["params"]))
    record = make_record(task, recorded_config(cfg), metrics["val_acc"], int(metrics["epochs_run"]), "distill", run_id)
    remember(client, record)
    return record


def recall(client: MlflowClient, experiments: list[str] | None = None) -> list[MemoryRecord]:
    """Every finished record in the store (or in the named ``experiments`` only)."""
    if experiments is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        found = [client.get_experiment_by_name(name) for name in experiments]
        ids = [e.experiment_id for e in found if e is not None]
    if not ids:
        return []
    records, token = [], None
    while True:
        runs = client.search_runs(ids, f"tags.{MEMORY_TAG} = '{MEMORY_KIND}' and attributes.status = 'FINISHED'",
                                  max_results=PAGE, page_token=token)
        records += [MemoryRecord.from_dict(json.loads(r.data.tags[RECORD_TAG])) for r in runs]
        token = runs.token
        if not token:
            return records
