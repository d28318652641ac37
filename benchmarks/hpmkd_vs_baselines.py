"""HPM-KD against the baselines at ~12x compression on Fashion-MNIST, over seeds (issue 7's comparison).

Per seed, every row distils the same student (``conf/default.yaml``: 8.6k parameters) from the same teachers (the
CNN, 103k, and the MLP, 670k, trained once per seed and reused from the MLflow memory by content key), for the same
20 epochs per model; weights are selected on validation and the test split is read once per model.

* **HPM-KD**: the full pipeline of ``conf/default.yaml`` (configuration manager, chain, attention, meta T). Taken
  from the store's ``hpmkd ablate`` of the same config (same ablation id), its full run of that seed, when there is
  one, else run here after the baselines (which train the seed's teachers first).
* **student alone**: that run's ``student_alone`` stage.
* the baselines, each with its published recipe (no search), all from ``conf/default.yaml`` with the overrides in
  :data:`BASELINES`: Hinton KD from the CNN teacher; KD from the mean of both teachers' logits; TAKD (the same
  planned assistant, plain KD on each link, CNN teacher); CA-MKD's confidence weights over both teachers (its logit
  term; the intermediate-feature term is not implemented, docs/methods.md); DKD from the CNN teacher.
* with ``--sequential-seeds``: the full pipeline again with ``components.parallel=false`` and
  ``components.memory=false`` (every stage recomputed, one at a time), for the wall time of the same stages run one
  after another.

The table is built from the MLflow records alone: test accuracy (mean ± std over seeds), the paired difference
against HPM-KD, retention (test accuracy / the best teacher's), compression against the best teacher, and the
wall time of the full pipeline (and of the sequential one). Last line: ``hpmkd_minus_best_baseline=<points>``.

    python benchmarks/hpmkd_vs_baselines.py [--seeds 0 1 2] [--sequential-seeds 0] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from hpmkd.components.tracking import Tracker, child_runs, default_tracking_uri
from hpmkd.config import ExperimentConfig, load_config
from kd_vs_alone import add_seeded_run_args, mean_std, seeds_of
from hpmkd.pipelines.ablate import Variant, finished_run, plan_ablation
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
BEST_TEACHER = "cnn"  # the teacher the single-teacher baselines use (the best one by test accuracy, every seed)
PUBLISHED_KD = ["distill.ce_weight=0.1", "distill.methods={kd: {weight: 0.9}}",
                "distill.temperature={schedule: fixed, T: 4.0}"]
#: row -> (pipeline, teachers: all or the best one, overrides on conf/default.yaml)
BASELINES: dict[str, tuple[str, str, list[str]]] = {
    "plain KD (CNN teacher)": ("kd", BEST_TEACHER, [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}"]),
    "mean-of-teachers KD": ("kd", "all", [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}"]),
    "TAKD (CNN teacher)": ("takd", BEST_TEACHER, [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}"]),
    "CA-MKD (confidence weights)": ("kd", "all", [*PUBLISHED_KD, "distill.aggregator={name: confidence}"]),
    "DKD (CNN teacher)": ("kd", BEST_TEACHER, ["distill.ce_weight=1.0", "distill.methods={dkd: {weight: 1.0}}",
                                               "distill.temperature={schedule: fixed, T: 4.0}",
                                               "distill.aggregator={name: mean_logits}"]),
}
HPMKD, ALONE, SEQUENTIAL = "HPM-KD (full)", "student alone", "HPM-KD, sequential and cold"
QUICK = ["data.max_train=1500", "data.max_val=300", "data.max_test=1000", "train.epochs=2",
         "teachers.0.train={epochs: 2}", "teachers.1.train={epochs: 2}", "config_manager.trials=2",
         "config_manager.budget_epochs=1"]


@dataclass(frozen=True)
class Row:
    """One model's result: the final student's metrics and the best teacher's."""

    test: float
    params: float
    best_teacher: float
    teacher_params: float

    @property
    def retention(self) -> float:
        return self.test / self.best_teacher


def stage_seconds(run: Run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def row_of(client: MlflowClient, parent_id: str, stage: str = "distill") -> Row:
    """The ``stage`` student of pipeline run ``parent_id`` and its best teacher."""
    parent = client.get_run(parent_id)
    runs = child_runs(client, parent.info.experiment_id, parent_id)
    teachers = [r for name, r in runs.items() if name.startswith("teacher_")]
    best = max(teachers, key=lambda r: r.data.metrics["test_acc"])
    student = runs[stage].data.metrics
    return Row(student["test_acc"], student["params"], best.data.metrics["test_acc"], best.data.metrics["params"])


def teachers_override(cfg: ExperimentConfig, which: str) -> str:
    """``teachers=[...]`` with every teacher (``all``) or the one named ``which``, exactly as the config has them (so
    the teacher stages keep their content keys and are reused)."""
    chosen = [t for t in cfg.teachers if which in ("all", t.name)]
    return "teachers=" + json.dumps([{"name": t.name, "model": t.model, "options": t.options, "train": t.train}
                                     for t in chosen])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument("--sequential-seeds", type=int, nargs="*", default=[],
                    help="seeds to also run sequentially with nothing reused, for the wall-time comparison")
    add_seeded_run_args(ap, "one seed, a tiny subset, 2 epochs per model")
    args = ap.parse_args()
    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    common = [*(QUICK if args.quick else []), *args.overrides]
    parents: dict[str, list[tuple[str, str]]] = {}  # row -> [(parent run id, stage)]
    walls: dict[str, list[float]] = {}
    seeds = seeds_of(args)
    for seed in seeds:  # the baselines first: they train the seed's teachers, which the full pipeline then reuses
        cfg = load_config(args.config, [*common, f"seed={seed}"])
        for label, (pipeline, which, overrides) in BASELINES.items():
            run_cfg = load_config(args.config, [*common, f"seed={seed}", f"pipeline={pipeline}",
                                                teachers_override(cfg, which), *overrides,
                                                "config_manager.enabled=false", "distill.baseline=false"])
            summary = run_experiment(run_cfg, tracking_uri=uri, tags={"baseline": label})
            parents.setdefault(label, []).append((summary["parent_run_id"], "distill"))
    plan = plan_ablation(args.config, max(seeds) + 1, components=[], overrides=common)  # the same config's ablation
    tracker = Tracker(uri, plan.base.experiment, plan.base.mlflow.artifact_root)
    for seed in seeds:
        cfg = load_config(args.config, [*common, f"seed={seed}"])
        full = finished_run(plan, tracker, Variant(None), seed)
        if full is None:
            full = run_experiment(cfg, tracking_uri=uri)["parent_run_id"]
        parents.setdefault(HPMKD, []).append((full, "distill"))
        parents.setdefault(ALONE, []).append((full, "student_alone"))
        walls.setdefault(HPMKD, []).append(stage_seconds(client.get_run(full)))
        if seed in args.sequential_seeds:
            seq_cfg = load_config(args.config, [*common, f"seed={seed}", "components.parallel=false",
                                                "components.memory=false"])
            seq = run_experiment(seq_cfg, tracking_uri=uri, tags={"baseline": SEQUENTIAL})["parent_run_id"]
            walls.setdefault(SEQUENTIAL, []).append(stage_seconds(client.get_run(seq)))

    rows = {label: [row_of(client, p, stage) for p, stage in ids]
            for label, ids in sorted(parents.items(), key=lambda item: item[0] not in (HPMKD, ALONE))}
    hpmkd = rows[HPMKD]
    n = len(hpmkd)
    print(f"best teacher test accuracy: {mean_std([r.best_teacher for r in hpmkd])}; "
          f"student {int(hpmkd[0].params):,} parameters, {hpmkd[0].teacher_params / hpmkd[0].params:.1f}x smaller")
    print(f"{'row':<30}{'test %':>16}{'vs HPM-KD':>20}{'retention':>11}")
    for label, results in rows.items():
        diff = [h.test - r.test for h, r in zip(hpmkd, results)]
        better = sum(d > 0 for d in diff)
        vs = "" if label == HPMKD else f"{mean_std([-d for d in diff])} ({n - better}/{n})"
        print(f"{label:<30}{mean_std([r.test for r in results]):>16}{vs:>20}"
              f"{statistics.mean(r.retention for r in results):>11.3f}")
    print("test accuracy in %, mean ± std over seeds; 'vs HPM-KD': the row minus HPM-KD, paired by seed, in points "
          "(seeds where the row is better)")
    for label, values in walls.items():
        print(f"wall time, {label}: {statistics.mean(values):.0f} s over seed(s) {len(values)}")
    best_baseline = max((label for label in BASELINES),
                        key=lambda label: statistics.mean(r.test for r in rows[label]))
    gap = statistics.mean(h.test - r.test for h, r in zip(hpmkd, rows[best_baseline]))
    print(f"hpmkd_minus_best_baseline={gap * 100:.2f}")


if __name__ == "__main__":
    main()
