"""The results of one experiment run: the JSON written by ``--output`` and the table printed at the end.

Retention is the distilled student's test accuracy over the best teacher's; compression is the best teacher's
parameter count over the student's (DESIGN.md: both on the same test set, parameter-count ratio); AUC retention is
the student's test ROC-AUC over the best teacher's (the tabular distillation study's measure, arXiv 2605.18702).

Each stage's row carries its scheduler estimate (``estimate_s``) beside its actual ``wall_s`` and its phases
(:mod:`hpmkd.phases`); ``schedule`` gives the order used and the critical path, estimated and actual.
"""

from __future__ import annotations

import math
from typing import Any

from hpmkd.components.graph import Stage, StageResult
from hpmkd.components.scheduler import critical_path
from hpmkd.components.stage_params import TEACHER_KINDS, TunedConfig
from hpmkd.config import ExperimentConfig

#: the kinds whose model is a distilled student (the last one in the graph is the experiment's student)
STUDENT_KINDS = ("distill", "posterior_chain", "pool_predictors")


def summarise(
    cfg: ExperimentConfig,
    stages: list[Stage],
    results: dict[str, StageResult],
    parent_run_id: str,
    tracking_uri: str,
    wall_s: float,
    estimates: dict[str, float] | None = None,
) -> dict[str, Any]:
    rows = [results[s.name] for s in stages if s.name in results]
    deps = {s.name: list(s.deps) for s in stages}
    requests = {s.name: {"CPU": s.cpus if math.isfinite(s.cpus) else "all", "GPU": s.gpus} for s in stages}
    teachers = []
    for r in rows:
        if r.kind in TEACHER_KINDS and r.status == "FINISHED":
            teachers.append({"name": r.artifact.name, "model": r.artifact.model.model, "params": r.artifact.params,
                             "test_acc": r.metrics["test_acc"], **auc_of(r)})
    # the student is the graph's last distillation stage (a chain's assistants come before it); none if it failed
    finals = [r for r in rows if r.kind in STUDENT_KINDS]
    student = None
    if finals and finals[-1].status == "FINISHED":
        last = finals[-1]
        student = {"model": last.artifact.model.model, "params": last.artifact.params,
                   "test_acc": last.metrics["test_acc"], "val_acc": last.metrics["val_acc"], "stage": last.name,
                   **auc_of(last)}
    alone = next((r for r in rows if r.kind == "train_student" and r.status == "FINISHED"), None)
    best = max(teachers, key=lambda t: t["test_acc"]) if teachers else None
    best_auc = max((t["test_auc"] for t in teachers if "test_auc" in t), default=None)
    return {
        "experiment": cfg.experiment,
        "pipeline": cfg.pipeline,
        "seed": cfg.seed,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri,
        "wall_s": wall_s,
        "stages": [
            {"name": r.name, "kind": r.kind, "model": r.artifact.model.model if r.artifact else None, "run_id": r.run_id,
             "status": r.status, "wall_s": r.wall_s,
             "started_s": r.started_s, "wait_s": r.wait_s, "reused": r.reused, "metrics": r.metrics, "error": r.error,
             "estimate_s": r.estimate_s, "phases": r.phases, "deps": deps[r.name],
             "resources": requests[r.name], "placement": r.placement}
            for r in rows
        ],
        "schedule": schedule(cfg, stages, results, estimates),
        "teachers": teachers,
        "student": student,
        "student_alone": None if alone is None else {"model": alone.artifact.model.model, "params": alone.artifact.params,
                                                     "test_acc": alone.metrics["test_acc"], "val_acc": alone.metrics["val_acc"]},
        "retention": student["test_acc"] / best["test_acc"] if student and best else None,
        "auc_retention": student["test_auc"] / best_auc if student and "test_auc" in student and best_auc else None,
        "compression": best["params"] / student["params"] if student and best else None,
        "config_manager": config_manager(rows),
    }


def auc_of(result: StageResult) -> dict[str, float]:
    """``{"test_auc": ...}`` when the stage recorded one (:mod:`hpmkd.metrics`)."""
    return {"test_auc": result.metrics["test_auc"]} if "test_auc" in result.metrics else {}


def schedule(cfg: ExperimentConfig, stages: list[Stage], results: dict[str, StageResult],
             estimates: dict[str, float] | None) -> dict[str, Any]:
    """The order ready stages started in, and the critical path (by the estimates, else by the actual times) with
    its estimated and actual seconds."""
    actual = {name: r.wall_s for name, r in results.items()}
    path = critical_path(stages, estimates if estimates is not None else actual)
    return {"order": cfg.ray.order, "critical_path": path,
            "critical_path_estimate_s": None if estimates is None else sum(estimates[n] for n in path),
            "critical_path_actual_s": sum(actual.get(n, 0.0) for n in path)}


def config_manager(rows: list[StageResult]) -> dict[str, Any] | None:
    """The configuration manager's part: its proposals and their source, the configuration it chose (handed to the
    distillation stages as config overrides) and the search that chose it."""
    tuned = next((r for r in rows if isinstance(r.record, TunedConfig) and r.status == "FINISHED"), None)
    if tuned is None:
        return None
    out: TunedConfig = tuned.record
    return {"source": out.source, "proposals": out.proposals, "chosen": out.config, "overrides": out.overrides,
            "best_val_acc": tuned.metrics["val_acc"], "trials": int(tuned.metrics["trials"]),
            "best_trial": out.best_trial, "budget_epochs": out.budget_epochs}


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: each stage's model, parameters, accuracies, status and wall time; then the ratios."""
    lines = [f"{'stage':<22}{'kind':<17}{'model':<16}{'params':>10}{'val_acc':>9}{'test_acc':>9}{'wall_s':>8}  status"]
    for row in summary["stages"]:
        m = row["metrics"]
        params = m.get("params")
        lines.append(
            f"{row['name']:<22}{row['kind']:<17}{row['model'] or '-':<16}"
            f"{(f'{int(params):,}' if params else '-'):>10}{fmt(m.get('val_acc')):>9}{fmt(m.get('test_acc')):>9}"
            f"{row['wall_s']:>8.1f}  {row['status']}{' (reused)' if row['reused'] else ''}"
        )
    if summary.get("retention") is not None:
        lines.append(f"retention (student / best teacher test acc): {summary['retention']:.3f}   "
                     f"compression (best teacher / student params): {summary['compression']:.1f}x")
    if summary.get("auc_retention") is not None:
        lines.append(f"AUC retention (student / best teacher test ROC-AUC): {summary['auc_retention']:.3f}")
    if summary.get("student") and summary.get("student_alone"):
        gain = summary["student"]["test_acc"] - summary["student_alone"]["test_acc"]
        lines.append(f"distilled student vs student alone: {gain * 100:+.2f} points test accuracy")
    if summary.get("config_manager"):
        cm = summary["config_manager"]
        chosen = ", ".join(f"{k}={v:.4g}" for k, v in cm["chosen"].items())
        lines.append(f"config manager: {cm['trials']} trials, {len(cm['proposals'])} proposal(s) from {cm['source']}; "
                     f"chosen {chosen} (trial val_acc {cm['best_val_acc']:.4f})")
    lines.append(f"total wall time: {summary['wall_s']:.1f} s")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
