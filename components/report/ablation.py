"""The ablation table of ``hpmkd ablate``, computed from the MLflow records alone (:class:`ExperimentRecords`).

The pipeline runs of one ablation carry the tag :data:`ABLATION_TAG` (the ablation's id) and :data:`VARIANT_TAG`
(:data:`FULL`, or ``no_<component>`` for the pipeline with that component replaced by its plain counterpart). Per
variant and seed, the newest FINISHED run counts. Per variant: the student's test accuracy, retention and wall time
as mean ± sample std over seeds; per removal, the paired differences of test accuracy against the full pipeline of
the same seed (removal minus full) with their mean ± sample std and a two-sided paired t-test
(:func:`scipy.stats.ttest_rel`). Accuracies and differences are fractions, as in MLflow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

from hpmkd.components.report.records import ExperimentRecords, PipelineRecord
from hpmkd.components.report.tables import seed_order

ABLATION_TAG = "ablation"
VARIANT_TAG = "ablation_variant"
FULL = "full"
REMOVED = "no_"
NO_RUN = "no run"  # the status of a (variant, seed) that has no run in the store
#: significance level of the paired t-test
ALPHA = 0.05
#: differences closer than this are equal (accuracies are multiples of 1 / test set size; float noise is far below)
TOLERANCE = 1e-9
#: what the data show about a component, from its paired test (see :func:`verdict`)
HELPS, HURTS, NO_SIGNIFICANT, NO_DIFFERENCE, CONSTANT, UNTESTED = (
    "helps", "hurts", "no significant difference", "no difference", "constant difference", "not testable")


def removal(component: str) -> str:
    """The variant name of the pipeline without ``component``."""
    return f"{REMOVED}{component}"


@dataclass(frozen=True)
class SeedResult:
    """The run of one variant that counts for one seed."""

    seed: str
    run_id: str
    test_acc: float
    retention: float | None
    wall_s: float | None


@dataclass(frozen=True)
class Estimate:
    """Mean and sample standard deviation (``None`` with a single value) of ``n`` values."""

    mean: float
    std: float | None
    n: int


def estimate(values: Sequence[float]) -> Estimate | None:
    """``None`` without values."""
    if not values:
        return None
    return Estimate(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class PairedTest:
    """A removal against the full pipeline, seed by seed: ``differences[i]`` = removal - full test accuracy in
    ``seeds[i]``; ``t`` and ``p`` from the two-sided paired t-test (``None`` with fewer than 2 pairs, or when the
    differences have no spread: all within :data:`TOLERANCE`); ``verdict`` says what they show (:func:`verdict`)."""

    seeds: tuple[str, ...]
    differences: tuple[float, ...]
    difference: Estimate | None
    t: float | None
    p: float | None
    verdict: str


def paired_test(seeds: Sequence[str], removed: Sequence[float], full: Sequence[float]) -> PairedTest:
    """The paired test of ``removed`` against ``full`` (test accuracies of the same ``seeds``, in order)."""
    differences = tuple(r - f for r, f in zip(removed, full, strict=True))
    t = p = None
    if len(differences) >= 2 and max(differences) - min(differences) > TOLERANCE:
        result = stats.ttest_rel(removed, full)
        t, p = float(result.statistic), float(result.pvalue)
    difference = estimate(differences)
    return PairedTest(tuple(seeds), differences, difference, t, p, verdict(differences, difference, p))


def verdict(differences: Sequence[float], difference: Estimate | None, p: float | None) -> str:
    """What removing the component shows: it :data:`HELPS` (accuracy drops significantly without it), it
    :data:`HURTS` (accuracy rises significantly), :data:`NO_SIGNIFICANT` (p >= :data:`ALPHA`); or, without a test,
    :data:`UNTESTED` (fewer than 2 pairs), :data:`NO_DIFFERENCE` (identical accuracy in every seed) or
    :data:`CONSTANT` (the same non-zero difference in every seed: no spread to test)."""
    if len(differences) < 2:
        return UNTESTED
    if p is None:
        return NO_DIFFERENCE if abs(differences[0]) <= TOLERANCE else CONSTANT
    if p >= ALPHA:
        return NO_SIGNIFICANT
    return HELPS if difference.mean < 0 else HURTS


@dataclass(frozen=True)
class VariantRow:
    """One variant: its counted runs (by seed), their estimates, and for a removal its paired test."""

    name: str
    results: tuple[SeedResult, ...]
    test_acc: Estimate | None
    retention: Estimate | None
    wall_s: Estimate | None
    paired: PairedTest | None

    @property
    def component(self) -> str | None:
        """The removed component (``None`` for the full pipeline)."""
        return self.name.removeprefix(REMOVED) if self.name.startswith(REMOVED) else None


@dataclass(frozen=True)
class Unfinished:
    """A (variant, seed) of the ablation without a finished run: the newest run's status, id and error, or status
    :data:`NO_RUN` when the store has no run of it."""

    variant: str
    seed: str
    status: str
    run_id: str | None
    error: str | None



@dataclass(frozen=True)
class AblationTable:
    """One ablation of one experiment: its seeds, a row per variant (the full pipeline first) and the (variant,
    seed) pairs without a finished run."""

    ablation_id: str
    experiment: str
    seeds: tuple[str, ...]
    variants: tuple[VariantRow, ...]
    unfinished: tuple[Unfinished, ...]


def ablation_ids(exp: ExperimentRecords) -> list[str]:
    """The ablations with pipeline runs in ``exp``, in order of their first run."""
    return list(dict.fromkeys(p.tags[ABLATION_TAG] for p in exp.pipelines if ABLATION_TAG in p.tags))


def ablation_table(exp: ExperimentRecords, ablation_id: str) -> AblationTable:
    """The table of ablation ``ablation_id`` over every variant and seed that has a run in ``exp`` (the full
    pipeline first, then the removals in order of their first run)."""
    runs = [p for p in exp.pipelines if p.tags.get(ABLATION_TAG) == ablation_id and VARIANT_TAG in p.tags]
    names = sorted(dict.fromkeys(p.tags[VARIANT_TAG] for p in runs), key=lambda n: n != FULL)  # stable sort
    seeds = tuple(sorted(dict.fromkeys(p.seed for p in runs), key=seed_order))
    newest: dict[tuple[str, str], PipelineRecord] = {}  # runs are oldest first; a finished run beats a later failure
    for p in runs:
        key = (p.tags[VARIANT_TAG], p.seed)
        if p.status == "FINISHED" or newest.get(key, p).status != "FINISHED":
            newest[key] = p
    counted = {k: result(p) for k, p in newest.items() if p.status == "FINISHED" and "student_test_acc" in p.metrics}
    rows = [variant_row(name, [counted[name, s] for s in seeds if (name, s) in counted],
                        {s: r for (n, s), r in counted.items() if n == FULL}) for name in names]
    unfinished = tuple(not_counted(name, seed, newest.get((name, seed)))
                       for name in names for seed in seeds if (name, seed) not in counted)
    return AblationTable(ablation_id, exp.name, seeds, tuple(rows), unfinished)


def not_counted(variant: str, seed: str, run: PipelineRecord | None) -> Unfinished:
    if run is None:
        return Unfinished(variant, seed, NO_RUN, None, None)
    return Unfinished(variant, seed, run.status, run.run_id, run.error)


def variant_row(name: str, results: list[SeedResult], full: dict[str, SeedResult]) -> VariantRow:
    """The estimates of variant ``name`` from its ``results``; a removal is paired with ``full`` (by seed)."""
    pairs = [(r, full[r.seed]) for r in results if r.seed in full]
    paired = None if name == FULL else paired_test([r.seed for r, _ in pairs], [r.test_acc for r, _ in pairs],
                                                   [f.test_acc for _, f in pairs])
    return VariantRow(name, tuple(results), estimate([r.test_acc for r in results]),
                      estimate([r.retention for r in results if r.retention is not None]),
                      estimate([r.wall_s for r in results if r.wall_s is not None]), paired)


def result(p: PipelineRecord) -> SeedResult:
    return SeedResult(p.seed, p.run_id, p.metrics["student_test_acc"], p.metrics.get("retention"), p.wall_s)
