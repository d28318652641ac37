"""hpmkd against torchdistill: the same teacher, student, data, KD loss, optimiser, batch size and epochs, side by side.

    python benchmarks/vs_torchdistill.py [--quick] [--train 10000] [--epochs 8] [--teacher-epochs 3]
                                         [--teacher-replicas N] [--teacher-cpus C] [--cache-fill F]

torchdistill runs in its own environment, ``benchmarks/.venv-torchdistill``, which this script creates the first
time (about 30 s) with the equivalent of::

    python3.11 -m venv benchmarks/.venv-torchdistill
    # a .pth file: torchdistill imports this project's torch==2.14.1, torchvision, numpy, pyyaml and hpmkd itself
    echo "$PWD/.venv/lib/python3.11/site-packages" >  benchmarks/.venv-torchdistill/lib/python3.11/site-packages/hpmkd_env.pth
    echo "$PWD"                                    >> benchmarks/.venv-torchdistill/lib/python3.11/site-packages/hpmkd_env.pth
    benchmarks/.venv-torchdistill/bin/python -m pip install --no-deps torchdistill==1.1.5

(``--no-deps``: pip never pulls another torch.) Then:

1. The teacher (``cnn_small``, full-resolution stem, 15× a student training step in FLOPs) is trained with hpmkd's
   plain loop (cross-entropy) for ``--teacher-epochs`` epochs and saved; both sides load that file.
2. torchdistill (``torchdistill_side.py``, in its environment): ``DistillationBox`` + ``KDLoss``, its DataLoader, the
   teacher's forward pass at every step (torchdistill has no teacher-output cache).
3. hpmkd: ``run_experiment`` on the same settings (``load_teacher`` + ``distill`` stage, ``teacher_outputs: auto``,
   so the logit cache), as one Ray task (``ray.executor: auto``), recorded in MLflow; its phases are printed.

Both: Fashion-MNIST rows from hpmkd's loader (seed 0), student ``cnn`` (width 9, strided stem), loss
``0.1 · CE + 0.9 · T² · KL`` at ``T = 4``, SGD (lr 0.05, momentum 0.9, weight decay 5e-4), cosine learning rate per
step, batch 128, one thread, validation after every epoch (inside the epoch time), the best epoch's weights tested
once. Reported: median epoch time, the whole stage's wall time (hpmkd: Ray Train start, cache fill and MLflow
records included; torchdistill: the process), validation and test accuracy. Last line: ``time_ratio=<hpmkd epoch
time / torchdistill epoch time>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from hpmkd.config import CACHE_FILLS, TrainConfig, config_from_data
from hpmkd.config_schema import to_dict
from hpmkd.training import StageEnv, StageSpec, train_stage
from kd_setup import BATCH, STUDENT, TEACHER, data_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-torchdistill"
TORCHDISTILL = "torchdistill==1.1.5"
RECIPE = {"ce_weight": 0.1, "kd_weight": 0.9, "T": 4.0, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def torchdistill_python() -> Path:
    """The environment's interpreter, created with torchdistill installed when missing (see the module docstring)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys._base_executable, "-m", "venv", str(VENV)], check=True)
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        (site / "hpmkd_env.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{ROOT}\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", TORCHDISTILL], check=True)
    check = "import torch, torchdistill; print(torch.__version__, torchdistill.__version__)"
    versions = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True).stdout.split()
    assert versions[0] == torch.__version__, f"torchdistill's environment has torch {versions[0]}, not {torch.__version__}"
    print(f"torchdistill {versions[1]} in {VENV} (torch {versions[0]})")
    return python


def train_teacher(data, epochs: int, path: Path) -> None:
    """The teacher, trained with cross-entropy by hpmkd's plain loop; the best epoch's weights saved to ``path``."""
    saved: dict = {}
    spec = StageSpec(name="teacher", seed=0, data=data, model=TEACHER, train=TrainConfig(epochs=epochs, batch_size=BATCH))
    result = train_stage(spec, StageEnv(report=lambda metrics, state: saved.update(state or {})))
    torch.save(saved["best"]["model"], path)
    print(f"teacher {TEACHER.model} {TEACHER.options}: test acc {result['test_acc']:.4f} after {epochs} epochs")


def hpmkd_settings(data, epochs: int, teacher_path: str, ray_settings: dict) -> dict:
    return {
        "experiment": "vs-torchdistill", "pipeline": "kd", "seed": 0,
        "data": to_dict(data),
        "teachers": [{"name": "teacher", "model": TEACHER.model, "options": TEACHER.options, "checkpoint": teacher_path}],
        "student": {"model": STUDENT.model, "options": STUDENT.options},
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "sgd", "lr": RECIPE["lr"],
                  "momentum": RECIPE["momentum"], "weight_decay": RECIPE["weight_decay"], "lr_schedule": "cosine"},
        "distill": {"ce_weight": RECIPE["ce_weight"], "methods": {"kd": {"weight": RECIPE["kd_weight"]}},
                    "temperature": {"schedule": "fixed", "T": RECIPE["T"]}, "baseline": False},
        "ray": ray_settings,
    }


def run_hpmkd(data, epochs: int, teacher: Path, folder: Path, ray_settings: dict) -> dict:
    from hpmkd.pipelines.runner import run_experiment

    settings = hpmkd_settings(data, epochs, str(teacher), ray_settings) | {"output_dir": str(folder / "runs")}
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    summary = run_experiment(config_from_data(settings), tracking_uri=uri)
    stage = next(s for s in summary["stages"] if s["name"] == "distill")
    client = MlflowClient(uri)
    times = [m.value for m in sorted(client.get_metric_history(stage["run_id"], "epoch_time_s"), key=lambda m: m.step)]
    return {"epoch_times": times, "wall": stage["wall_s"], "test_acc": stage["metrics"]["test_acc"],
            "val_acc": stage["metrics"]["val_acc"], "source": client.get_run(stage["run_id"]).data.tags["teacher_outputs"],
            "phases": stage["phases"]}


def run_torchdistill(python: Path, data, epochs: int, teacher: Path, folder: Path) -> dict:
    settings = {"data": data.loader_kwargs(0), "teacher": {"model": TEACHER.model, "options": TEACHER.options},
                "student": {"model": STUDENT.model, "options": STUDENT.options}, "teacher_weights": str(teacher),
                "seed": 0, "epochs": epochs, "batch_size": BATCH, "eval_batch_size": 1024, **RECIPE}
    (folder / "settings.json").write_text(json.dumps(settings))
    began = time.perf_counter()
    subprocess.run([str(python), str(HERE / "torchdistill_side.py"), str(folder / "settings.json"),
                    str(folder / "torchdistill.json")], check=True)
    result = json.loads((folder / "torchdistill.json").read_text())
    return result | {"wall": time.perf_counter() - began, "val_acc": max(result["val_accs"]), "source": "online"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 images, 2 epochs, a 1-epoch teacher")
    ap.add_argument("--train", type=int, default=10000, help="training images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--teacher-replicas", type=int, help="hpmkd's ray.teacher_replicas (default: the config's, 1)")
    ap.add_argument("--teacher-cpus", type=float, help="hpmkd's ray.teacher_cpus (default: the config's, 0.5)")
    ap.add_argument("--cache-fill", choices=CACHE_FILLS, help="hpmkd's ray.cache_fill (default: the config's)")
    args = ap.parse_args()
    for flag, value in (("--teacher-replicas", args.teacher_replicas), ("--teacher-cpus", args.teacher_cpus)):
        if value is not None and value <= 0:
            ap.error(f"{flag} {value}: must be above 0")
    train, epochs, teacher_epochs = (2000, 2, 1) if args.quick else (args.train, args.epochs, args.teacher_epochs)
    ray_settings = {key: value for key, value in {"teacher_replicas": args.teacher_replicas,
                                                  "teacher_cpus": args.teacher_cpus,
                                                  "cache_fill": args.cache_fill}.items() if value is not None}
    torch.set_num_threads(1)
    python = torchdistill_python()
    data = data_config(train)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher = folder / "teacher.pt"
        train_teacher(data, teacher_epochs, teacher)
        results = {"torchdistill": run_torchdistill(python, data, epochs, teacher, folder),
                   "hpmkd": run_hpmkd(data, epochs, teacher, folder, ray_settings)}

    print(f"\n{train} Fashion-MNIST training images, {epochs} epochs, batch {BATCH}, KD 0.1 CE + 0.9 KD at T=4, SGD, "
          f"teacher {TEACHER.model} (full stem), student {STUDENT.model}")
    print(f"{'framework':<14}{'teacher outputs':>16}{'epoch s':>9}{'stage wall s':>14}{'val acc':>9}{'test acc':>10}")
    epoch = {}
    for name, r in results.items():
        epoch[name] = statistics.median(r["epoch_times"])
        print(f"{name:<14}{r['source']:>16}{epoch[name]:>9.2f}{r['wall']:>14.1f}{r['val_acc'] * 100:>9.2f}"
              f"{r['test_acc'] * 100:>10.2f}")
    gap = (results["hpmkd"]["test_acc"] - results["torchdistill"]["test_acc"]) * 100
    print(f"test accuracy gap (hpmkd - torchdistill): {gap:+.2f} points; epoch time ratio "
          f"{epoch['hpmkd'] / epoch['torchdistill']:.2f}; stage wall ratio "
          f"{results['hpmkd']['wall'] / results['torchdistill']['wall']:.2f}")
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in results["hpmkd"]["phases"].items())
    print(f"hpmkd stage phases (s): {phases}")
    print(f"time_ratio={epoch['hpmkd'] / epoch['torchdistill']:.3f}")


if __name__ == "__main__":
    main()
