"""Does the configuration manager's memory pay? Warm start against cold start at the same trial budget.

1. **Memory**: a family of related tasks (digits with different teacher/student pairs; with ``--full`` also
   Fashion-MNIST subsets) each runs the ``tune`` stage cold (published defaults first, then random search) and its
   ``distill`` stage, into the MLflow experiment ``cm-family``: every trial and stage becomes a memory record.
2. **New task of the family** (a student size the family did not have), per seed: ``warm`` (proposals from
   ``cm-family``: nearest neighbours here) and ``cold`` (no memory: the published defaults, then the same searcher),
   the same number of trials, epochs per trial, searcher and ASHA. The *fixed published defaults* (T = 4, CE 0.1 /
   KD 0.9, lr 0.05, wd 5e-4) are the cold arm's first trial, trained at the same budget without any search.

Teachers are trained once per task and seed in this process and given to the runs as checkpoints: what is measured
is the configuration manager (tune stage, then the distill stage with the chosen configuration).

Prints, from the MLflow records: per arm the mean best validation accuracy after n trials (trials in the order Tune
created them; the seeded proposals come first), the distilled student's validation / test accuracy, and per seed
how many trials the warm start needed to reach the cold start's final best validation accuracy. Last line:
``warm_vs_cold_trials=X``, X = that number over the cold start's trial budget, averaged over seeds (the issue's
target is X ≤ 0.5; a warm start that never reaches it counts as the whole budget).

    python benchmarks/config_manager.py --quick          # digits only, 6 trials; < 10 minutes on 2 CPU cores
    python benchmarks/config_manager.py                  # + Fashion-MNIST subsets in the memory, 12 trials
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from hpmkd import checkpoint
from hpmkd.config import DataConfig, TrainConfig, config_from_data
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.pipelines.runner import run_experiment
from hpmkd.models.ref import ModelRef

FAMILY = "cm-family"
TARGET = "cm-target"
DIGITS = {"name": "digits"}
FASHION = {"name": "fashion_mnist", "max_train": 3000, "max_val": 500, "max_test": 1000}


@dataclass(frozen=True)
class Task:
    data: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]


def mlp(hidden: int, depth: int) -> dict[str, Any]:
    return {"model": "mlp", "options": {"hidden": hidden, "depth": depth}}


MEMORY_TASKS = [
    Task(DIGITS, mlp(256, 2), mlp(16, 1)),
    Task(DIGITS, mlp(256, 2), mlp(48, 1)),
    Task(DIGITS, mlp(512, 2), mlp(8, 1)),
]
FULL_MEMORY_TASKS = [
    Task(FASHION, mlp(512, 2), mlp(32, 1)),
    Task(FASHION, {"model": "cnn_small", "options": {"stem_stride": 2}}, {"model": "cnn", "options": {"width": 6, "stem_stride": 2}}),
]
NEW_TASK = Task(DIGITS, mlp(256, 2), mlp(24, 1))


def teacher_checkpoint(task: Task, seed: int, epochs: int, folder: Path) -> str:
    """The task's teacher trained here, in-process, on the task's data split by ``seed`` (once per teacher and seed):
    the benchmark measures the configuration manager, so its teachers are given as checkpoints (``load_teacher``)
    rather than trained by a Ray Train stage in every run."""
    spec = StageSpec("teacher", seed, DataConfig(**task.data), ModelRef(**task.teacher), TrainConfig(epochs=epochs, batch_size=64))
    path = folder / "teachers" / f"{hashlib.sha256(repr(spec).encode()).hexdigest()[:16]}.pt"
    if not path.exists():
        states: list[dict[str, Any]] = []
        train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save_atomic(states[-1], path)
    return str(path)


def experiment_config(experiment: str, task: Task, seed: int, epochs: int, config_manager: dict[str, Any],
                      folder: Path):
    return config_from_data({
        "experiment": experiment, "pipeline": "kd", "seed": seed, "data": task.data,
        "teachers": [{"name": "teacher", **task.teacher, "checkpoint": teacher_checkpoint(task, seed, 2 * epochs, folder)}],
        "student": task.student,
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
        "distill": {"baseline": False},
        "mlflow": {"log_models": False},
        "config_manager": {"enabled": True, "scheduler": "asha", **config_manager},
        "output_dir": str(folder),
    })


def trial_curve(client: MlflowClient, summary: dict[str, Any]) -> list[float]:
    """Best validation accuracy of each trial, in the order Tune created the trials."""
    tune = next(s for s in summary["stages"] if s["kind"] == "tune")
    experiment_id = client.get_run(tune["run_id"]).info.experiment_id
    trials = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{tune['run_id']}' and tags.kind = 'trial'")
    trials.sort(key=lambda r: int(r.data.tags["trial_index"]))
    return [r.data.metrics["memory.val_acc"] for r in trials]


def best_so_far(curve: list[float]) -> list[float]:
    out, best = [], 0.0
    for value in curve:
        best = max(best, value)
        out.append(best)
    return out


def trials_to_reach(curve: list[float], target: float) -> int:
    """1-based number of trials until ``curve`` first reaches ``target``; ``len(curve)`` if it never does."""
    return next((i + 1 for i, v in enumerate(best_so_far(curve)) if v >= target - 1e-12), len(curve))


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:.2f} ± {spread * 100:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-only family, 6 trials of 3 epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--searcher", default="random", choices=["random", "optuna"])
    ap.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite store in a temporary folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[hpmkd %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    trials, epochs = (6, 3) if args.quick else (12, 5)
    tasks = MEMORY_TASKS if args.quick else MEMORY_TASKS + FULL_MEMORY_TASKS
    folder = Path(tempfile.mkdtemp(prefix="cm-bench-"))
    uri = args.tracking_uri or f"sqlite:///{folder / 'mlflow.db'}"
    search = {"trials": trials, "budget_epochs": epochs, "searcher": args.searcher}

    for task in tasks:  # fill the memory: cold searches on the family's tasks
        run_experiment(experiment_config(FAMILY, task, 100, epochs, {**search, "memory": False}, folder),
                       tracking_uri=uri)

    client = MlflowClient(uri)
    arms = {"warm": {"memory": True, "memory_experiments": [FAMILY]}, "cold": {"memory": False}}
    curves: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    students: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    sources: dict[str, set[str]] = {arm: set() for arm in arms}
    for seed in args.seeds:
        for arm, extra in arms.items():
            summary = run_experiment(experiment_config(TARGET, NEW_TASK, seed, epochs, {**search, **extra}, folder),
                                     tracking_uri=uri)
            curves[arm].append(trial_curve(client, summary))
            students[arm].append((summary["student"]["val_acc"], summary["student"]["test_acc"]))
            sources[arm].add(summary["config_manager"]["source"])

    print(f"\nnew task: digits, teacher mlp 256x2 -> student mlp 24x1; memory: {len(tasks)} tasks in {FAMILY!r}; "
          f"{trials} trials x {epochs} epochs, searcher {args.searcher}, ASHA; seeds {args.seeds}; store {uri}")
    print("mean best validation accuracy (%) after n trials")
    print(f"{'arm':<26}" + "".join(f"{f'n={n}':>8}" for n in range(1, trials + 1)) + "   student val / test (%)")
    for arm in arms:
        runs = [best_so_far(c) for c in curves[arm]]
        means = [statistics.mean(r[n] for r in runs) * 100 for n in range(trials)]
        val, test = zip(*students[arm])
        label = f"{arm} ({'/'.join(sorted(sources[arm]))})"
        print(f"{label:<26}" + "".join(f"{m:>8.2f}" for m in means) + f"   {mean_std(list(val))} / {mean_std(list(test))}")
    defaults = [c[0] for c in curves["cold"]]
    print(f"{'published defaults':<26}{mean_std(defaults):>8}   (T=4, CE 0.1 / KD 0.9, lr 0.05, wd 5e-4: cold trial 1)")
    ratios = []
    for seed, warm, cold in zip(args.seeds, curves["warm"], curves["cold"]):
        target = max(cold)
        needed = trials_to_reach(warm, target)
        reached = max(warm) >= target - 1e-12
        ratios.append(needed / len(cold))
        print(f"seed {seed}: cold best {target * 100:.2f} after {trials_to_reach(cold, target)} trials; warm reaches it "
              f"after {needed} trial(s){'' if reached else ' (never: counted as the whole budget)'}; "
              f"warm best {max(warm) * 100:.2f}")
    print(f"warm_vs_cold_trials={statistics.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
