"""The cost of running a stage on Ray: a distill stage through each stage executor against the same loop in plain
PyTorch, side by side; and a whole pipeline's wall time against the training time on its critical path.

    python benchmarks/ray_overhead.py [--sizes 30s 2min] [--quick] [--executors task train] [--rounds N]
    python benchmarks/ray_overhead.py --sizes --pipeline conf/default.yaml [--set key=value ...] [--orders]

**Stages.** Every run executes :func:`hpmkd.training.train_stage` on the same spec (default student, KD from one
cached ``cnn_small`` teacher, Fashion-MNIST, batch 128, one thread): first in this process (no checkpoints, no
tracking), then as a stage does it, through :func:`hpmkd.components.stage_runner.run_training_stage` with each
executor of ``--executors`` (``ray.executor``: ``task``, a Ray task in a pooled worker process, run twice: on a
worker that has not run a stage yet, then on the warm one, as a pipeline's later stages run; ``train``, a
``TorchTrainer`` with one worker). Each Ray run persists a full checkpoint every epoch, logs per-epoch metrics to a
real MLflow SQLite store, reports progress to a live progress hub, reads the data from Ray's object store as a
stage's workers read the driver's, and copies the selected weights out at the end. The cache is filled first and
read by all. Sizes: ``30s`` (5,000 images, 36 epochs) and ``2min`` (20,000 images, 36 epochs), each about that long
in plain PyTorch on an idle core. Reported per size and run: wall time; the sum of the epochs' own times (training
and validation, ``epoch_time_s``) and its ratio to plain (the per-epoch cost); the fixed cost (wall minus epochs) and
what Ray adds to plain's; Ray's phases (:mod:`hpmkd.phases`). ``--rounds N`` runs the plain loop and the first
executor's stage (then on a warm worker) again, alternating, until each has run N times, and compares each Ray run
with the plain run of its own round: on a shared machine the speed drifts between runs a minute apart, and a single
pair cannot tell that drift from Ray's cost.

**Pipeline** (``--pipeline CONFIG``): the experiment runs end to end in a fresh MLflow store (``reuse`` off), and
its wall time is compared with the training time on its critical path: along the chain of stages with the largest
summed wall time, the epochs' time of each training stage (``stage_phase.epochs_s``) and the whole time of a stage
that has no epochs (a search's trials are all training). ``--orders`` runs it twice, stages started in the
pipeline's order (``ray.order=listed``) and then critical path first (``critical_path``, estimated from the first
run's records), and compares their wall times.

Last line: ``overhead=<Ray wall / plain wall - 1>`` of the largest stage size run, for the first executor's run on
a worker that has not run a stage yet (the ``task`` executor by default: what ``ray.executor: auto`` runs a
one-worker stage with).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow import MlflowClient

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.progress import ProgressHub
from hpmkd.components.stage_launch import StageLaunch
from hpmkd.components.stage_runner import run_training_stage
from hpmkd.components.teacher_service import release
from hpmkd.components.tracking_relay import TrackingRelay
from hpmkd.config import RayConfig, load_config
from hpmkd.pipelines.runner import run_experiment
from hpmkd.training import StageEnv, train_stage
from kd_setup import (STUDENT, TEACHER, data_config, distill_spec, fill_cache, load, save_teachers, start_ray,
                      start_teachers)

#: stage sizes: training images and epochs (about 30 s and 2 min of plain training on an idle core)
SIZES = {"30s": (5000, 36), "2min": (20000, 36)}
QUICK = (2000, 3)


def compare_stage(train: int, epochs: int, folder: Path, executors: list[str], rounds: int = 1) -> dict[str, Any]:
    """One size: the plain loop, then each executor's stage (the task executor twice), one after the other in this
    process; each further round runs the plain loop and the first executor's stage (on a warm worker) again."""
    data = data_config(train)
    splits = load(data)
    spec = distill_spec(data, teachers=1, epochs=epochs)
    specs, weights, _ = save_teachers(1, folder / "teachers")
    pools = start_teachers(specs, weights)
    try:
        cache, _ = fill_cache(pools, specs, weights, splits, folder / "cache")
    finally:
        release(pools)

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ray_overhead")
    hub, splits_ref = ProgressHub.remote(), ray.put(splits)  # as run_experiment does once per experiment
    relay = TrackingRelay.remote(uri)  # as the experiment's first stage task starts it, shared by the later ones

    def staged(executor: str, label: str, number: int, round_: int) -> Run:
        launch = StageLaunch(spec, train_run_name=f"{executor}-{round_}-{number}", storage_path=str(folder / "ray"),
                             ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1, executor=executor),
                             tracking_uri=uri, run_id=client.create_run(experiment).info.run_id,
                             teacher_cache=cache, progress_hub=hub, splits_ref=splits_ref,
                             tracking_relay=relay if executor == "task" else None)
        began = time.perf_counter()
        trained = run_training_stage(launch, folder / f"out-{executor}-{round_}-{number}")
        return Run(label, time.perf_counter() - began, trained.metrics, trained.phases, round_)

    def plain(round_: int) -> Run:
        began = time.perf_counter()
        out = train_stage(spec, StageEnv(teachers=CachedTeachers(spec.teacher_names, cache)))
        return Run("plain PyTorch (this process)", time.perf_counter() - began, out, {}, round_)

    runs = [plain(1)]
    for executor in executors:
        for attempt in range(2 if executor == "task" else 1):
            runs.append(staged(executor, EXECUTOR_LABELS[executor] + (" (warm worker)" if attempt else ""), attempt, 1))
    for round_ in range(2, rounds + 1):
        runs += [plain(round_), staged(executors[0], EXECUTOR_LABELS[executors[0]] + " (warm worker)", 0, round_)]
    ray.kill(hub)
    ray.kill(relay)
    return {"images": len(splits.train), "epochs": epochs, "runs": runs}


@dataclass
class Run:
    """One run of the stage: its wall time, its result (with the epochs' ``history``), its phases, its round."""

    label: str
    wall: float
    out: dict[str, Any]
    phases: dict[str, float]
    round: int = 1

    @property
    def epochs_s(self) -> float:
        return sum(h["epoch_time_s"] for h in self.out["history"])


EXECUTOR_LABELS = {"task": "Ray task stage", "train": "Ray Train stage (1 worker)"}


def print_stage(size: str, row: dict[str, Any]) -> float:
    """The table of one size, each run against the plain loop of its round; the first Ray run's wall ratio to plain,
    less 1."""
    print(f"\n{size}: distill stage, {row['images']} images, {row['epochs']} epochs, batch 128, student "
          f"{STUDENT.model}, 1 cached {TEACHER.model} teacher")
    print(f"{'round':<6}{'run':<38}{'wall s':>9}{'epochs s':>10}{'fixed s':>9}{'added s':>9}{'epoch ratio':>12}"
          f"{'wall ratio':>11}{'test acc':>10}")
    plains = {run.round: run for run in row["runs"] if not run.phases}
    for run in row["runs"]:
        plain = plains[run.round]
        added = (run.wall - run.epochs_s) - (plain.wall - plain.epochs_s)
        print(f"{run.round:<6}{run.label:<38}{run.wall:>9.1f}{run.epochs_s:>10.1f}{run.wall - run.epochs_s:>9.1f}"
              f"{added:>9.1f}{run.epochs_s / plain.epochs_s:>12.3f}{run.wall / plain.wall:>11.3f}"
              f"{run.out['test_acc']:>10.4f}")
    staged = [run for run in row["runs"] if run.phases]
    for run in staged:
        print(f"round {run.round} {run.label} phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in run.phases.items()))
    if len(plains) > 1:  # each round's last run of the first executor (its warm one) against that round's plain
        last = {run.round: run for run in staged if run.label.startswith(staged[0].label)}
        for name, measure in (("epoch", lambda r: r.epochs_s), ("wall", lambda r: r.wall)):
            ratios = [measure(run) / measure(plains[round_]) for round_, run in sorted(last.items())]
            print(f"{last[1].label} / plain, {name} ratio by round: " + ", ".join(f"{r:.3f}" for r in ratios)
                  + f"; median {statistics.median(ratios):.3f}")
    return staged[0].wall / plains[1].wall - 1


def critical_training(summary: dict[str, Any]) -> tuple[list[str], float]:
    """The chain of stages with the largest summed wall time, and the training time along it (module docstring)."""
    rows = {r["name"]: r for r in summary["stages"]}
    deps = {r["name"]: r.get("deps", []) for r in summary["stages"]}
    longest: dict[str, tuple[float, list[str]]] = {}
    for name, row in rows.items():  # stages are listed after their inputs
        before = max((longest[d] for d in deps[name] if d in longest), default=(0.0, []), key=lambda t: t[0])
        longest[name] = (before[0] + row["wall_s"], before[1] + [name])
    path = max(longest.values(), key=lambda t: t[0])[1]
    return path, sum(rows[n]["phases"].get("epochs", rows[n]["wall_s"]) for n in path)


def run_pipeline(config: str, overrides: list[str], order: str, uri: str, folder: Path) -> dict[str, Any]:
    cfg = load_config(config, [*overrides, "reuse=false", f"ray.order={order}", f"output_dir={folder / 'runs'}"])
    return run_experiment(cfg, tracking_uri=uri)


def print_pipeline(label: str, summary: dict[str, Any]) -> float:
    path, training = critical_training(summary)
    ratio = summary["wall_s"] / training
    print(f"{label}: wall {summary['wall_s']:.1f} s; critical path {' -> '.join(path)}: training {training:.1f} s; "
          f"wall / critical-path training {ratio:.3f}")
    for r in summary["stages"]:
        est = f"{r['estimate_s']:.1f}" if r.get("estimate_s") is not None else "-"
        fixed = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items() if k not in ("epochs", "total") and v >= 0.05)
        print(f"  {r['name']:<22} started {r['started_s']:7.1f}  wall {r['wall_s']:7.1f}  estimate {est:>7}  "
              f"epochs {r['phases'].get('epochs', 0.0):7.1f}  ({fixed})")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES), help="stage sizes to compare")
    ap.add_argument("--quick", action="store_true", help=f"one tiny stage ({QUICK[0]} images, {QUICK[1]} epochs)")
    ap.add_argument("--executors", nargs="+", default=["task", "train"], choices=list(EXECUTOR_LABELS),
                    help="the stage executors to compare with the plain loop (ray.executor)")
    ap.add_argument("--rounds", type=int, default=1, help="run the plain loop and the first executor's warm stage "
                    "again this many times in all, alternating, and give each round's ratios (drift on a shared "
                    "machine moves one run against the other; alternating shows it)")
    ap.add_argument("--pipeline", metavar="CONFIG", help="also run this experiment and compare with its critical path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--orders", action="store_true", help="run the pipeline in listed order, then critical path first")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start_ray()
    sizes = {"quick": QUICK} if args.quick else {s: SIZES[s] for s in args.sizes}
    overhead = None
    with tempfile.TemporaryDirectory() as tmp:
        for size, (train, epochs) in sizes.items():
            folder = Path(tmp) / size
            overhead = print_stage(size, compare_stage(train, epochs, folder, args.executors, args.rounds))
        if args.pipeline:
            uri = f"sqlite:///{Path(tmp) / 'pipeline.db'}"
            orders = ["listed", "critical_path"] if args.orders else ["critical_path"]
            walls = {}
            for order in orders:
                summary = run_pipeline(args.pipeline, args.overrides, order, uri, Path(tmp) / order)
                print_pipeline(f"\npipeline {args.pipeline} ({order})", summary)
                walls[order] = summary["wall_s"]
            if args.orders:
                print(f"critical path first / listed order wall time: {walls['critical_path'] / walls['listed']:.3f}")
    ray.shutdown()
    if overhead is not None:
        print(f"overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
