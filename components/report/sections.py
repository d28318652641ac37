"""The sections of an experiment's part of the report, in order: :data:`SECTIONS`.

Each section turns an experiment's records into Markdown (and writes its figure, if any, next to the report). A
section whose data are missing says so in a sentence instead of drawing an empty figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

from mlflow import MlflowClient

from hpmkd.components.report import plots
from hpmkd.components.report.ablation import ablation_ids, ablation_table
from hpmkd.components.report.ablation_files import ablation_markdown, draw
from hpmkd.components.report.plots import Bar, Line, Panel, Point
from hpmkd.components.report.records import TERMINAL_FAILURES, ExperimentRecords, PipelineRecord, StageRecord, series
from hpmkd.components.report.tables import COLUMNS, config_groups, image, markdown_table, mean_std

#: figures show at most this many series panels / pipeline runs (the newest); the tables list every run
MAX_PANELS = 12
MAX_TIMELINE_RUNS = 6
MAX_ERROR_CHARS = 300
TEACHER_WEIGHT = "teacher_weight."
TEMPERATURE = "temperature"

T = TypeVar("T")


@dataclass(frozen=True)
class ReportContext:
    """Where figures go (and which were written), and how per-epoch series are read."""

    client: MlflowClient
    out_dir: Path
    figures: list[Path] = field(default_factory=list)

    def figure(self, exp: ExperimentRecords, name: str) -> Path:
        """The path of figure ``name`` of ``exp`` (recorded as written)."""
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in exp.name)
        path = self.out_dir / f"{slug}-{name}.png"
        self.figures.append(path)
        return path


Render = Callable[[ExperimentRecords, ReportContext], str]


@dataclass(frozen=True)
class Section:
    title: str
    render: Render


SECTIONS: list[Section] = []


def section(title: str) -> Callable[[Render], Render]:
    """Register a section under ``title``; sections appear in the order they are registered."""

    def add(render: Render) -> Render:
        SECTIONS.append(Section(title, render))
        return render

    return add


def utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@section("Pipeline runs")
def runs_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    """Every pipeline run with its numbers; then, per configuration run with several seeds, mean ± std."""
    groups = config_groups(exp.pipelines)
    group_of = {p.run_id: g.label for g in groups for p in g.runs}
    rows = [[f"{p.name} ({p.run_id[:8]})", group_of[p.run_id], p.seed, p.status,
             *(c.show(c.value(p)) for c in COLUMNS), utc(p.start_ms)] for p in exp.pipelines]
    parts = [markdown_table(["run", "config", "seed", "status", *(c.title for c in COLUMNS), "started (UTC)"], rows)]
    if len(groups) > 1:
        parts.append("Configurations (the params of their runs, apart from the seed and storage locations):\n\n"
                     + markdown_table(["config", "runs", "differs from A in"],
                                      [[g.label, str(len(g.runs)), g.changes] for g in groups]))
    seeded = [(g, runs) for g in groups if len(runs := g.seed_runs()) > 1]
    if not seeded:
        parts.append("Each configuration has finished runs for one seed at most, so there is no mean ± std yet "
                     "(run it again with `--set seed=N`).")
        return "\n\n".join(parts)
    rows = [[g.label, ", ".join(p.seed for p in runs), str(len(runs)),
             *(mean_std([v for v in map(c.value, runs) if v is not None], c) for c in COLUMNS)] for g, runs in seeded]
    parts.append("Mean ± std over seeds (sample std; the newest finished run of each seed):\n\n"
                 + markdown_table(["config", "seeds", "n", *(c.title for c in COLUMNS)], rows))
    return "\n\n".join(parts)


@section("Ablation")
def ablation_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    """The table of each ablation (``hpmkd ablate``) with pipeline runs in the experiment, from those runs."""
    ids = ablation_ids(exp)
    if not ids:
        return "No ablation in this experiment (`hpmkd ablate`, see docs/ablation.md)."
    parts = []
    for ablation_id in ids:
        table = ablation_table(exp, ablation_id)
        parts.append(ablation_markdown(table, draw(table, lambda name: ctx.figure(exp, f"{name}-{ablation_id}"))))
    return "\n\n".join(parts)


def compression_points(exp: ExperimentRecords) -> list[Point]:
    """Every finished stage with a test accuracy and a parameter count, in a pipeline run with a finished teacher;
    compression is that run's best teacher's parameters over the stage's. A reused stage counts once (its source)."""
    points, seen = [], set()
    for pipeline in exp.pipelines:
        best = pipeline.best_teacher()
        for stage in pipeline.stages if best is not None else ():
            source = stage.reused_from or stage.run_id
            if stage.status == "FINISHED" and {"test_acc", "params"} <= stage.metrics.keys() and source not in seen:
                seen.add(source)
                points.append(Point(stage.name, stage.role, best.metrics["params"] / stage.metrics["params"],
                                    stage.metrics["test_acc"]))
    return points


@section("Accuracy against compression")
def compression_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    points = compression_points(exp)
    if not points:
        return "No finished stage with a test accuracy, a parameter count and a finished teacher in its run yet."
    path = plots.accuracy_vs_compression(points, ctx.figure(exp, "accuracy_vs_compression"))
    students = sum(p.role != "teacher" for p in points)
    return (f"{students} student and {len(points) - students} teacher models (▲ teachers, ■ students trained "
            "alone, ● distilled students); compression = parameters of the best teacher of the same pipeline run / "
            "the model's parameters.\n\n" + image(path, "test accuracy against compression"))


def series_stages(exp: ExperimentRecords, prefix: str) -> list[tuple[PipelineRecord, StageRecord, list[str]]]:
    """The stage runs that computed (were not reused) metrics named ``prefix...``, with those names, oldest first."""
    found = [(p, s, sorted(k for k in s.metrics if k.startswith(prefix))) for p, s in exp.stages() if not s.reused]
    return [f for f in found if f[2]]


def newest(items: list[T], limit: int) -> tuple[list[T], str]:
    """The last ``limit`` of ``items``, and a note for the text when some were left out."""
    kept = items[-limit:]
    return kept, (f" (the newest {len(kept)} of {len(items)})" if len(items) > len(kept) else "")


@section("Teacher weights over training")
def teacher_weights_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    stages, note = newest(series_stages(exp, TEACHER_WEIGHT), MAX_PANELS)
    if not stages:
        return (f"No stage in this experiment recorded `{TEACHER_WEIGHT}*` metrics (they come from distillation "
                "stages whose aggregator weights several teachers).")
    panels = [Panel(f"{s.name} · {p.label}", [Line(k.removeprefix(TEACHER_WEIGHT), series(ctx.client, s.run_id, k))
                                              for k in keys]) for p, s, keys in stages]
    path = plots.series_panels(panels, ctx.figure(exp, "teacher_weights"), "mean teacher weight")
    return (f"Mean weight of each teacher per epoch (`{TEACHER_WEIGHT}<name>`), one panel per distillation stage "
            f"run{note}.\n\n" + image(path, "teacher weights over training"))


@section("Temperature over training")
def temperature_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    stages, note = newest(series_stages(exp, TEMPERATURE), MAX_PANELS)
    if not stages:
        return f"No stage in this experiment recorded a `{TEMPERATURE}` metric."
    lines = [Line(f"{s.name} · {p.label}", series(ctx.client, s.run_id, TEMPERATURE)) for p, s, _ in stages]
    path = plots.series_panels([Panel(TEMPERATURE, lines)], ctx.figure(exp, "temperature"), "T")
    return (f"Distillation temperature per epoch, one line per stage run{note}.\n\n"
            + image(path, "temperature over training"))


#: per-stage test metrics the report tabulates (columns shown when some stage recorded them): title, metric, scale
STAGE_METRICS = (("accuracy (%)", "test_acc", 100.0), ("ROC-AUC", "test_auc", 1.0), ("log loss", "test_loss", 1.0),
                 ("Brier", "test_brier", 1.0), ("ECE", "test_ece", 1.0))


@section("Test metrics per stage")
def stage_metrics_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    """Each finished model stage's test metrics (accuracy, ROC-AUC, log loss, Brier, ECE), and its ROC-AUC over the
    best teacher's of the same pipeline run (AUC retention)."""
    rows, shown = [], [m for m in STAGE_METRICS if any(m[1] in s.metrics for _, s in exp.stages())]
    for p, s in exp.stages():
        if s.status != "FINISHED" or "test_acc" not in s.metrics:
            continue
        teachers = [t.metrics["test_auc"] for t in p.stages if t.role == "teacher" and "test_auc" in t.metrics]
        retention = s.metrics["test_auc"] / max(teachers) if teachers and "test_auc" in s.metrics else None
        rows.append([p.label, s.name, s.role, *(f"{s.metrics[k] * scale:.4f}" if k in s.metrics else "-"
                                                for _, k, scale in shown),
                     "-" if retention is None else f"{retention:.3f}"])
    if not rows:
        return "No finished stage recorded test metrics."
    return ("Test metrics of every finished model stage (`test_<metric>` in MLflow); AUC retention is the stage's "
            "ROC-AUC over the best teacher's of the same pipeline run.\n\n"
            + markdown_table(["pipeline run", "stage", "role", *(t for t, _, _ in shown), "AUC retention"], rows))


#: the uncertainty table's columns: (title, test metric without its ``test_`` prefix, scale, format)
UNCERTAINTY_COLUMNS = (("acc (%)", "acc", 100, ".2f"), ("NLL", "nll", 1, ".4f"), ("ECE", "ece", 1, ".4f"),
                       ("Brier", "brier", 1, ".4f"), ("error AUROC", "error_auroc", 1, ".3f"),
                       ("sel. acc (%)", "selective_acc", 100, ".2f"), ("set cov.", "set_coverage", 1, ".3f"),
                       ("set size", "set_size", 1, ".2f"), ("MI", "mutual_information", 1, ".2e"),
                       ("CI cov.", "ci_coverage", 1, ".3f"))
RELIABILITY = "reliability."


def test_sets(metrics: dict[str, float]) -> list[str]:
    """The test splits a stage recorded metrics on: ``test`` and each shift (``test_<shift>_ece``)."""
    shifts = sorted(k[len("test_"):-len("_ece")] for k in metrics
                    if k.startswith("test_") and k.endswith("_ece") and k != "test_ece")
    return ["test"] + [f"test_{s}" for s in shifts]


def split_label(split: str) -> str:
    """``clean`` for the test split, the shift's name for a shifted one."""
    return "clean" if split == "test" else split.removeprefix("test_")


def reliability_bins(metrics: dict[str, float], prefix: str) -> list[tuple[float, float, float]]:
    """``(confidence, accuracy, fraction)`` of each recorded bin of ``<prefix>_reliability.<bin>``, in bin order."""
    start = f"{prefix}_{RELIABILITY}"
    bins = sorted({k[len(start):].split(".")[0] for k in metrics if k.startswith(start)})
    return [tuple(metrics[f"{start}{b}.{part}"] for part in ("conf", "acc", "frac")) for b in bins]


def uncertainty_stages(exp: ExperimentRecords) -> list[tuple[PipelineRecord, StageRecord]]:
    """Every finished student stage (not a teacher) that recorded calibration metrics; a reused stage counts once."""
    found, seen = [], set()
    for p, s in exp.stages():
        source = s.reused_from or s.run_id
        if s.status == "FINISHED" and s.role != "teacher" and "test_ece" in s.metrics and source not in seen:
            seen.add(source)
            found.append((p, s))
    return found


@section("Uncertainty and calibration")
def uncertainty_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    """Per student stage and test split (clean, then each shift): the calibration and uncertainty metrics
    (:mod:`hpmkd.uncertainty_metrics`); a reliability diagram of the newest stages."""
    stages = uncertainty_stages(exp)
    if not stages:
        return "No student stage in this experiment recorded calibration metrics (`test_ece`)."
    rows = []
    for p, s in stages:
        for split in test_sets(s.metrics):
            values = [s.metrics.get(f"{split}_{key}") for _, key, _, _ in UNCERTAINTY_COLUMNS]
            rhat = s.metrics.get("val_loglik_rhat") if split == "test" else None
            rows.append([s.name, p.label, split_label(split),
                         *("-" if v is None else f"{v * scale:{form}}"
                           for v, (_, _, scale, form) in zip(values, UNCERTAINTY_COLUMNS)),
                         "-" if rhat is None else f"{rhat:.3f}"])
    table = markdown_table(["stage", "pipeline run", "test set", *(c[0] for c in UNCERTAINTY_COLUMNS),
                            "R-hat (val LL)"], rows)
    kept, note = newest(stages, MAX_PANELS)
    panels = [(f"{s.name} · {p.label}", [plots.Reliability(split_label(split), reliability_bins(s.metrics, split))
                                         for split in test_sets(s.metrics)]) for p, s in kept]
    path = plots.reliability(panels, ctx.figure(exp, "reliability"))
    return ("Measured once per final student model on the test split and on each shifted copy of it "
            "(`evaluation.shifts`): accuracy, NLL, ECE (`evaluation.ece_bins` bins), Brier, the AUROC of the "
            "predictive entropy for detecting the model's own errors, accuracy on the least uncertain inputs "
            "(`evaluation.selective_coverage`), coverage and mean size of the prediction sets calibrated on "
            "validation (`evaluation.set_coverage`), mutual information (posteriors and ensembles), coverage of the "
            "credible intervals of known class probabilities (synthetic data), and the split R-hat of the posterior "
            "samples' validation log-likelihood (docs/mtbkd.md).\n\n" + table + "\n\n"
            f"Reliability diagrams{note}: accuracy against confidence per bin (marker area: share of the inputs), "
            "one line per test set; the dashed diagonal is perfect calibration.\n\n"
            + image(path, "reliability diagrams"))


@section("Stage timeline")
def timeline_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    pipelines, note = newest([p for p in exp.pipelines if p.stages], MAX_TIMELINE_RUNS)
    if not pipelines:
        return "No stage runs recorded."
    bars, rows = timeline_bars(pipelines)
    path = plots.timeline(bars, ctx.figure(exp, "timeline"))
    return (f"Each stage run from its start to its end, per pipeline run{note}, coloured by the Ray node its "
            f"training ran on (tag `placement.nodes`; a stage whose workers sat on several nodes is split into one "
            f"strip per node; grey: no node recorded); the edge shows the status (red and crossed: failed; grey and "
            f"dotted: killed); hatched, faded bars were reused from an earlier run with the same content key.\n\n"
            + image(path, "stage timeline") + "\n\n"
            + markdown_table(["pipeline run", "stage", "kind", "status", "nodes", "start (s)", "wall (s)", "reused"],
                             rows))


def timeline_bars(pipelines: list[PipelineRecord]) -> tuple[list[Bar], list[list[str]]]:
    """The timeline's bars (seconds since each pipeline run's start, the stage's status, reuse and nodes) and the
    rows of its table, one per stage run of ``pipelines``."""
    now = int(time.time() * 1000)
    bars, rows = [], []
    for p in pipelines:
        for s in p.stages:
            start, end = (s.start_ms - p.start_ms) / 1000, ((s.end_ms or now) - p.start_ms) / 1000
            bars.append(Bar(f"{p.label} · {s.name}", start, end, s.status, s.reused, s.nodes))
            rows.append([p.label, s.name, s.kind, s.status, ", ".join(s.nodes) or "-", f"{start:.1f}",
                         f"{end - start:.1f}", f"yes ({s.reused_from[:8]})" if s.reused_from else "no"])
    return bars, rows


@section("Failed and killed runs")
def failures_section(exp: ExperimentRecords, ctx: ReportContext) -> str:
    rows = [["pipeline", p.name, p.label, p.status, clip(p.error)]
            for p in exp.pipelines if p.status in TERMINAL_FAILURES]
    rows += [["stage", s.name, p.label, s.status, clip(s.error)]
             for p, s in exp.stages() if s.status in TERMINAL_FAILURES]
    if not rows:
        return "No failed or killed runs."
    return markdown_table(["level", "run", "pipeline run", "status", "error"], rows)


def clip(error: str | None) -> str:
    if error is None:
        return "(no error tag)"
    return error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "…"
