"""The parallel processing pipeline: independent teacher trainings scheduled together against one after another.

Runs the same experiment (two equally costly teachers, then a short distillation) with ``ray.parallel: true`` and
``ray.parallel: false``, alternating the order per seed, memoisation off (``reuse: false``) so every stage really
runs. From the MLflow records alone, it reports the teacher phase (first teacher start to last teacher end) and the
whole run, per mode, mean ± std over seeds, and their ratio. Last line: ``parallel_speedup=<sequential / parallel
teacher-phase wall time>``. Run it on an otherwise idle machine: it measures wall time.

    python benchmarks/parallel_pipeline.py [--seeds 0 1 2] [--teachers 2] [--images 18000] [--epochs 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
MODES = {"parallel": "ray.parallel=true", "sequential": "ray.parallel=false"}


def teacher_overrides(count: int, epochs: int) -> str:
    teachers = ", ".join(f"{{name: t{i}, model: cnn_small, options: {{stem_stride: 2}}, train: {{epochs: {epochs}}}}}"
                         for i in range(count))
    return f"teachers=[{teachers}]"


def phase_seconds(client: MlflowClient, parent_run_id: str) -> tuple[float, float]:
    """(teacher phase, whole run) wall seconds, from the runs' recorded start and end times."""
    parent = client.get_run(parent_run_id)
    runs = child_runs(client, parent.info.experiment_id, parent_run_id)
    teachers = [r for r in runs.values() if r.data.tags["stage_kind"] == "train_teacher"]
    teacher_phase = max(r.info.end_time for r in teachers) - min(r.info.start_time for r in teachers)
    return teacher_phase / 1000, (parent.info.end_time - parent.info.start_time) / 1000


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--images", type=int, default=18000, help="training images per teacher stage")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per teacher: a minute or more of compute each, so "
                    "Ray Train's start-up (15-20 s a stage) does not dominate")
    ap.add_argument("--quick", action="store_true", help="one seed, a smaller subset")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    size, epochs = (2000, 2) if args.quick else (args.images, args.epochs)
    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    base = [
        "experiment=parallel-pipeline", f"data.max_train={size}", "data.max_val=500", "data.max_test=1000",
        teacher_overrides(args.teachers, epochs), "distill.baseline=false", "distill.train={epochs: 1}",
        "mlflow.log_models=false", "reuse=false",
    ]
    measured: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for i, seed in enumerate(seeds):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))  # alternate, so neither mode always goes first
        for mode in order:
            cfg = load_config(ROOT / "conf" / "smoke.yaml", [*base, f"seed={seed}", MODES[mode]])
            summary = run_experiment(cfg, tracking_uri=uri)
            measured[mode].append(phase_seconds(client, summary["parent_run_id"]))

    print(f"{args.teachers} teachers (cnn_small, {size} images, {epochs} epochs each), seeds {seeds}")
    print(f"{'mode':<12}{'teacher phase s':>18}{'whole run s':>16}")
    for mode, rows in measured.items():
        print(f"{mode:<12}{mean_std([r[0] for r in rows]):>18}{mean_std([r[1] for r in rows]):>16}")
    ratios = [s[0] / p[0] for s, p in zip(measured["sequential"], measured["parallel"])]
    print(f"per-seed speedup of the teacher phase: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"parallel_speedup={statistics.mean(ratios):.2f}")


if __name__ == "__main__":
    main()
