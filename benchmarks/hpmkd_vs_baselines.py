"""HPM-KD against the baselines on the default experiment, over seeds (issues 7 and 17).

Per seed, every row distils the same student (``conf/default.yaml``) from the same teachers (loaded from the
default's checkpoints, or trained once per seed and reused from the MLflow memory by content key), for the same
epochs per model; weights are selected on validation and the test split is read once per model.

* **HPM-KD**: the full pipeline of ``conf/default.yaml`` (configuration manager, chain, attention, meta T). Taken
  from the store's ``hpmkd ablate`` of the same config (same ablation id), its full run of that seed, when there is
  one, else run here after the baselines.
* **student alone**: that run's ``student_alone`` stage.
* the baselines, each with its published recipe (no search), all from ``conf/default.yaml`` with the overrides in
  :data:`BASELINES`: Hinton KD from the teacher the chain compresses (``--teacher``, default ``chain.plan_from``);
  KD from the mean of both teachers' logits; TAKD (the same planned assistant, always trained, plain KD on each
  link); CA-MKD's confidence weights over both teachers (its logit term; the intermediate-feature term is not
  implemented, docs/methods.md); DKD from the single teacher.
* with ``--sequential-seeds``: the full pipeline again with ``components.parallel=false`` and
  ``components.memory=false`` (every stage recomputed, one at a time), for the wall time of the same stages run one
  after another.

The tables are built from the MLflow records alone and printed as Markdown (``--out`` also writes them to a file):
test accuracy (mean ± std over seeds), each row's paired difference against HPM-KD with the two-sided paired
t-test's p-value and the seeds where the row is better, retention (test accuracy / the best teacher's) and
compression; then HPM-KD against the student alone, and the issue's targets, each met or missed. Last line:
``hpmkd_minus_best_baseline=<points>``.

    python benchmarks/hpmkd_vs_baselines.py [--seeds 0 1 2 3 4] [--sequential-seeds 0] [--tracking-uri URI]
        [--out table.md] [--rows ROW ...]
    python benchmarks/hpmkd_vs_baselines.py --collect URI [URI ...] [--rows ROW ...] [--out table.md]

``--collect`` runs nothing: it builds the same tables from finished runs in one or more stores (for instance each
seed run into its own fresh store, side by side, as a new user's first run would be).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from hpmkd.components.report.ablation import FULL, VARIANT_TAG, paired_test
from hpmkd.components.tracking import Tracker, child_runs, default_tracking_uri
from hpmkd.config import ExperimentConfig, load_config
from kd_vs_alone import add_seeded_run_args, mean_std, seeds_of
from hpmkd.pipelines.ablate import Variant, finished_run, plan_ablation
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
SINGLE = "single"  # the single-teacher rows use --teacher
PUBLISHED_KD = ["distill.ce_weight=0.1", "distill.methods={kd: {weight: 0.9}}",
                "distill.temperature={schedule: fixed, T: 4.0}"]
#: row -> (pipeline, teachers: all or the single one, overrides on conf/default.yaml)
BASELINES: dict[str, tuple[str, str, list[str]]] = {
    "plain KD (single teacher)": ("kd", SINGLE, [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}"]),
    "mean-of-teachers KD": ("kd", "all", [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}"]),
    "TAKD (single teacher)": ("takd", SINGLE, [*PUBLISHED_KD, "distill.aggregator={name: mean_logits}",
                                              "chain.min_link_gain=null"]),
    "CA-MKD (confidence weights)": ("kd", "all", [*PUBLISHED_KD, "distill.aggregator={name: confidence}"]),
    "DKD (single teacher)": ("kd", SINGLE, ["distill.ce_weight=1.0", "distill.methods={dkd: {weight: 1.0}}",
                                            "distill.temperature={schedule: fixed, T: 4.0}",
                                            "distill.aggregator={name: mean_logits}"]),
}
PLAIN_KD = "plain KD (single teacher)"
HPMKD, ALONE, SEQUENTIAL = "HPM-KD (full)", "student alone", "HPM-KD, sequential and cold"
#: the issue-17 targets: teacher gap over the student alone (points), seeds HPM-KD beats the student alone (share),
#: retention and compression
TEACHER_GAP, WIN_SHARE, RETENTION, COMPRESSION = 3.0, 0.8, 0.97, 10.0
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
    keys = ("name", "model", "options", "checkpoint", "sha256", "train")
    return "teachers=" + json.dumps([{k: getattr(t, k) for k in keys if getattr(t, k) not in (None, {})}
                                     for t in chosen])


def markdown(rows: dict[str, list[Row]], seeds: list[int]) -> list[str]:
    """The comparison table, HPM-KD against the student alone, and the targets (module docstring)."""
    hpmkd, alone, n = rows[HPMKD], rows[ALONE], len(rows[HPMKD])
    lines = [f"Test accuracy %, mean ± std over seeds {', '.join(map(str, seeds))}. Best teacher: "
             f"{mean_std([r.best_teacher for r in hpmkd])}; student {int(hpmkd[0].params):,} parameters, "
             f"{hpmkd[0].teacher_params / hpmkd[0].params:.1f}× smaller.", "",
             "| row | test acc | row − HPM-KD (points, paired) | paired t-test p | seeds where the row is better | "
             "retention |", "|---|---|---|---|---|---|"]
    for label, results in rows.items():
        test = paired_test([str(s) for s in seeds], [r.test for r in results], [h.test for h in hpmkd])
        better = sum(d > 0 for d in test.differences)
        cells = ["-", "-", "-"] if label == HPMKD else [
            mean_std(list(test.differences)), "-" if test.p is None else f"{test.p:.3f}", f"{better}/{n}"]
        name = f"**{label}**" if label == HPMKD else label
        lines.append(f"| {name} | {mean_std([r.test for r in results])} | {' | '.join(cells)} | "
                     f"{statistics.mean(r.retention for r in results):.3f} |")
    gain = paired_test([str(s) for s in seeds], [h.test for h in hpmkd], [a.test for a in alone])
    wins = sum(d > 0 for d in gain.differences)
    gap = statistics.mean(h.best_teacher - a.test for h, a in zip(hpmkd, alone)) * 100
    retention = statistics.mean(h.retention for h in hpmkd)
    compression = hpmkd[0].teacher_params / hpmkd[0].params
    kd_gap = statistics.mean(h.test - k.test for h, k in zip(hpmkd, rows[PLAIN_KD])) * 100 if PLAIN_KD in rows else None
    p_text = "-" if gain.p is None else f"{gain.p:.3f}"
    lines += ["", f"HPM-KD − student alone: {mean_std(list(gain.differences))} points, better in {wins}/{n} seeds "
              f"(paired t-test p = {p_text}); per seed: "
              f"{', '.join(f'{d * 100:+.2f}' for d in gain.differences)}.", "",
              "| target | measured | |", "|---|---|---|"]
    for target, measured, met in (
            (f"best teacher ≥ {TEACHER_GAP:g} points above the student alone", f"{gap:+.2f} points",
             gap >= TEACHER_GAP),
            (f"HPM-KD beats the student alone in ≥ {WIN_SHARE:.0%} of seeds", f"{wins}/{n}", wins >= WIN_SHARE * n),
            ("HPM-KD beats plain KD on the mean", "not run" if kd_gap is None else f"{kd_gap:+.2f} points",
             kd_gap is not None and kd_gap > 0),
            (f"retention ≥ {RETENTION} at ≥ {COMPRESSION:g}× compression", f"{retention:.3f} at {compression:.1f}×",
             retention >= RETENTION and compression >= COMPRESSION)):
        lines.append(f"| {target} | {measured} | {'met' if met else '**missed**'} |")
    return lines


def collect(uris: list[str], experiment: str, pipeline: str, labels: list[str]) -> dict[str, dict[int, Run]]:
    """The finished pipeline runs of ``experiment`` in the stores ``uris`` (each seed run in a fresh store, say):
    row label -> seed -> the newest run. A run tagged ``baseline`` is that row; an untagged run of ``pipeline``
    (or an ablation's full run) is HPM-KD. Each run's store URI is added to its tags as ``store``."""
    found: dict[str, dict[int, Run]] = {}
    for uri in uris:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], "tags.kind = 'pipeline' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"])
        for run in runs:
            tags = run.data.tags
            full = tags.get("pipeline") == pipeline and tags.get(VARIANT_TAG, FULL) == FULL
            label = tags.get("baseline") or (HPMKD if full else None)
            if label in (*labels, HPMKD):
                run.data.tags["store"] = uri
                found.setdefault(label, {})[int(tags["seed"])] = run
    return found


def stored_row(run: Run, stage: str = "distill") -> Row:
    """:func:`row_of` for a run found by :func:`collect`."""
    return row_of(MlflowClient(run.data.tags["store"]), run.info.run_id, stage)


def tables(rows: dict[str, list[Row]], seeds: list[int], walls: dict[str, list[float]]) -> list[str]:
    """:func:`markdown`, HPM-KD's rows first, then the mean wall times."""
    ordered = dict(sorted(rows.items(), key=lambda item: item[0] not in (HPMKD, ALONE)))
    lines = markdown(ordered, seeds)
    for label, values in walls.items():
        lines.append(f"\nwall time, {label}: {statistics.mean(values):.0f} s (mean over {len(values)} seed(s), "
                     f"per seed: {', '.join(f'{v:.0f}' for v in values)})")
    return lines


def report(lines: list[str], out: str | None) -> None:
    print("\n".join(lines), flush=True)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


def collected_tables(args, labels: list[str]) -> tuple[dict[str, list[Row]], list[str]]:
    """``--collect``: the tables of the seeds every row has in the stores ``args.collect``; nothing runs."""
    cfg = load_config(args.config, args.overrides)
    found = collect(args.collect, cfg.experiment, cfg.pipeline, labels)
    seeds = sorted(set.intersection(*(set(found.get(label, {})) for label in (HPMKD, *labels))))
    if not seeds:
        raise SystemExit(f"hpmkd: error: --collect: no seed has a finished run of every row ({', '.join(labels)}) "
                         f"and of {cfg.pipeline} in {', '.join(args.collect)}.")
    rows = {label: [stored_row(found[label][s]) for s in seeds] for label in (HPMKD, *labels)}
    rows[ALONE] = [stored_row(found[HPMKD][s], "student_alone") for s in seeds]
    walls = {HPMKD: [stage_seconds(found[HPMKD][s]) for s in seeds]}
    return rows, tables(rows, seeds, walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument("--sequential-seeds", type=int, nargs="*", default=[],
                    help="seeds to also run sequentially with nothing reused, for the wall-time comparison")
    ap.add_argument("--teacher", default=None, help="the single-teacher rows' teacher (default: chain.plan_from)")
    ap.add_argument("--out", default=None, help="also write the Markdown tables here (after every seed)")
    ap.add_argument("--rows", nargs="+", choices=list(BASELINES), default=list(BASELINES), metavar="ROW",
                    help=f"the baseline rows to run (default: all; {PLAIN_KD!r} is the one the targets compare)")
    ap.add_argument("--collect", nargs="+", default=None, metavar="URI",
                    help="run nothing: build the tables from the finished runs in these stores (e.g. one per seed)")
    add_seeded_run_args(ap, "one seed, a tiny subset, 2 epochs per model")
    args = ap.parse_args()
    if args.collect:
        rows, lines = collected_tables(args, args.rows)
    else:
        rows, lines = run_seeds(args)
    report(lines, args.out)
    best_baseline = max(args.rows, key=lambda label: statistics.mean(r.test for r in rows[label]))
    gap = statistics.mean(h.test - r.test for h, r in zip(rows[HPMKD], rows[best_baseline]))
    print(f"hpmkd_minus_best_baseline={gap * 100:.2f}")


def run_seeds(args) -> tuple[dict[str, list[Row]], list[str]]:
    """Run the rows of ``args.seeds`` seed by seed into one store, the tables reported after each seed (an
    interrupted run keeps the seeds it finished)."""
    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    common = [*(QUICK if args.quick else []), *args.overrides]
    rows: dict[str, list[Row]] = {}
    walls: dict[str, list[float]] = {}
    seeds = seeds_of(args)
    plan = plan_ablation(args.config, max(seeds) + 1, components=[], overrides=common)  # the same config's ablation
    tracker = Tracker(uri, plan.base.experiment, plan.base.mlflow.artifact_root)
    lines: list[str] = []
    for done, seed in enumerate(seeds, 1):
        cfg = load_config(args.config, [*common, f"seed={seed}"])
        single = args.teacher or cfg.chain.plan_from or cfg.teachers[0].name
        for label in args.rows:
            pipeline, which, overrides = BASELINES[label]
            run_cfg = load_config(args.config, [*common, f"seed={seed}", f"pipeline={pipeline}",
                                                teachers_override(cfg, single if which == SINGLE else which),
                                                *overrides,
                                                "config_manager.enabled=false", "distill.baseline=false"])
            summary = run_experiment(run_cfg, tracking_uri=uri, tags={"baseline": label})
            rows.setdefault(label, []).append(row_of(client, summary["parent_run_id"]))
        full = finished_run(plan, tracker, Variant(None), seed)
        if full is None:
            full = run_experiment(cfg, tracking_uri=uri)["parent_run_id"]
        rows.setdefault(HPMKD, []).append(row_of(client, full))
        rows.setdefault(ALONE, []).append(row_of(client, full, "student_alone"))
        walls.setdefault(HPMKD, []).append(stage_seconds(client.get_run(full)))
        if seed in args.sequential_seeds:
            seq_cfg = load_config(args.config, [*common, f"seed={seed}", "components.parallel=false",
                                                "components.memory=false"])
            seq = run_experiment(seq_cfg, tracking_uri=uri, tags={"baseline": SEQUENTIAL})["parent_run_id"]
            walls.setdefault(SEQUENTIAL, []).append(stage_seconds(client.get_run(seq)))
        lines = tables(rows, seeds[:done], walls)
        if done < len(seeds):
            report(lines, args.out)
    return rows, lines


if __name__ == "__main__":
    main()
