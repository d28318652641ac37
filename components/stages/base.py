"""The stage protocol: how every stage kind runs, is recorded, keyed and reused.

A stage kind is a registered :class:`StageKind` class (:data:`STAGE_KINDS`, keyed by the ``kind`` of the params type
it runs, :mod:`hpmkd.components.stage_params`) with one method, :meth:`StageKind.run`, and the type of its record
(``record_type``). :func:`execute` wraps every kind the same way:

1. the stage's params with the configuration its ``tune`` inputs hand on (:meth:`StageParams.tuned`);
2. its settings (the seed, the data config and :meth:`StageParams.settings`): logged as params and hashed, with its
   inputs' keys, the data fingerprint and the code version, into its content key (:func:`stage_key`);
3. a finished run with the same key is reused (its metrics, model and record read back from ``stage.json`` and its
   files; when they cannot be read, tag ``not_read_back``, the stage is computed), otherwise the kind runs; when an earlier run of the same stage exists but is not reused, the run says why
   (tag ``not_reused``: the code changed, or which settings did). While another driver sharing the store computes
   the same key, the stage waits for it and then reuses it (:mod:`hpmkd.components.claims`);
4. the nested MLflow run closes FINISHED, or FAILED with the error while earlier stages stay as they are.

Where the stage's time went is recorded on its run as ``stage_phase.<name>_s`` metrics (:mod:`hpmkd.phases`): the
kind adds its phases to :attr:`StageRun.phases`, :func:`execute` the claim and the total, and what the stage
trained (:func:`hpmkd.components.estimates.work_metrics`), which later duration estimates learn from.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import ray
from mlflow.exceptions import MlflowException

from hpmkd.components import claims
from hpmkd.components.estimates import work_metrics
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageParams, StageResult
from hpmkd.components.stage_params import TunedConfig
from hpmkd.components.tracking import MAX_PARAM_LENGTH, Tracker
from hpmkd.components.tracking_relay import TrackingRelay
from hpmkd.config import ExperimentConfig
from hpmkd.config_schema import flatten, from_dict, to_dict
from hpmkd.data import DataSplits
from hpmkd.paths import inside, safe_name
from hpmkd.phases import Phases
from hpmkd.registry import Registry
from hpmkd.version import code_version

log = logging.getLogger("hpmkd")

#: per stage run, the metrics, model and record a later identical stage reuses (the shared optimisation memory)
STAGE_RECORD = "stage.json"


@dataclass
class ExperimentContext:
    """What every stage of one experiment run shares."""

    cfg: ExperimentConfig
    tracker: Tracker
    parent_run_id: str
    splits: DataSplits
    storage_path: str
    out_dir: Path
    progress_hub: Any = None  # a ProgressHub actor that training processes report their epochs to
    splits_ref: Any = None  # ``splits`` in Ray's object store: training processes read it instead of the files
    _relay: Any = field(default=None, repr=False)
    _relay_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tracking_relay(self) -> Any:
        """The experiment's :class:`~hpmkd.components.tracking_relay.TrackingRelay` (it logs stage tasks' epochs),
        started by the first stage that asks for it."""
        with self._relay_lock:
            if self._relay is None:
                self._relay = TrackingRelay.remote(self.tracker.tracking_uri)
            return self._relay

    def close(self) -> None:
        """End the actors the experiment started for its stages (the tracking relay)."""
        with self._relay_lock:
            if self._relay is not None:
                ray.kill(self._relay)
                self._relay = None

    def stage_dir(self, stage: str) -> Path:
        """The folder of stage ``stage``'s files: a safe file name under :attr:`out_dir`, never outside it."""
        return inside(self.out_dir, safe_name(stage))


@dataclass
class StageRun:
    """The MLflow run recording a stage, the stage's content key, and where its time goes."""

    run_id: str
    key: str
    phases: Phases = field(default_factory=Phases)


class StageKind(ABC):
    """How one kind of stage runs. ``record_type``: the dataclass of the kind's :attr:`StageOutcome.record`
    (``None``: it has none), so a reused stage reads it back typed."""

    record_type: ClassVar[type | None] = None

    @abstractmethod
    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        """Compute the stage (its params are ``stage.params``, its inputs' results ``inputs``), recording into the
        MLflow run ``run.run_id``."""


STAGE_KINDS: Registry[StageKind] = Registry("stage kind")


def overrides_from(inputs: dict[str, StageResult]) -> dict[str, Any]:
    """The configuration (config key path -> value) the ``tune`` stages among ``inputs`` hand on."""
    return {k: v for r in inputs.values() if isinstance(r.record, TunedConfig) for k, v in r.record.overrides.items()}


def stage_settings(params: StageParams, ctx: ExperimentContext) -> dict[str, Any]:
    """The resolved settings that define a stage (logged as params and hashed into its key): the seed, the data, how
    its final model is measured (the ``evaluation`` section: its test metrics depend on it) and its own settings."""
    return {"seed": ctx.cfg.seed, "data": to_dict(ctx.cfg.data), "evaluation": to_dict(ctx.cfg.evaluation),
            **params.settings()}


def stage_key(kind: str, settings: dict[str, Any], inputs: dict[str, StageResult], fingerprint: str) -> str:
    """Content key: hash of the stage's resolved settings, its inputs' keys, the data fingerprint and the code."""
    payload = {
        "kind": kind,
        "settings": settings,
        "inputs": sorted(r.key or "" for r in inputs.values()),
        "data": fingerprint,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def execute(stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult]) -> StageResult:
    """Run ``stage`` inside its own nested MLflow run (see module docstring)."""
    kind = STAGE_KINDS.get(stage.kind)()
    stage = replace(stage, params=stage.params.tuned(overrides_from(inputs)))
    settings = stage_settings(stage.params, ctx)
    key = stage_key(stage.kind, settings, inputs, ctx.splits.fingerprint)
    tags = {
        "kind": "stage",
        "stage": stage.name,
        "stage_kind": stage.kind,
        "stage_key": key,
        "code_version": code_version(),
        "data_fingerprint": ctx.splits.fingerprint,
        "pipeline": ctx.cfg.pipeline,
        "seed": str(ctx.cfg.seed),
    }
    began = time.perf_counter()
    phases = Phases()
    try:
        with ctx.tracker.run(stage.name, tags, ctx.parent_run_id) as run_id:
            ctx.tracker.log_params(run_id, settings)
            with phases.timed("claim"):
                previous = claims.claim(ctx.tracker, key, run_id) if ctx.cfg.reuse else None
            outcome = None
            if previous is not None:
                log.info("stage %s (%s): reusing finished run %s (same key %s)", stage.name, stage.kind, previous, key)
                outcome = read_back(ctx, stage, kind, previous)
            if outcome is not None:
                ctx.tracker.set_tags(run_id, {"reused": "true", "reused_from": previous})
            else:
                if previous is not None:
                    ctx.tracker.set_tags(run_id, {"not_read_back": previous})
                    previous = None  # computed, not reused
                elif ctx.cfg.reuse:
                    explain_not_reused(ctx, stage, settings, run_id)
                log.info("stage %s (%s) started, MLflow run %s", stage.name, stage.kind, run_id)
                outcome = kind.run(stage, ctx, inputs, StageRun(run_id, key, phases))
                ctx.tracker.log_dict(run_id, {"metrics": outcome.metrics, "artifact": to_dict(outcome.artifact),
                                              "record": to_dict(outcome.record)}, STAGE_RECORD)
            ctx.tracker.log_metrics(run_id, final_metrics(outcome.metrics))
            phases.add("total", time.perf_counter() - began)
            work_tags, work = work_metrics(stage, len(ctx.splits.train))  # what later estimates learn from
            ctx.tracker.set_tags(run_id, work_tags)
            ctx.tracker.log_metrics(run_id, {**phases.metrics(), **work})
    except BaseException as err:
        log.error("stage %s FAILED after %.1f s: %s", stage.name, time.perf_counter() - began, err)
        raise
    log.info("stage %s finished in %.1f s: %s", stage.name, time.perf_counter() - began,
             ", ".join(f"{k}={outcome.metrics[k]:.4f}" for k in ("val_acc", "test_acc") if k in outcome.metrics))
    return StageResult(stage.name, stage.kind, run_id, "FINISHED", time.perf_counter() - began, outcome.metrics,
                       outcome.artifact, outcome.record, key, reused=previous is not None, phases=phases.seconds,
                       placement=outcome.placement)


#: how often a finished run is read back before its stage is computed instead
READ_BACK_ATTEMPTS = 3


def read_back(ctx: ExperimentContext, stage: Stage, kind: StageKind, run_id: str) -> StageOutcome | None:
    """:func:`reuse`, tried :data:`READ_BACK_ATTEMPTS` times a second apart; ``None``, with a warning, when the
    finished run's record or files still cannot be read: the stage is then computed, which gives the same result.
    (MLflow reports a failed artifact download without its cause; once, with two drivers and a test suite sharing a
    2-core machine, a record that was on disk could not be read, and the whole pipeline failed.)"""
    for attempt in range(1, READ_BACK_ATTEMPTS + 1):
        try:
            return reuse(ctx, stage, kind, run_id)
        except (MlflowException, OSError, ValueError) as err:
            failure = err
            if attempt < READ_BACK_ATTEMPTS:
                time.sleep(1.0)
    log.warning("stage %s: finished run %s could not be read back (%s); computing the stage instead", stage.name,
                run_id, failure)
    return None


def reuse(ctx: ExperimentContext, stage: Stage, kind: StageKind, run_id: str) -> StageOutcome:
    """The outcome of the finished stage run ``run_id``: its recorded metrics, model (its file fetched) and record."""
    folder = ctx.stage_dir(stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    saved = json.loads(Path(ctx.tracker.download(run_id, STAGE_RECORD, folder)).read_text())
    artifact = None
    if saved["artifact"] is not None:
        artifact = from_dict(ModelArtifact, saved["artifact"], "artifact")
        # logged under its own file name (model.pt, or a loaded teacher's checkpoint file), as its stored outputs
        artifact = replace(artifact, path=ctx.tracker.download(run_id, f"checkpoint/{Path(artifact.path).name}", folder))
        if artifact.train_outputs is not None:
            artifact = replace(artifact, train_outputs=ctx.tracker.download(
                run_id, f"checkpoint/{Path(artifact.train_outputs).name}", folder))
    record = None
    if saved["record"] is not None and kind.record_type is not None:
        record = from_dict(kind.record_type, saved["record"], "record")
    return StageOutcome(saved["metrics"], artifact, record)


def explain_not_reused(ctx: ExperimentContext, stage: Stage, settings: dict[str, Any], run_id: str) -> None:
    """When an earlier finished run of this stage (same name, same data) exists but has another key, say why it is
    not reused: the code that computes results changed (its ``code_version``), or which settings differ. Logged, and
    set as the tag ``not_reused`` on the new run."""
    earlier = ctx.tracker.client.search_runs(
        [ctx.tracker.experiment_id],
        f"tags.stage = '{stage.name}' and tags.data_fingerprint = '{ctx.splits.fingerprint}' and "
        f"attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not earlier:
        return
    old = earlier[0]
    version = old.data.tags.get("code_version")
    if version != code_version():
        why = (f"run {old.info.run_id} was computed by "
               f"{'code from before versions were recorded' if version is None else f'code version {version}'}, "
               f"this is {code_version()}: the code that computes results changed, so the stage is recomputed")
    else:
        mine = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(settings).items()}
        changed = sorted(k for k in set(mine) | set(old.data.params) if mine.get(k) != old.data.params.get(k))
        why = (f"run {old.info.run_id} had other settings ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''})"
               if changed else f"run {old.info.run_id} read other inputs (a stage it depends on changed)")
    log.info("stage %s: not reusing the earlier run: %s", stage.name, why)
    ctx.tracker.set_tags(run_id, {"not_reused": why})


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's end-of-run metrics for MLflow; ``val_acc``/``val_loss`` are per-epoch series there, so the selected
    model's values are logged as ``selected_val_acc``/``selected_val_loss``."""
    return {(f"selected_{k}" if k in ("val_acc", "val_loss") else k): v for k, v in metrics.items()}


def resume_key(ctx: ExperimentContext, run: StageRun) -> str:
    """What names a stage's Ray Train run or Tune search under ``ray.storage_path`` (with :func:`storage_name`):
    the content key and this stage run, so that no two runs ever write into one folder; but with ``reuse`` on, when
    an earlier run of the same stage was interrupted (killed, failed, or its driver died), that run's name, so
    that this one resumes what it left (:func:`hpmkd.components.claims.interrupted`; only one run at a time
    computes a key). Recorded as the stage run's tag ``resume_key``."""
    adopted = claims.interrupted(ctx.tracker, run.key, run.run_id) if ctx.cfg.reuse else None
    name = adopted or f"{run.key}-{run.run_id}"
    if adopted:
        log.info("stage key %s: resuming %s, left by an interrupted run", run.key, adopted)
    ctx.tracker.set_tags(run.run_id, {claims.RESUME_TAG: name})
    return name


def storage_name(ctx: ExperimentContext, stage: Stage, resume: str) -> str:
    """The folder name of a stage's Ray Train run or Tune search under ``ray.storage_path``: the experiment and
    stage names made safe for a file name (:func:`hpmkd.paths.safe_name`), and :func:`resume_key`."""
    return f"{safe_name(ctx.cfg.experiment)}-{safe_name(stage.name)}-{resume}"
