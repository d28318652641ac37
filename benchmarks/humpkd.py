"""HumP-KD on ``conf/humpkd.yaml`` over seeds: each teacher, the Meta-MLP, the student alone, plain KD from the mean
of the teachers, HumP-KD, and HumP-KD with each part removed in turn.

Per seed: the full pipeline (teachers, Meta-MLP, ``student_alone``, ``plain_kd``, HumP-KD's ``distill``), then one
run per part with ``humpkd.<part>=false`` (its teachers and Meta-MLP reused from the MLflow store by content key,
only its ``distill`` stage computed). Every number comes from the runs' records: macro-F1 on the clean test split and
macro-F1 under Gaussian noise and under motion blur (``test_noise_macro_f1``, ``test_motion_blur_macro_f1``); for every
student row, Welch's t-test and the Wilcoxon signed-rank test (paired by seed) of its clean macro-F1 against the
student alone's (:func:`hpmkd.trials.compare_trials`). Size and CPU throughput (batch 1, one thread) are measured
side by side in this process, on seed 0's models, interleaved over three rounds (median), so that the ratios are
comparable on a busy machine.

Ten seeds by default, as the paper's ten trials: with n paired seeds the smallest two-sided Wilcoxon p is 2/2^n, 0.0625
for five, so five seeds can never show p < 0.05 on that test. Seeds can run in several processes on one store
(``--seeds 0 1 2 3 4`` and ``--seeds 5 6 7 8 9``); a last run with every seed reuses each stage from the store by its
content key and prints the whole table from the records. ``--ablation-seeds K`` removes the parts on the first K
seeds only (each contribution is then paired over those K seeds).

    python benchmarks/humpkd.py [--seeds 0 1 ... 9] [--ablation-seeds K] [--tracking-uri URI] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from hpmkd.components.tracking import default_tracking_uri
from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.efficiency import cpu_fps, size_mb
from hpmkd.models.ref import ModelRef
from hpmkd.pipelines.humpkd import PARTS, meta_model
from hpmkd.pipelines.runner import run_experiment
from hpmkd.predictors import load_predictor
from hpmkd.trials import compare_trials

ROOT = Path(__file__).resolve().parent.parent
ALONE, PLAIN, FULL = "student alone", "plain KD (mean of teachers)", "HumP-KD"
ABLATED = {part: f"HumP-KD without {part}" for part in [*PARTS.names(), "meta"]}
METRICS = {"clean": "test_macro_f1", "noise": "test_noise_macro_f1", "blur": "test_motion_blur_macro_f1"}
ROUNDS = 3


def stage_metrics(summary: dict, stage: str) -> dict:
    return next(s for s in summary["stages"] if s["name"] == stage)["metrics"]


def stage_run(summary: dict, stage: str) -> str:
    return next(s for s in summary["stages"] if s["name"] == stage)["run_id"]


def fmt(values: list[float]) -> str:
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "humpkd.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--ablation-seeds", type=int, metavar="K",
                    help="remove each part in turn on the first K of --seeds only (default: all of them)")
    ap.add_argument("--tracking-uri")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.ablation_seeds is not None and args.ablation_seeds < 0:
        ap.error(f"--ablation-seeds {args.ablation_seeds}: give a count of seeds, 0 or more (0: no ablation)")
    logging.basicConfig(level=logging.INFO, format="[hpmkd %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    uri = args.tracking_uri or default_tracking_uri()
    ablated_seeds = args.seeds[:args.ablation_seeds]
    rows: dict[str, list[dict]] = {}
    models: dict[str, tuple[ModelRef, str]] = {}  # seed 0: row -> (model, run id)
    for seed in args.seeds:
        common = [*args.overrides, f"seed={seed}"]
        cfg = load_config(args.config, common)
        full = run_experiment(cfg, tracking_uri=uri, tags={"benchmark": "humpkd"})
        named = {**{f"teacher {t.name}": f"teacher_{t.name}" for t in cfg.teachers}, "Meta-MLP": "meta_mlp",
                 ALONE: "student_alone", PLAIN: "plain_kd", FULL: "distill"}
        refs = {**{f"teacher {t.name}": t.ref for t in cfg.teachers}, "Meta-MLP": meta_model(cfg)}
        for row, stage in named.items():
            rows.setdefault(row, []).append(stage_metrics(full, stage))
            if seed == args.seeds[0]:
                models[row] = (refs.get(row, cfg.student.ref), stage_run(full, stage))
        for part, row in ABLATED.items() if seed in ablated_seeds else ():
            ablated = load_config(args.config, [*common, f"humpkd.{part}=false", "humpkd.plain_kd=false",
                                                "distill.baseline=false"])
            summary = run_experiment(ablated, tracking_uri=uri, tags={"benchmark": "humpkd", "ablation": part})
            rows.setdefault(row, []).append(stage_metrics(summary, "distill"))
            if seed == args.seeds[0]:
                models[row] = (cfg.student.ref, stage_run(summary, "distill"))
        print_table(rows, {}, args)  # F1 and tests so far (a long run can be stopped between seeds)

    cfg = load_config(args.config, [*args.overrides, f"seed={args.seeds[0]}"])
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    image = splits.test.rows(torch.arange(1))[0]
    client = MlflowClient(uri)
    shipped = {f"teacher {t.name}": t.checkpoint for t in cfg.teachers if t.checkpoint}  # loaded, not trained
    predictors = {}
    with tempfile.TemporaryDirectory() as folder:
        for row, (ref, run_id) in models.items():
            source = client.get_run(run_id).data.tags.get("reused_from", run_id)  # a reused stage's files
            path = shipped.get(row) or client.download_artifacts(source, "checkpoint/model.pt", f"{folder}/{run_id}")
            predictors[row] = load_predictor(path, ref, splits.shape).eval()
    fps: dict[str, list[float]] = {row: [] for row in predictors}
    for _ in range(ROUNDS):
        for row, predictor in predictors.items():
            fps[row].append(cpu_fps(predictor, image, threads=1, budget_s=1.0))
    print_table(rows, {row: (predictor, statistics.median(fps[row])) for row, predictor in predictors.items()}, args)


def print_table(rows: dict[str, list[dict]], speed: dict[str, tuple[torch.nn.Module, float]],
                args: argparse.Namespace) -> None:
    """The table (with size and throughput when ``speed`` has them), then HumP-KD against plain KD and each part's
    contribution."""
    alone = [r[METRICS["clean"]] for r in rows[ALONE]]
    print(f"conf: {args.config} {' '.join(args.overrides)}; seeds {args.seeds[:len(alone)]}; macro-F1 mean ± std over "
          f"seeds; p-values: clean macro-F1 against the student alone (Welch's t-test; Wilcoxon signed-rank, paired "
          f"by seed)")
    print("| model | params | MB | CPU FPS (batch 1, 1 thread) | macro-F1 clean | Gaussian noise | motion blur | "
          "Welch p | Wilcoxon p | seeds better than alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    student_fps = speed[FULL][1] if FULL in speed else None
    for row, results in rows.items():
        size = "| - | - | -"
        if row in speed:
            predictor, fps = speed[row]
            size = (f"| {sum(p.numel() for p in predictor.parameters()):,} | {size_mb(predictor):.2f} | {fps:.1f} "
                    f"({fps / student_fps:.2f}x)")
        tests = "| - | - | -"
        if row not in (ALONE, "Meta-MLP") and not row.startswith("teacher "):
            cmp = compare_trials([r[METRICS["clean"]] for r in results], alone[:len(results)])  # paired by seed
            tests = f"| {cmp.welch_p:.4f} | {cmp.wilcoxon_p:.4f} | {cmp.wins}/{cmp.trials}"
        print(f"| {row} {size} | " + " | ".join(fmt([r[m] for r in results]) for m in METRICS.values()) + f" {tests} |")
    full, plain = [r[METRICS["clean"]] for r in rows[FULL]], [r[METRICS["clean"]] for r in rows[PLAIN]]
    vs_plain = compare_trials(full, plain)
    print(f"HumP-KD against plain KD (clean macro-F1): Welch p = {vs_plain.welch_p:.4f}, Wilcoxon p = "
          f"{vs_plain.wilcoxon_p:.4f}, better in {vs_plain.wins}/{vs_plain.trials} seeds", flush=True)
    for part, row in ABLATED.items():
        drop = [f - a[METRICS["clean"]] for f, a in zip(full, rows.get(row, []))]  # the first seeds: paired
        if not drop:
            continue
        print(f"contribution of {part}: {statistics.mean(drop) * 100:+.2f} macro-F1 points (HumP-KD minus "
              f"without it, mean over seeds; {sum(d > 0 for d in drop)}/{len(drop)} seeds positive)", flush=True)


if __name__ == "__main__":
    main()
