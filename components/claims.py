"""Claims on stage keys: several drivers sharing one MLflow store compute each stage once.

A stage's MLflow run carries its content key (tag ``stage_key``) from the moment it is created, ``RUNNING``. That
open run is the claim: among the ``RUNNING`` runs with one key whose driver is alive (:mod:`hpmkd.components.orphans`:
the parent run's ``driver.id`` and heartbeat), the one created first (then the smaller run id) holds it. Every other
run with that key waits, polling every :data:`POLL_S` seconds, until a finished run with the key exists (it then
reuses it, as any later run would) or the holder is gone (its driver died or its stage failed: the next in line
computes the stage, resuming what the holder left, see :func:`hpmkd.components.stages.base.resume_key`).

No lock outside the store is needed: every driver creates its run before it looks, and all of them order the same
runs the same way, so exactly one computes. Runs of one driver never wait for each other (a graph holds a key once).
"""

from __future__ import annotations

import logging
import time

from mlflow.entities import Run

from hpmkd.components import orphans
from hpmkd.components.tracking import Tracker

log = logging.getLogger("hpmkd")

#: seconds between two looks while another driver computes the stage
POLL_S = 2.0
PARENT_TAG = "mlflow.parentRunId"


def driver_alive(tracker: Tracker, run: Run) -> bool:
    """Whether the driver recording ``run`` (a stage run; its parent carries the driver's identity) is alive."""
    parent = run.data.tags.get(PARENT_TAG)
    tags = tracker.client.get_run(parent).data.tags if parent else run.data.tags
    driver = tags.get(orphans.DRIVER_TAG)
    if driver is None:
        return False
    beat = tags.get(orphans.HEARTBEAT_TAG)
    return orphans.driver_alive(driver, float(beat) if beat else None, time.time())


def holder(tracker: Tracker, key: str) -> Run | None:
    """The run that holds the claim on ``key``: the first-created ``RUNNING`` run with that key whose driver lives."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      f"tags.stage_key = '{key}' and attributes.status = 'RUNNING'")
    for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id)):
        if driver_alive(tracker, run):
            return run
    return None


def claim(tracker: Tracker, key: str, run_id: str) -> str | None:
    """Wait while another driver's run computes stage ``key``. Returns the finished run to reuse, or ``None`` when
    this run (``run_id``, already created with the key) holds the claim and computes the stage."""
    mine = tracker.client.get_run(run_id)
    waiting_for = None
    while True:
        done = tracker.finished_stage(key)
        if done is not None:
            return done
        first = holder(tracker, key)
        if first is None or first.info.run_id == run_id or same_parent(first, mine):
            return None
        if first.info.run_id != waiting_for:
            waiting_for = first.info.run_id
            log.info("stage key %s: run %s of another driver is computing it; waiting to reuse it", key, waiting_for)
            tracker.set_tags(run_id, {"waited_for": waiting_for})
        time.sleep(POLL_S)


def same_parent(a: Run, b: Run) -> bool:
    parent = a.data.tags.get(PARENT_TAG)
    return parent is not None and parent == b.data.tags.get(PARENT_TAG)


#: the tag naming what a stage run resumes from and writes to under ``ray.storage_path`` (its Train run or search)
RESUME_TAG = "resume_key"


def interrupted(tracker: Tracker, key: str, run_id: str) -> str | None:
    """The resume name (tag :data:`RESUME_TAG`) of the newest other run of stage ``key`` that did not finish: KILLED,
    FAILED, or still RUNNING under a dead driver. Never a live run's: two runs never write into one folder."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      f"tags.stage_key = '{key}' and attributes.status != 'FINISHED'",
                                      order_by=["attributes.start_time DESC"])
    for run in runs:
        name = run.data.tags.get(RESUME_TAG)
        if run.info.run_id == run_id or name is None:
            continue
        if run.info.status == "RUNNING" and driver_alive(tracker, run):
            continue
        return name
    return None
