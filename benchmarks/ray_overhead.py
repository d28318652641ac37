"""The cost of Ray Train: a distill stage through Ray Train against the same loop in plain PyTorch, side by side;
and a whole pipeline's wall time against the training time on its critical path.

    python benchmarks/ray_overhead.py [--sizes 30s 2min] [--quick]
    python benchmarks/ray_overhead.py --sizes --pipeline conf/default.yaml [--set key=value ...] [--orders]

**Stages.** Both runs execute :func:`hpmkd.training.train_stage` on the same spec (default student, KD from one
cached ``cnn_small`` teacher, Fashion-MNIST, batch 128, one thread): once in this process (no checkpoints, no
tracking), once as a stage does it, through :func:`hpmkd.components.stage_runner.run_training_stage` (a
``TorchTrainer`` with one worker, a full checkpoint persisted every epoch, per-epoch metrics logged to a real MLflow
SQLite store, progress reported to a live progress hub, the data read from Ray's object store as a stage's workers
read the driver's, the selected weights copied out at the end). The cache is filled first and read by both. Sizes: ``30s`` (5,000 images, 36 epochs) and ``2min`` (20,000 images, 36 epochs),
each about that long in plain PyTorch on an idle core. Reported per size: wall time; the sum of the epochs' own
times (training and validation, ``epoch_time_s``) and its ratio Ray / plain (the per-epoch cost); the fixed cost
(wall minus epochs) of each and Ray's added fixed cost; Ray's phases (:mod:`hpmkd.phases`).

**Pipeline** (``--pipeline CONFIG``): the experiment runs end to end in a fresh MLflow store (``reuse`` off), and
its wall time is compared with the training time on its critical path: along the chain of stages with the largest
summed wall time, the epochs' time of each training stage (``stage_phase.epochs_s``) and the whole time of a stage
that has no epochs (a search's trials are all training). ``--orders`` runs it twice, stages started in the
pipeline's order (``ray.order=listed``) and then critical path first (``critical_path``, estimated from the first
run's records), and compares their wall times.

Last line: ``overhead=<Ray wall / plain wall - 1>`` of the largest stage size run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow import MlflowClient

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.progress import ProgressHub
from hpmkd.components.stage_runner import run_training_stage
from hpmkd.components.teacher_service import release
from hpmkd.config import RayConfig, load_config
from hpmkd.pipelines.runner import run_experiment
from hpmkd.training import StageEnv, train_stage
from kd_setup import (STUDENT, TEACHER, data_config, distill_spec, fill_cache, load, save_teachers, start_ray,
                      start_teachers)

#: stage sizes: training images and epochs (about 30 s and 2 min of plain training on an idle core)
SIZES = {"30s": (5000, 36), "2min": (20000, 36)}
QUICK = (2000, 3)


def compare_stage(train: int, epochs: int, folder: Path) -> dict[str, Any]:
    """One size: the plain loop and the Ray Train stage, one after the other in this process."""
    data = data_config(train)
    splits = load(data)
    spec = distill_spec(data, teachers=1, epochs=epochs)
    specs, weights, _ = save_teachers(1, folder / "teachers")
    pools = start_teachers(specs, weights)
    try:
        cache, _ = fill_cache(pools, specs, weights, splits, folder / "cache")
    finally:
        release(pools)

    began = time.perf_counter()
    plain = train_stage(spec, StageEnv(teachers=CachedTeachers(spec.teacher_names, cache)))
    plain_s = time.perf_counter() - began

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ray_overhead")).info.run_id
    hub, splits_ref = ProgressHub.remote(), ray.put(splits)  # as run_experiment does once per experiment
    began = time.perf_counter()
    staged = run_training_stage(spec, train_run_name="ray-overhead", storage_path=str(folder / "ray"),
                                out_dir=folder / "out", ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1),
                                tracking_uri=uri, run_id=run_id, teacher_cache=cache, progress_hub=hub,
                                splits_ref=splits_ref)
    ray_s = time.perf_counter() - began
    ray.kill(hub)
    return {"images": len(splits.train), "epochs": epochs, "plain": (plain_s, plain), "ray": (ray_s, staged.metrics),
            "phases": staged.phases}


def print_stage(size: str, row: dict[str, Any]) -> float:
    print(f"\n{size}: distill stage, {row['images']} images, {row['epochs']} epochs, batch 128, student "
          f"{STUDENT.model}, 1 cached {TEACHER.model} teacher")
    print(f"{'run':<30}{'wall s':>9}{'epochs s':>10}{'fixed s':>9}{'s/epoch':>9}{'test acc':>10}")
    sums = {}
    for name, key in (("plain PyTorch (this process)", "plain"), ("Ray Train stage (1 worker)", "ray")):
        wall, out = row[key]
        epochs_s = sum(h["epoch_time_s"] for h in out["history"])
        sums[key] = (wall, epochs_s)
        print(f"{name:<30}{wall:>9.1f}{epochs_s:>10.1f}{wall - epochs_s:>9.1f}{epochs_s / len(out['history']):>9.3f}"
              f"{out['test_acc']:>10.4f}")
    (plain_wall, plain_epochs), (ray_wall, ray_epochs) = sums["plain"], sums["ray"]
    added = (ray_wall - ray_epochs) - (plain_wall - plain_epochs)
    print("Ray phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items()))
    print(f"{size}: per-epoch ratio (Ray / plain) {ray_epochs / plain_epochs:.3f}; fixed cost Ray "
          f"{ray_wall - ray_epochs:.1f} s, plain {plain_wall - plain_epochs:.1f} s, added by Ray {added:.1f} s; "
          f"wall ratio {ray_wall / plain_wall:.3f}")
    return ray_wall / plain_wall - 1


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
        print(f"  {r['name']:<22} started {r['started_s']:7.1f}  wall {r['wall_s']:7.1f}  estimate {est:>7}  "
              f"epochs {r['phases'].get('epochs', 0.0):7.1f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES), help="stage sizes to compare")
    ap.add_argument("--quick", action="store_true", help=f"one tiny stage ({QUICK[0]} images, {QUICK[1]} epochs)")
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
            overhead = print_stage(size, compare_stage(train, epochs, folder))
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
