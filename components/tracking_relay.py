"""A stage task's MLflow records, written by an actor, so that a training process never imports MLflow.

Importing MLflow (with pandas and its other imports) and opening the store cost a worker process's first stage
about a second (docs/performance.md), paid again by every pooled worker process. A :class:`TrackingRelay` (an
actor without CPUs, one per experiment) holds the store's client instead, and a stage task
(:mod:`hpmkd.components.task_executor`) sends it each epoch's metrics and waits for the answer: an epoch is still
logged after its checkpoint is saved and before the next epoch trains, so the task executor's exactly-once rule is
unchanged. Calls are answered one at a time, in the order they arrive; each names its own run.

A relay whose process dies is restarted (:data:`RELAY_RESTARTS`) but a call it had not answered is not sent again:
the task fails, and its retry logs the epoch its checkpoint holds unless the run has it (:meth:`log_unless_logged`),
so no epoch is logged twice.
"""

from __future__ import annotations

from typing import Any

import ray

#: a relay whose process dies is started again this many times (its client reopens the store)
RELAY_RESTARTS = 3


@ray.remote(num_cpus=0, max_restarts=RELAY_RESTARTS, max_task_retries=0)
class TrackingRelay:
    """Logs metrics to the runs of the MLflow store at ``tracking_uri`` for the processes that send them."""

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from hpmkd.components.tracking import log_metrics

        log_metrics(self.client, run_id, metrics, step)

    def log_unless_logged(self, run_id: str, metrics: dict[str, float]) -> bool:
        """Log an epoch's ``metrics`` unless the run has that epoch (its ``epoch`` metric); whether it logged."""
        epoch = int(metrics["epoch"])
        if epoch in {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}:
            return False
        self.log_metrics(run_id, metrics, epoch)
        return True

