"""``hpmkd ablate``: the full pipeline and each single-component removal, over seeds, in one MLflow experiment.

Variant ``full`` is the config as given (with its ``--set`` overrides); variant ``no_<c>`` adds
``components.<c>=false``: HPM-KD's component ``c`` replaced by its plain counterpart (:mod:`hpmkd.pipelines.switches`). Each
(variant, seed) is one :func:`hpmkd.pipelines.runner.run_experiment` run, seed by seed (the full pipeline first), in the
config's experiment, so every stage the removal does not change (teachers, their logit cache, ...) is computed once
per seed and reused by its content key (but not by ``no_memory``, which recomputes by design).

Every pipeline run is tagged ``ablation`` (the ablation's id: a digest of the config without the seed and the
storage locations, :func:`ablation_id`, so rerunning the same ablation gives the same id) and ``ablation_variant``.
A rerun skips each (variant, seed) that already has a FINISHED run of the ablation, so a crash loses only the run in
progress; a variant that fails is recorded FAILED by the runner and the ablation goes on. Then the table is computed
from the MLflow records alone (:mod:`hpmkd.components.report.ablation`), written into the output folder
(:func:`hpmkd.components.report.ablation_files.write_ablation`) and logged as the artifacts of one run tagged
``kind=ablation``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hpmkd.components.report.ablation import ABLATION_TAG, FULL, VARIANT_TAG, AblationTable, ablation_table, removal
from hpmkd.components.report.ablation_files import write_ablation
from hpmkd.components.report.records import load_experiment
from hpmkd.components.report.tables import comparable
from hpmkd.components.tracking import Tracker, default_tracking_uri
from hpmkd.pipelines.switches import COMPONENTS, effective_config
from hpmkd.config import ExperimentConfig, load_config
from hpmkd.config_schema import flatten
from hpmkd.registry import ConfigError, did_you_mean
from hpmkd.pipelines import plan_experiment
from hpmkd.pipelines.preflight import preflight
from hpmkd.pipelines.runner import run_experiment

log = logging.getLogger("hpmkd")

KIND = "ablation"  # the ``kind`` tag of the run holding the table
SKIPPED, FINISHED, FAILED = "skipped", "finished", "failed"


@dataclass(frozen=True)
class Variant:
    """A pipeline of the ablation: the full one (``component`` ``None``) or the one without ``component``."""

    component: str | None

    @property
    def name(self) -> str:
        """The tag ``ablation_variant``: ``full`` or ``no_<component>``."""
        return FULL if self.component is None else removal(self.component)

    @property
    def overrides(self) -> tuple[str, ...]:
        return () if self.component is None else (f"components.{self.component}=false",)


def variants(components: Sequence[str]) -> list[Variant]:
    """The full pipeline, then one removal per component of ``components`` (in :data:`COMPONENTS` order)."""
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"--components: unknown component {unknown[0]!r}.{did_you_mean(unknown[0], COMPONENTS)} "
                          f"Components: {', '.join(COMPONENTS)}.")
    return [Variant(None), *(Variant(c) for c in COMPONENTS if c in components)]


def ablation_id(cfg: ExperimentConfig) -> str:
    """A digest of ``cfg`` without the seed and the storage locations (:func:`hpmkd.components.report.tables.comparable`):
    the same config (whatever its seed or where it keeps things) is the same ablation."""
    payload = json.dumps(comparable(flatten(cfg.as_dict())), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AblationPlan:
    """What one ``hpmkd ablate`` runs: ``config`` with ``overrides`` (the full pipeline, ``base``), each variant,
    over ``seeds``."""

    config: str
    overrides: tuple[str, ...]
    base: ExperimentConfig
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    ablation_id: str

    def config_for(self, variant: Variant, seed: int) -> ExperimentConfig:
        return load_config(self.config, [*self.overrides, *variant.overrides, f"seed={seed}"])


def plan_ablation(config: str | Path, seeds: int, components: Sequence[str] | None = None,
                  overrides: Sequence[str] = ()) -> AblationPlan:
    """The plan for seeds ``0 .. seeds-1`` and the removal of each of ``components`` (default: all six). Every
    variant's config and stage graph is checked here, with its data (:func:`hpmkd.pipelines.preflight.preflight`),
    before anything runs (:class:`ConfigError`)."""
    if seeds < 1:
        raise ConfigError(f"--seeds: at least 1 seed is needed, got {seeds}.")
    base = load_config(config, list(overrides))
    chosen = variants(COMPONENTS if components is None else components)
    off = [v.component for v in chosen if v.component in base.components.off()]
    if off:
        raise ConfigError(f"--components: {', '.join(off)} already off in the config (components.<name>: false), so "
                          f"its removal would be the full pipeline; set it true or leave it out of --components.")
    plan = AblationPlan(str(config), tuple(overrides), base, tuple(chosen), tuple(range(seeds)), ablation_id(base))
    full = effective_config(plan.config_for(chosen[0], 0)).as_dict()
    splits = None
    for variant in chosen:
        cfg = plan.config_for(variant, 0)
        splits = preflight(plan_experiment(cfg), splits)  # the data are loaded once, every variant's models checked
        if variant.component is not None and same_but_switches(effective_config(cfg).as_dict(), full):
            log.warning("ablation: %s changes nothing in this config (pipeline %s): its runs repeat the full "
                        "pipeline's (every stage reused)", variant.name, cfg.pipeline)
    return plan


def same_but_switches(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two effective configs are equal apart from their ``components`` switches."""
    return {**a, "components": None} == {**b, "components": None}


@dataclass(frozen=True)
class PairOutcome:
    """What this invocation did for one (variant, seed): ``skipped`` (a FINISHED run of the ablation existed),
    ``finished`` or ``failed`` (with the error); ``run_id`` is the pipeline run (``None`` if none was created)."""

    variant: str
    seed: int
    status: str
    run_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class AblationResult:
    """One invocation: what it did per (variant, seed), the table from the records, the files written and the run
    (tagged ``kind=ablation``) that holds them."""

    plan: AblationPlan
    tracking_uri: str
    outcomes: tuple[PairOutcome, ...]
    table: AblationTable
    files: tuple[Path, ...]
    run_id: str

    @property
    def failed(self) -> list[PairOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]


def run_ablation(plan: AblationPlan, out_dir: str | Path, *, tracking_uri: str | None = None,
                 ray_init: dict[str, Any] | None = None) -> AblationResult:
    """Run every (variant, seed) of ``plan`` not finished before, then write and log the table (module docstring)."""
    uri = tracking_uri or plan.base.mlflow.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, plan.base.experiment, plan.base.mlflow.artifact_root)
    outcomes = tuple(run_pair(plan, tracker, variant, seed, ray_init) for seed in plan.seeds for variant in plan.variants)
    records = load_experiment(tracker.client, plan.base.experiment, tracker.experiment_id)
    table = ablation_table(records, plan.ablation_id)
    files = tuple(write_ablation(table, out_dir))
    with tracker.run(f"ablation-{plan.ablation_id}", {"kind": KIND, ABLATION_TAG: plan.ablation_id}) as run_id:
        tracker.log_params(run_id, {"config": plan.config, "overrides": list(plan.overrides),
                                    "variants": [v.name for v in plan.variants], "seeds": list(plan.seeds)})
        for path in files:
            tracker.log_artifact(run_id, path, KIND)
    return AblationResult(plan, uri, outcomes, table, files, run_id)


def finished_run(plan: AblationPlan, tracker: Tracker, variant: Variant, seed: int) -> str | None:
    """The newest FINISHED pipeline run of ``variant`` and ``seed`` in the ablation, if any."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.kind = 'pipeline' and tags.{ABLATION_TAG} = '{plan.ablation_id}' and tags.{VARIANT_TAG} = "
        f"'{variant.name}' and tags.seed = '{seed}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_pair(plan: AblationPlan, tracker: Tracker, variant: Variant, seed: int,
             ray_init: dict[str, Any] | None) -> PairOutcome:
    """Run ``variant`` with ``seed`` unless the ablation already has it finished; a failure is returned, not raised."""
    done = finished_run(plan, tracker, variant, seed)
    if done is not None:
        log.info("ablation %s: %s seed %d finished before (run %s), skipped", plan.ablation_id, variant.name, seed, done)
        return PairOutcome(variant.name, seed, SKIPPED, done)
    log.info("ablation %s: %s seed %d", plan.ablation_id, variant.name, seed)
    tags = {ABLATION_TAG: plan.ablation_id, VARIANT_TAG: variant.name}
    try:
        summary = run_experiment(plan.config_for(variant, seed), tracking_uri=tracker.tracking_uri, ray_init=ray_init,
                                 tags=tags)
    except Exception as err:  # a failed stage, or data or Ray unavailable: this pair fails, the others still run
        log.error("ablation %s: %s seed %d FAILED: %s (going on)", plan.ablation_id, variant.name, seed, err)
        # the pipeline run, when one was created: Tracker.run marks it FAILED and names it on the error
        return PairOutcome(variant.name, seed, FAILED, getattr(err, "run_id", None), f"{type(err).__name__}: {err}")
    return PairOutcome(variant.name, seed, FINISHED, summary["parent_run_id"])
