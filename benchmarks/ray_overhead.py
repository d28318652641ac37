"""The cost of Ray Train: a distill stage through Ray Train against the same loop in plain PyTorch, side by side.

    python benchmarks/ray_overhead.py [--quick] [--train 20000] [--epochs 36]

Both run :func:`hpmkd.training.train_stage` on the same spec (default student, KD from one cached ``cnn_small``
teacher, 20,000 Fashion-MNIST images, batch 128, one thread): once in this process (no checkpoints, no tracking),
once as a stage does it, through :func:`hpmkd.components.stage_runner.run_training_stage` (a ``TorchTrainer`` with one
worker, a full checkpoint persisted every epoch, per-epoch metrics logged to a real MLflow SQLite store, the
selected weights copied out at the end). The cache is filled first and read by both. Reported: wall time of each
(data loading and the final test evaluation included in both), their sum of epoch times (the steady-state
part) and the rest (fixed costs). The full run is a stage of about two minutes. Last line: ``overhead=<Ray wall /
plain wall - 1>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch
from mlflow import MlflowClient

from hpmkd.components.logit_cache import CachedTeachers
from hpmkd.components.stage_runner import run_training_stage
from hpmkd.components.teacher_service import release
from hpmkd.config import RayConfig
from hpmkd.training import StageEnv, train_stage
from kd_setup import STUDENT, TEACHER, data_config, distill_spec, fill_cache, load, save_teachers, start_ray, start_teachers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 images, 2 epochs (under 3 minutes)")
    ap.add_argument("--train", type=int, default=20000, help="training images")
    ap.add_argument("--epochs", type=int, default=36)
    args = ap.parse_args()
    train, epochs = (5000, 2) if args.quick else (args.train, args.epochs)
    torch.set_num_threads(1)
    data = data_config(train)
    splits = load(data)
    spec = distill_spec(data, teachers=1, epochs=epochs)
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
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
        began = time.perf_counter()
        staged = run_training_stage(spec, train_run_name="ray-overhead", storage_path=str(folder / "ray"),
                                    out_dir=folder / "out", ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1),
                                    tracking_uri=uri, run_id=run_id, teacher_cache=cache)
        ray_s = time.perf_counter() - began
    ray.shutdown()

    rows = [("plain PyTorch (this process)", plain_s, plain["history"], plain["test_acc"]),
            ("Ray Train stage (1 worker)", ray_s, staged.metrics["history"], staged.metrics["test_acc"])]
    print(f"\ndistill stage: {len(splits.train)} images, {epochs} epochs, batch 128, student {STUDENT.model}, "
          f"1 cached {TEACHER.model} teacher")
    print(f"{'run':<32}{'wall s':>9}{'epochs s':>10}{'fixed s':>9}{'s/epoch':>9}{'test acc':>10}")
    for name, wall, history, acc in rows:
        epochs_s = sum(h["epoch_time_s"] for h in history)
        print(f"{name:<32}{wall:>9.1f}{epochs_s:>10.1f}{wall - epochs_s:>9.1f}{epochs_s / len(history):>9.2f}{acc:>10.4f}")
    print(f"overhead={ray_s / plain_s - 1:.3f}")


if __name__ == "__main__":
    main()
